"""The Python API on a diffusers pipeline (or a bare UNet/transformer/text encoder): load, save, collapse, weights."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from . import embeddings, formats
from .errors import LoraKitError
from .formats import embeddings as ti_files
from .inject import adapter_names, collapse_lora, lora_modules, remove_lora
from .state import components, load_lora_state_dict, lora_state_dict

BLOCKS = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}


RECORD = "_lora_kit_tokens"  # on a pipeline: {name: {component: [tokenizer entries that load added]}}


def _records(target, create: bool = False) -> dict[str, dict[str, list[str]]]:
    if isinstance(target, nn.Module):
        return {}  # a bare module has no tokenizer, so no tokens
    if create and getattr(target, RECORD, None) is None:
        setattr(target, RECORD, {})
    records = getattr(target, RECORD, None)
    return {} if records is None else records


def _names(target) -> list[str]:
    names = dict.fromkeys(n for m in components(target).values() for n in adapter_names(m))
    names.update(dict.fromkeys(_records(target)))
    return list(names)


def load(
    target,
    path: str | os.PathLike,
    *,
    name: str | None = None,
    weight: float = 1.0,
    allow_pickle: bool = False,
    replace: bool = False,
    token: str | None = None,
) -> str:
    """Add the LoRA in `path` (any supported format, detected) as adapter `name` (default: the file stem, dots as
    underscores).

    Patches the UNet or transformer and the text encoder(s) of a pipeline, or a bare module. A textual-inversion
    embedding file adds its tokens instead, and a LoRA brings its pivotal-tuning sidecar `x.emb.safetensors` (and
    cloneofsimo's "<embed>" tokens or `x.ti.pt`); `token` names the token of a file that does not name it. Pickles are
    read only with allow_pickle (weights_only). Nothing changes on error. Returns the name.
    """
    p = Path(path)
    name = name or (p.name if p.is_dir() else p.stem).replace(".", "_")  # module names cannot hold dots
    if "." in name:
        raise LoraKitError(f"adapter name {name!r} contains '.', which torch module names cannot hold")
    if name in _names(target) and not replace:
        raise LoraKitError(f"an adapter named {name!r} is already loaded; pass replace=True or another name")
    if ti_files.is_embedding_file(path, target, allow_pickle):
        state, embeds = {}, ti_files.read(path, target, token=token, allow_pickle=allow_pickle)
    else:
        state, _ = formats.read(path, target, allow_pickle=allow_pickle)
        embeds = ti_files.read_bundled(path, target, token=token, allow_pickle=allow_pickle)
    if name in _names(target):
        unload(target, name)
    pairs = ti_files.encoders(target)
    for component, tokens in embeds.items():  # before the model changes: every token must be new
        embeddings.check_new(*pairs[component], tokens, where=str(path))
    if state:
        load_lora_state_dict(target, state, name=name, weight=weight, source=str(path))
    added = {c: embeddings.add_tokens(*pairs[c], tokens) for c, tokens in embeds.items()}
    if added:
        _records(target, create=True)[name] = added
    return name


def unload(target, name: str) -> None:
    """Remove adapter `name` everywhere (layers left without adapters get their original modules back), and the
    tokens and embedding rows its load added: the tokenizers and embedding matrices are as before the load."""
    if name not in _names(target):
        raise LoraKitError(f"no adapter named {name!r}; loaded: {_names(target)}")
    for module in components(target).values():
        remove_lora(module, name)
    pairs = ti_files.encoders(target)
    for component, entries in _records(target).pop(name, {}).items():
        embeddings.remove_tokens(*pairs[component], entries)


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
    SD1/SD2/SDXL/FLUX, peft for SD3); dtype None keeps the adapters' dtype."""
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
