"""The Python API on a diffusers pipeline (or a bare UNet/transformer/text encoder): load, save, collapse, weights."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from . import formats
from .errors import LoraKitError
from .inject import adapter_names, collapse_lora, lora_modules, remove_lora
from .state import components, load_lora_state_dict, lora_state_dict

BLOCKS = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}


def _names(target) -> list[str]:
    return list(dict.fromkeys(n for m in components(target).values() for n in adapter_names(m)))


def load(
    target, path: str | os.PathLike, *, name: str | None = None, weight: float = 1.0, replace: bool = False
) -> str:
    """Add the LoRA in `path` (any supported format, detected) as adapter `name` (default: the file stem).

    Patches the UNet or transformer and the text encoder(s) of a pipeline, or a bare module. Returns the name.
    """
    name = name or Path(path).stem
    if name in _names(target):
        if not replace:
            raise LoraKitError(f"an adapter named {name!r} is already loaded; pass replace=True or another name")
        unload(target, name)
    state, _ = formats.read(path, target)
    load_lora_state_dict(target, state, name=name, weight=weight, source=str(path))
    return name


def unload(target, name: str) -> None:
    """Remove adapter `name` everywhere; layers left without adapters get their original modules back."""
    if name not in _names(target):
        raise LoraKitError(f"no adapter named {name!r}; loaded: {_names(target)}")
    for module in components(target).values():
        remove_lora(module, name)


def save(
    target,
    path: str | os.PathLike,
    *,
    name: str | None = None,
    format: str | None = None,
    dtype=None,
    metadata: Mapping[str, object] | None = None,
    force: bool = False,
) -> Path:
    """Write adapter `name` (the only one if None). format None = the architecture's default (kohya for
    SD1/SD2/SDXL, peft for SD3/FLUX); dtype None keeps the adapters' dtype."""
    return formats.write(
        path, lora_state_dict(target, name), target, format=format, dtype=dtype, metadata=metadata, force=force
    )


def collapse(target, name: str | None = None) -> None:
    """Bake adapter `name` (every enabled adapter when None) at its weight into the base weights."""
    for module in components(target).values():
        collapse_lora(module, name)


def set_weights(target, weights: Mapping[str, float | Mapping[str, float]]) -> None:
    """{name: w}: w is a float, {component: w} (e.g. {"unet": 1, "text_encoder": 0.5}), or a UNet block dict
    {"down": w, "mid": w, "up": w} (every adapted module in those blocks, convs included)."""
    comps = components(target)
    for name, w in weights.items():
        if name not in _names(target):
            raise LoraKitError(f"no adapter named {name!r}; loaded: {_names(target)}")
        spec = w if isinstance(w, Mapping) else {c: w for c in comps}
        for key, value in spec.items():
            if key in BLOCKS:
                pairs = [(p, m) for p, m in lora_modules(comps["unet"]) if p.startswith(BLOCKS[key])]
            elif key in comps:
                pairs = list(lora_modules(comps[key]))
            else:
                raise LoraKitError(
                    f"weight key {key!r} is neither a component {list(comps)} nor a block {list(BLOCKS)}"
                )
            for _, wrapper in pairs:
                if name in wrapper.adapters:
                    wrapper.adapters[name].weight = float(value)
