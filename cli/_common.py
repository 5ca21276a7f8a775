"""What every command shares: a bad input becomes one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import sys

import click


def friendly_errors(fn):
    """Run a command body; LoraKitError (and a missing file) -> 'error: ...' and exit 2, nothing else printed."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        from lora_kit.errors import LoraKitError

        try:
            return fn(*args, **kwargs)
        except LoraKitError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return run
