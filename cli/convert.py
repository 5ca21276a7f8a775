"""lora-convert: a LoRA file in another format (kohya, peft/diffusers, native, comfyui), names mapped through the
model."""

from __future__ import annotations

import click

from ._common import command, friendly_errors, output_options, torch_dtype


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
@output_options
@friendly_errors
def main(input, to, model, allow_pickle, output, dtype, force):
    """Convert the LoRA in INPUT (any supported format or trainer dialect, detected: kohya, peft/diffusers, ComfyUI
    / ai-toolkit `diffusion_model.`, XLabs, OneTrainer, LyCORIS `lycoris_`) to --to, writing OUTPUT. Deltas are
    unchanged; alphas are made uniform; trigger words and training config travel along."""
    from lora_kit import tools

    report = tools.convert(input, output, to=to, model=model, dtype=torch_dtype(dtype), force=force,
                           allow_pickle=allow_pickle)  # fmt: skip
    click.echo(f"wrote {report.path} ({to})")


if __name__ == "__main__":
    main()
