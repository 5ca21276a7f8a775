"""lora-convert: a LoRA file in another format (kohya, peft/diffusers, native), names mapped through the model."""

from __future__ import annotations

import click

from ._common import CONTEXT, friendly_errors, output_options, torch_dtype

KEPT = ("lora_kit.trigger_words", "lora_kit.targets", "lora_kit.config", "modelspec.trigger_phrase")


@click.command(context_settings=CONTEXT)
@click.argument("input", type=click.Path(dir_okay=False))
@click.option("--to", "to", type=click.Choice(["kohya", "peft", "native"]), required=True, help="Format to write.")
@click.option("--model", default=None,
              help="The base model the LoRA is for (diffusers folder or hub id): module names are mapped through "
                   "its own module list. Default: the architecture the file is for (SD1.5, SD2.1, SDXL, SD3, FLUX), "
                   "built on the meta device from configs lora_kit ships.")  # fmt: skip
@output_options
@friendly_errors
def main(input, to, model, output, dtype, force):
    """Convert the LoRA in INPUT (any supported format, detected) to --to, writing OUTPUT. Deltas are unchanged;
    alphas are made uniform; trigger words and training config travel along."""
    from lora_kit.errors import LoraKitError
    from lora_kit.formats import read, write
    from lora_kit.formats.files import check_output
    from lora_kit.formats.stored import architecture_of, read_lora
    from lora_kit.models import meta_pipeline, open_pipeline

    check_output(output, force)
    if model is None:
        state, _, meta = read_lora(input)
        arch = architecture_of(meta, state)
        if arch is None:
            raise LoraKitError(f"{input}: the file does not say which base model it is for; pass --model")
        pipe = meta_pipeline(arch)
    else:
        pipe = open_pipeline(model)
    state, meta = read(input, pipe)
    kept = {k: v for k, v in meta.items() if k in KEPT}
    out = write(output, state, pipe, format=to, dtype=torch_dtype(dtype), metadata=kept, force=force)
    click.echo(f"wrote {out} ({to})")


if __name__ == "__main__":
    main()
