"""lora-resize: shrink a LoRA to a fixed rank or by a dynamic singular-value rule, keeping its strength."""

from __future__ import annotations

import click

from ._common import command, friendly_errors, output_options, progress, torch_dtype


def _dynamic(spec: str | None) -> tuple[str, float] | None:
    """'sv_fro=0.9' -> ('sv_fro', 0.9), checked (ops.check_dynamic) before any file is read."""
    from lora_kit.errors import LoraKitError
    from lora_kit.ops import check_dynamic

    if spec is None:
        return None
    method, _, value = spec.partition("=")
    try:
        rule = method, float(value)
    except ValueError:
        raise LoraKitError(f"--dynamic {spec!r}: expected sv_ratio=N, sv_fro=F or sv_cumulative=F") from None
    try:
        check_dynamic(*rule)
    except LoraKitError as e:
        raise LoraKitError(f"--dynamic {spec!r}: {e}") from None
    return rule


@command()
@click.argument("input", type=click.Path(dir_okay=False))
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="New rank (with --dynamic: the largest rank allowed).")  # fmt: skip
@click.option("--conv-rank", type=click.IntRange(min=1), default=None,
              help="New rank for convs larger than 1x1 (default: --rank).")  # fmt: skip
@click.option("--dynamic", default=None,
              help="sv_ratio=N (keep singular values > S0/N), sv_fro=F (keep F of the Frobenius norm) or "
                   "sv_cumulative=F (keep F of the sum of singular values), per module.")  # fmt: skip
@click.option(
    "--allow-pickle", is_flag=True, help="Read a pickled .pt/.bin {name: tensor} input (torch weights_only)."
)
@output_options
@friendly_errors
def main(input, rank, conv_rank, dynamic, allow_pickle, output, dtype, force):
    """Resize the LoRA in INPUT and write it to OUTPUT in the same format; each module's delta keeps its strength
    (alpha is rescaled), and the relative error of the truncation is printed."""
    from lora_kit import tools

    rule = _dynamic(dynamic)
    report = tools.resize(input, output, rank=rank, dynamic=rule, conv_rank=conv_rank,
                          dtype=torch_dtype(dtype), force=force, progress=progress("resize"),
                          allow_pickle=allow_pickle)  # fmt: skip
    for note in report.notes:
        click.echo(note)
    click.echo(f"ranks: {', '.join(f'{r} x{n}' for r, n in sorted(report.ranks.items()))}")
    if report.errors:
        worst = max(report.errors, key=report.errors.get)
        click.echo(f"relative error: total {report.total_error:.3e}, worst {report.errors[worst]:.3e} ({worst})")
    click.echo(f"wrote {report.path}")


if __name__ == "__main__":
    main()
