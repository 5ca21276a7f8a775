"""lora-ppim: a folder of photos -> a training set that `lora-train --data OUTPUT_DIR` reads as it is."""

from __future__ import annotations

import contextlib
import signal
import threading

import click

from ._common import command, friendly_errors, progress


@command()
@click.argument("input_dir", type=click.Path())
@click.argument("output_dir", type=click.Path())
@click.option(
    "--resolution",
    default="512",
    show_default=True,
    help="Crop size: 512 or WxH (768x512). With --crop none one number, lora-train's --resolution.",
)
@click.option(
    "--crop",
    default="center",
    show_default=True,
    metavar="center|subject|random:N|none",
    help="center; subject (centred on the --mask, needs it); random:N (N crops per image, random "
    "position and zoom up to 1.5x); none (keep the aspect ratio: each image at its lora-train bucket for "
    "--resolution and --bucket-step, at most 4:1, which lora-train does not resize again).",
)
@click.option(
    "--bucket-step",
    type=int,
    default=64,
    show_default=True,
    help="--crop none: bucket sides are multiples of this. 64 suits every model: lora-train takes a step-64 "
    "bucket as it is at its step for SD1.x/SD2.x (64), SDXL (32) and SD3, FLUX, the toy model (16).",
)
@click.option(
    "--upscale/--no-upscale",
    default=False,
    show_default=True,
    help="Enlarge images smaller than the crop (plain --resample filter) instead of rejecting them.",
)
@click.option(
    "--resample",
    type=click.Choice(["lanczos", "bicubic", "bilinear", "box"]),
    default="lanczos",
    show_default=True,
    help="Resampling filter for images (masks: bilinear).",
)
@click.option(
    "--min-size",
    type=int,
    default=None,
    help="Reject images whose shorter side is below this many pixels. [256, or the shorter side of --resolution "
    "when that is smaller]",
)
@click.option(
    "--background",
    default="white",
    show_default=True,
    help="Colour that transparent pixels are composited over (a name or #rrggbb).",
)
@click.option(
    "--caption",
    type=click.Choice(["template", "clip-tags", "model"]),
    default="template",
    show_default=True,
    help="template (no model); clip-tags (top-k phrases by CLIP); model (image-to-text).",
)
@click.option(
    "--template",
    default="a photo of {token}",
    show_default=True,
    help="--caption template: {token} = --token, {filename} = the words of the file name.",
)
@click.option(
    "--token",
    default=None,
    help="Trigger word: fills {token}; otherwise put in front of each caption ('sks, ...') unless present.",
)
@click.option(
    "--replace",
    default=None,
    metavar="WORDS",
    help="Comma-separated words the token replaces in captions (e.g. 'man,person'); "
    "a caption with none of them gets the token in front.",
)
@click.option("--clip-model", default=None, metavar="PATH", help="--caption clip-tags: a local CLIP model folder.")
@click.option(
    "--tags",
    default=None,
    metavar="FILE",
    help="--caption clip-tags: phrases to rank, one per line. [a built-in vocabulary of ~170]",
)
@click.option("--top-k", type=int, default=5, show_default=True, help="--caption clip-tags: phrases kept.")
@click.option(
    "--caption-model",
    default=None,
    metavar="PATH",
    help="--caption model: a local transformers image-to-text model folder (GIT, BLIP-2, Florence-2, "
    "LLaVA-style chat models, ...).",
)
@click.option(
    "--caption-prompt",
    default=None,
    help="--caption model: text the model continues (e.g. Florence-2 '<CAPTION>'), or the instruction "
    "for chat models [Describe this image in one sentence.].",
)
@click.option("--max-new-tokens", type=int, default=40, show_default=True, help="--caption model: caption length.")
@click.option("--mask", default=None, metavar="PROMPT", help="Write subject masks for this text prompt ('face').")
@click.option("--mask-model", default=None, metavar="PATH", help="A local CLIPSeg model folder for --mask.")
@click.option(
    "--mask-threshold",
    type=float,
    default=0.3,
    show_default=True,
    help="Probability at which a mask pixel becomes 1 (else 0); 0 keeps CLIPSeg's soft probabilities.",
)
@click.option(
    "--mask-blur",
    type=float,
    default=0.0,
    show_default=True,
    help="Gaussian blur radius of the mask in output pixels (soft edges).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda", "mps"]),
    default="auto",
    show_default=True,
    help="Where the models run (auto: cuda, then mps, then cpu).",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
    default="auto",
    show_default=True,
    help="Model dtype (auto: fp16 on a GPU, fp32 on cpu).",
)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Images per model call.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random crops.")
@click.option("--force", is_flag=True, help="Replace OUTPUT_DIR if it is an earlier lora-ppim output.")
@friendly_errors
def main(input_dir, output_dir, **options):
    """Turn INPUT_DIR (searched recursively; never modified) into a training set in OUTPUT_DIR: upright RGB PNGs
    cropped to --resolution, a .txt caption beside each, optional [0, 1] masks, manifest.jsonl (what lora-train
    reads) and report.json (every rejected file with its reason, every duplicate). OUTPUT_DIR appears only when
    everything succeeded.

    \b
    lora-ppim photos/ data/ --token sks --template "a photo of {token} dog"
    lora-ppim photos/ data/ --caption clip-tags --clip-model ./clip-vit-b32 --token sks
    lora-ppim photos/ data/ --caption model --caption-model ./git --mask face --mask-model ./clipseg --crop subject
    """
    from lora_kit.preprocess import PreprocessConfig, run

    config = PreprocessConfig(input_dir=input_dir, output_dir=output_dir, **options)
    with stopped_like_ctrl_c():
        summary = run(config, progress=progress("lora-ppim"))
    click.echo(summary.line)


@contextlib.contextmanager
def stopped_like_ctrl_c():
    """SIGTERM (kill, timeout) and SIGHUP (a closed terminal) end the run by an exception, as Ctrl-C does, so that
    the staging folder is removed on the way out (by default they end the process at once and leave it behind)."""

    def stop(signum, frame):
        raise SystemExit(128 + signum)  # the exit status a shell shows for death by that signal

    # only the main thread may set handlers; one set by others (nohup's ignored SIGHUP) is left as it is
    main = threading.current_thread() is threading.main_thread()
    signals = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    previous = {s: signal.signal(s, stop) for s in signals if main and signal.getsignal(s) is signal.SIG_DFL}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    main()
