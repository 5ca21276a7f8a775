"""The only file I/O of the core: sniff a LoRA file's format and read it into a canonical state dict, or write one.

Formats: `kohya` (default on disk for SD1/SD2/SDXL/FLUX), `peft` (diffusers/PEFT; default for SD3) and `native`
(the canonical keys as they are). Every file written has one alpha for all modules and is written atomically.
`files` (headers, atomic writes) needs no torch, so header-only commands start instantly; the rest loads lazily.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "read": "dispatch",
    "write": "dispatch",
    "sniff": "dispatch",
    "FORMATS": "dispatch",
    "DEFAULT_FORMAT": "dispatch",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
