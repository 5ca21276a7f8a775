"""lora-convert: a LoRA file in another format (kohya, peft/diffusers, native, comfyui), names mapped through the
model."""

from __future__ import annotations

import click

from ._common import command, friendly_errors, output_options, progress, torch_dtype

SHOWN = 12  # modules whose error is printed one per line (the worst ones); the rest are counted


def print_module_errors(errors: dict[str, float]) -> None:
    """Each module's relative error, worst first (all of them when few; else the SHOWN worst, the rest counted)."""
    worst = sorted(errors, key=errors.get, reverse=True)
    for stem in worst[:SHOWN]:
        click.echo(f"  {errors[stem]:.3e}  {stem}")
    if len(worst) > SHOWN:
        click.echo(f"  ... and {len(worst) - SHOWN} more modules, each <= {errors[worst[SHOWN]]:.3e}")


def print_errors(report) -> None:
    """The ranks written, the modules' relative errors and the total."""
    click.echo(f"ranks: {', '.join(f'{r} x{n}' for r, n in sorted(report.ranks.items()))}")
    print_module_errors(report.errors)
    click.echo(f"relative error: total {report.total_error:.3e}")


@command()
@click.argument("input", type=click.Path())
@click.option("--to", "to", type=click.Choice(["kohya", "peft", "native", "comfyui"]), required=True,
              help="Format to write (formats.FORMATS): kohya (sd-scripts' names: BFL for FLUX, MMDiT for SD3), peft "
                   "(diffusers), native (lora_kit's keys) or comfyui (`diffusion_model.` + the original checkpoint's "
                   "module names, as ComfyUI's LoraSave, ai-toolkit and SimpleTuner write).")  # fmt: skip
@click.option("--model", default=None,
              help="The base model the LoRA is for (diffusers folder, hub id or single-file checkpoint): module "
                   "names are mapped through "
                   "its own module list. Default: the architecture the file is for (SD1.5, SD2.1, SDXL, SD3, FLUX), "
                   "built on the meta device from configs lora_kit ships.")  # fmt: skip
@click.option("--allow-pickle", is_flag=True,
              help="Read a legacy pickled .pt input, and a .ckpt --model (with torch weights_only).")  # fmt: skip
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="Turn every module into a plain LoRA of at most this rank: the exact delta of each LoHa, LoKr, "
                   "DoRA, IA3 or full-diff module factored by SVD (DoRA and IA3 need --model: their delta depends on "
                   "the base weight), LoRA modules above it shrunk as lora-resize does, the others kept; per-module "
                   "and total relative errors are printed. Needed to write other kinds to a format that cannot hold "
                   "them (peft, comfyui, native). A full diff's bias delta (diff_b) stays beside its pair in kohya "
                   "files.")  # fmt: skip
@click.option("--conv-rank", type=click.IntRange(min=1), default=None,
              help="With --rank: the rank of convs larger than 1x1.")  # fmt: skip
@click.option("--dynamic", default=None,
              help="As lora-resize takes it, instead of or with --rank (then capped at it): sv_ratio=N, sv_fro=F or "
                   "sv_cumulative=F, per module.")  # fmt: skip
@output_options
@friendly_errors
def main(input, to, model, allow_pickle, rank, conv_rank, dynamic, output, dtype, force):
    """Convert the LoRA in INPUT (any supported format or trainer dialect, detected: kohya, peft/diffusers, ComfyUI
    / ai-toolkit `diffusion_model.`, XLabs, OneTrainer, LyCORIS `lycoris_`) to --to, writing OUTPUT. Deltas are
    unchanged; alphas are made uniform; trigger words and training config travel along. LyCORIS kinds (LoHa, LoKr,
    DoRA, IA3, full diff) are kept where --to holds them (kohya); --rank turns them into plain LoRA:

    lora-convert lokr.safetensors --to peft --rank 32 -o out.safetensors"""
    from lora_kit import tools

    from .resize import _dynamic

    report = tools.convert(input, output, to=to, model=model, dtype=torch_dtype(dtype), force=force,
                           allow_pickle=allow_pickle, rank=rank, conv_rank=conv_rank, dynamic=_dynamic(dynamic),
                           progress=progress("convert"))  # fmt: skip
    if rank is not None or dynamic is not None:
        print_errors(report)
    click.echo(f"wrote {report.path} ({to})")


if __name__ == "__main__":
    main()
