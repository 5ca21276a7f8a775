"""lora-extract: a LoRA from the difference between a tuned model and its base, by SVD."""

from __future__ import annotations

import click

from ._common import command, friendly_errors, output_options, progress, torch_dtype


@command()
@click.argument("base")
@click.argument("tuned")
@click.option("--rank", type=click.IntRange(min=1), default=16, show_default=True,
              help="Rank of linear and 1x1 conv modules.")  # fmt: skip
@click.option("--conv-rank", type=click.IntRange(min=1), default=None,
              help="Rank of convs larger than 1x1 (default: --rank).")  # fmt: skip
@click.option("--targets", default=None, help="Target preset of the UNet/transformer (default: locon / dit).")
@click.option("--text-encoder", is_flag=True, help="Also extract the text encoders (skipped when unchanged).")
@click.option("--exact", is_flag=True, help="Full SVD per module instead of the (much faster) randomized SVD.")
@click.option("--format", "fmt", type=click.Choice(["kohya", "peft", "native"]), default=None,
              help="File format (default: kohya for SD1/SD2/SDXL, the architecture's default otherwise).")  # fmt: skip
@click.option("--allow-pickle", is_flag=True, help="Open pickled .ckpt/.pt checkpoints (torch's weights-only loader).")
@output_options
@friendly_errors
def main(base, tuned, rank, conv_rank, targets, text_encoder, exact, fmt, allow_pickle, output, dtype, force):
    """Extract a LoRA from BASE and TUNED (diffusers folders, hub ids or single-file checkpoints of the same
    architecture): every targeted module's weight difference is factored in fp32; per-module and total relative
    errors are printed."""
    from lora_kit import tools

    report = tools.extract(base, tuned, output, rank=rank, conv_rank=conv_rank, targets=targets,
                           text_encoders=text_encoder, fast=not exact, format=fmt, dtype=torch_dtype(dtype),
                           force=force, progress=progress("extract"), allow_pickle=allow_pickle)  # fmt: skip
    for note in report.notes:
        click.echo(note)
    for stem, err in sorted(report.errors.items(), key=lambda kv: -kv[1])[:5]:
        click.echo(f"  {err:.3e}  {stem}")
    click.echo(f"{len(report.errors)} modules, relative error: total {report.total_error:.3e}")
    click.echo(f"wrote {report.path}")


if __name__ == "__main__":
    main()
