"""Collapse a LoRA file into its base model and write a diffusers pipeline folder (lora-merge MODEL A -o DIR)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .api import collapse, load
from .errors import LoraKitError
from .models import open_pipeline


def collapse_into_model(model: str, lora: str, output: str | os.PathLike, weight: float = 1.0, dtype=None,
                        force: bool = False) -> Path:  # fmt: skip
    """Open MODEL, collapse LORA at `weight` (fp32 maths), save_pretrained to OUTPUT atomically (temp dir + rename)."""
    out = Path(output)
    if out.exists() and not force:
        raise LoraKitError(f"{out}: already exists (use --force to overwrite)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise LoraKitError(f"{out}: the folder {parent} does not exist or is not writable")
    pipe = open_pipeline(model)
    load(pipe, lora, weight=weight)
    collapse(pipe)
    if dtype is not None:
        pipe.to(dtype)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        pipe.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
