"""lora-generate: images from a base model with several LoRAs, each at its own weight and step schedule."""

from __future__ import annotations

import click

from lora_kit.errors import SEED_MAX

from ._common import command, friendly_errors


@command()
@click.option(
    "--model",
    required=True,
    help="Base model: a diffusers folder, a hub id, toy (the shipped toy world), or a "
    "single-file checkpoint (.safetensors; FLUX's parts joined by commas).",
)
@click.option(
    "--prediction-type",
    type=click.Choice(["epsilon", "v_prediction"]),
    default=None,
    help="Overrides the model's prediction type (an SD2 single file cannot tell which it is).",
)
@click.option("--lora", "loras", multiple=True, metavar="FILE[:WEIGHT][@SCHEDULE]",
              help="A LoRA (repeatable), optionally at a weight (default 1) and with a step schedule: "
                   "style.safetensors:0.8@0:1,0.5:0.2 fades the style from 0.8 to 0.16 by mid-denoising and keeps "
                   "it there. The schedule is piecewise linear over progress 0..1 and multiplies the weight in the "
                   "UNet/transformer only.")  # fmt: skip
@click.option("--prompt", required=True, help="The prompt.")
@click.option("--negative-prompt", default=None,
              help="The negative prompt (classifier-free guidance: needs --guidance above 1; refused where the "
                   "model would ignore it, as FLUX, whose --guidance is distilled guidance).")  # fmt: skip
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Denoising steps (default: the pipeline's).")
@click.option("--guidance", type=float, default=None, help="Guidance scale (default: the pipeline's).")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True,
              help="Seed of the first image, 0 to 2**63 - 1; image i uses seed+i.")  # fmt: skip
@click.option("--size", default=None,
              help="512 or WIDTHxHEIGHT such as 768x512, multiples of 8 (16 for SD3 and FLUX) up to 8192 a side "
                   "(default: the model's size).")  # fmt: skip
@click.option("-n", "count", type=click.IntRange(min=1), default=1, show_default=True, help="Number of images.")
@click.option(
    "--compare",
    is_flag=True,
    help="Also render every seed without the LoRAs and write compare.png: before (top) and after (bottom).",
)
@click.option("--device", default=None, help="cuda, cpu, ... (default: cuda when available).")
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Read legacy pickled .pt/.bin LoRAs and .ckpt models (with torch weights_only).",
)
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder for the PNGs and grid.png.")
@click.option("--force", is_flag=True, help="Write into OUTPUT even if it is not empty.")
@friendly_errors
def main(model, prediction_type, loras, prompt, negative_prompt, steps, guidance, seed, size, count, compare, device,
         allow_pickle, output, force):  # fmt: skip
    """Generate images with LoRAs: `lora-generate --model M --lora subject.safetensors:0.9 --lora
    style.safetensors:0.7@0:1,0.6:0 --prompt "..." -n 4 -o out/` writes out/000-seed0.png ... and out/grid.png,
    each PNG carrying the prompt, seed, settings, adapters, weights and schedules in its text metadata."""
    from lora_kit import generate as gen

    specs = gen.parse_loras(loras, allow_pickle, model)  # every file checked before the model opens
    settings = gen.Settings(prompt, negative_prompt, steps, guidance, seed, gen.parse_size(size) if size else None,
                            count, model)  # fmt: skip
    device = gen.check_device(device)
    folder = gen.check_output(output, force)

    import torch
    from tqdm import tqdm

    from lora_kit.models import open_pipeline, refuse_guessed_prediction

    pipe = open_pipeline(
        model, torch.float16 if device.type == "cuda" else torch.float32, prediction_type, allow_pickle
    )
    refuse_guessed_prediction(pipe, model, prediction_type)
    pipe.to(device)
    total = count * (steps or gen.pipeline_default(pipe, "num_inference_steps")) * (2 if compare else 1)
    # disable=None: no bar when stderr is not a terminal, so a log holds the error line alone; on a terminal the
    # with-block closes the bar (leave=False clears its line) before an error is printed
    with tqdm(total=total, desc="denoising", unit="step", leave=False, disable=None) as bar:
        results, before = gen.render(pipe, settings, specs, compare, lambda: bar.update(1), allow_pickle)
    paths = gen.write(results, folder, seed, before=before)
    if note := gen.prompt_note(pipe, prompt):  # (diffusers' own echo of the cut words is silenced)
        click.echo(note)
    click.echo(f"wrote {count} image(s) and " + " and ".join(str(p) for p in paths[count:]))


if __name__ == "__main__":
    main()
