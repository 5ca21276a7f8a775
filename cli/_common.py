"""What every command shares: one-line errors with exit code 2, and the common options."""

from __future__ import annotations

import functools
import sys

import click

DTYPES = ("fp16", "bf16", "fp32")
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _UsageError(click.UsageError):
    """A bad flag or argument as one line, like every other error (click prints usage, a hint and the error)."""

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class Command(click.Command):
    """Every lora_kit command: usage errors (a bad value, a missing option) in one line, exit code 2."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            raise _UsageError(e.format_message(), ctx) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # a BadParameter raised by the command body
            raise _UsageError(e.format_message(), ctx) from None


def command(**settings):
    """`@command()`: a lora_kit command (see Command), with -h/--help."""
    return click.command(cls=Command, context_settings=CONTEXT | settings)


# Loggers whose warnings say only how an optional library was imported, nothing about the run: torchao, which
# diffusers and transformers import whenever it is installed (lora_kit[quant]), logs every CUDA kernel library a
# CPU-only torch cannot load and Triton's absence, and its enum registrations make torch's pytree warn of a
# deprecation; diffusers' torchao quantizer warns of a torchao release newer than it knows; bitsandbytes of an
# optional CPU kernel package. Raised to errors in lora_kit's commands (a Python session that imports lora_kit
# keeps its own settings).
QUIETED = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer",
           "bitsandbytes.backends.cpu.ops")  # fmt: skip


def _quiet_import_warnings() -> None:
    import logging

    for name in QUIETED:
        logging.getLogger(name).setLevel(logging.ERROR)


def friendly_errors(fn):
    """Run a command body; LoraKitError (or an OSError the body did not expect: a full disk, a vanished folder) ->
    one line 'error: ...' on stderr, after clearing any progress bar, and exit 2."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        from lora_kit.errors import LoraKitError

        _quiet_import_warnings()
        try:
            return fn(*args, **kwargs)
        except (LoraKitError, OSError) as e:
            if isinstance(e, OSError):
                e = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e) or type(e).__name__
            _close_progress_bars()
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return run


def _close_progress_bars() -> None:
    """Close the tqdm bars still shown (bars leave no line behind), so an error starts on a clean line."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        bar.close()


def torch_dtype(name: str | None):
    """'fp16' -> torch.float16; None stays None (keep the dtype the data has)."""
    if name is None:
        return None
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def output_options(fn):
    """-o/--output, --dtype, --force: every writer has them."""
    fn = click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")(fn)
    fn = click.option(
        "--dtype", type=click.Choice(DTYPES), default=None, help="Dtype of the written factors (default: as given)."
    )(fn)
    return click.option("-o", "--output", required=True, type=click.Path(), help="The file (or folder) to write.")(fn)


def progress(desc: str):
    """A tqdm wrapper for long loops (stderr, disappears when done; none where stderr is not a terminal, so a log
    holds what the command printed and nothing of the bar)."""
    from tqdm import tqdm

    return lambda items: tqdm(list(items), desc=desc, leave=False, file=sys.stderr, disable=None)
