"""cloneofsimo/lora files (legacy, read only): positional `.pt` lists and "safeloras" `.safetensors`.

Neither format names modules: tensor i belongs to the i-th layer of cloneofsimo's module walk (`_find_modules_v2`):
for every module whose *class name* is a target (in `model.named_modules()` order), each Linear below it (recursing,
in `named_modules()` order). Loading replays that walk on the given model, so a file applies only to the
architecture it was trained on; counts and shapes are checked and any mismatch is an error. There is no alpha:
the effective scale is 1 (alpha = rank), as in cloneofsimo's loaders.

- `.pt`: a pickled list `[up0, down0, up1, down1, ...]`; `x.pt` is the UNet, `x.text_encoder.pt` the text encoder
  (read together when both are there). Linears only, as cloneofsimo's `monkeypatch_or_replace_lora`.
- `.safetensors`: keys `{component}:{i}:up` / `:down`; metadata `{component}` = JSON list of target class names and
  `{component}:{i}:rank`. Convs count too (`monkeypatch_or_replace_lora_extended`: a layer is skipped when the next
  tensor's dimensionality does not fit it). Tensors whose metadata is "<embed>" are textual-inversion tokens, read by
  `formats.embeddings`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import LoraKitError
from ..inject import _layers
from ..layers import LoraWrapper

UNET_TARGETS = ("CrossAttention", "Attention", "GEGLU")  # "CrossAttention" is the class's pre-0.12 diffusers name
TEXT_ENCODER_TARGETS = ("CLIPAttention",)
EMBED_FLAG = "<embed>"
_KEY = re.compile(r"(\w+):(\d+):(up|down)")


def is_legacy(keys) -> bool:
    return any(_KEY.fullmatch(k) for k in keys)


def default_targets(component: str) -> tuple[str, ...]:
    return UNET_TARGETS if component in ("unet", "transformer") else TEXT_ENCODER_TARGETS


def walk(model: nn.Module, classes: Sequence[str], convs: bool = False) -> list[tuple[str, nn.Module]]:
    """(path, layer) in cloneofsimo's order; a lora_kit wrapper counts as the layer it wraps."""
    kinds = (nn.Linear, nn.Conv2d) if convs else (nn.Linear,)
    found = []
    for parent_path, parent in model.named_modules():
        if type(parent).__name__ in classes:
            for rel, layer in _layers(parent):
                base = layer.base if isinstance(layer, LoraWrapper) else layer
                if isinstance(base, kinds):
                    found.append((f"{parent_path}.{rel}" if parent_path else rel, base))
    if len({p for p, _ in found}) != len(found):  # a target class nested in another: the order is ambiguous
        raise LoraKitError(f"target classes {list(classes)} are nested in {type(model).__name__}; cannot replay")
    return found


def _fits(layer: nn.Module, up: torch.Tensor, down: torch.Tensor) -> bool:
    w = layer.weight
    if down.dim() != w.dim() or up.dim() != w.dim() or up.shape[1] != down.shape[0]:
        return False
    return down.shape[1:] == w.shape[1:] and up.shape[0] == w.shape[0] and all(s == 1 for s in up.shape[2:])


def assign(
    component: str,
    model: nn.Module,
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    classes: Sequence[str],
    convs: bool,
    source: str,
) -> dict[str, torch.Tensor]:
    """Canonical entries for `pairs` [(up, down), ...] laid onto the model's walk, with alpha = rank (scale 1)."""
    layers = walk(model, classes, convs)
    out: dict[str, torch.Tensor] = {}
    i = 0
    for path, layer in layers:
        if i == len(pairs):
            raise LoraKitError(
                f"{source}: has {len(pairs)} {component} modules but the model has more layers under {list(classes)} "
                f"(first unmatched: {path}); it was made for another architecture"
            )
        up, down = pairs[i]
        if convs and down.dim() != layer.weight.dim():
            continue  # cloneofsimo's extended patcher skips a layer whose kind the next tensor does not fit
        if not _fits(layer, up, down):
            raise LoraKitError(
                f"{source}: {component} module {i} ({path}): up {tuple(up.shape)} / down {tuple(down.shape)} do not "
                f"fit its weight {tuple(layer.weight.shape)}; the file was made for another architecture"
            )
        prefix = f"{component}.{path}."
        out[prefix + "lora_down.weight"] = down
        out[prefix + "lora_up.weight"] = up
        out[prefix + "alpha"] = torch.tensor(float(down.shape[0]))
        i += 1
    if i != len(pairs):
        raise LoraKitError(
            f"{source}: has {len(pairs)} {component} modules but the model has {i} layers under {list(classes)} "
            "that take them; it was made for another architecture"
        )
    return out


def from_safeloras(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], comps: Mapping[str, nn.Module], source: str
) -> dict[str, torch.Tensor]:
    """A cloneofsimo `.safetensors` -> canonical dict (only the components in `comps`; embeddings are skipped)."""
    parts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    foreign = []
    for key, tensor in tensors.items():
        m = _KEY.fullmatch(key)
        if m:
            parts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = tensor
        elif metadata.get(key) != EMBED_FLAG:
            foreign.append(key)
    if foreign:
        raise LoraKitError(f"{source}: keys {foreign[:3]} are neither cloneofsimo LoRA tensors nor <embed> tokens")
    single = len(comps) == 1  # a bare module takes its own part of the file
    missing = [c for c in parts if c not in comps]
    if missing and not single:
        raise LoraKitError(f"{source}: has LoRA tensors for {missing}, which this pipeline does not have")
    out: dict[str, torch.Tensor] = {}
    for component, entries in parts.items():
        if component not in comps:
            continue
        try:
            classes = json.loads(metadata[component])
            assert isinstance(classes, list) and all(isinstance(c, str) for c in classes)
        except (KeyError, json.JSONDecodeError, AssertionError):
            raise LoraKitError(f"{source}: metadata {component!r} must list the target classes (JSON)") from None
        if sorted(entries) != list(range(len(entries))) or any(len(e) != 2 for e in entries.values()):
            raise LoraKitError(f"{source}: {component} modules must be numbered 0..n-1, each with :up and :down")
        for i, e in entries.items():
            rank = metadata.get(f"{component}:{i}:rank")
            if rank is not None and rank.strip() != str(e["down"].shape[0]):
                raise LoraKitError(
                    f"{source}: {component}:{i}:rank says {rank} but down has rank {e['down'].shape[0]}"
                )
        pairs = [(entries[i]["up"], entries[i]["down"]) for i in range(len(entries))]
        out.update(assign(component, comps[component], pairs, classes, True, source))
    if not out:
        raise LoraKitError(f"{source}: holds no cloneofsimo LoRA tensors for {' or '.join(comps)}")
    return out


def _pairs(items, source: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if not isinstance(items, list) or len(items) % 2 or not all(isinstance(t, torch.Tensor) for t in items):
        raise LoraKitError(f"{source}: a cloneofsimo .pt must hold a list [up0, down0, up1, down1, ...] of tensors")
    return [(items[i], items[i + 1]) for i in range(0, len(items), 2)]


def from_pt(items: list, path: Path, comps: Mapping[str, nn.Module], allow_pickle: bool) -> dict[str, torch.Tensor]:
    """A cloneofsimo `.pt` list -> canonical dict. Into a pipeline, `x.pt` is the UNet and `x.text_encoder.pt` the
    text encoder, and each brings the other when it is there (as cloneofsimo's `patch_pipe`)."""
    from . import files

    if len(comps) == 1:
        (component,) = comps
        return assign(
            component, comps[component], _pairs(items, str(path)), default_targets(component), False, str(path)
        )
    if "unet" not in comps:
        raise LoraKitError(f"{path}: cloneofsimo .pt files are for UNet pipelines (SD1/SD2), not this one")
    stem = path.name[: -len(path.suffix)]
    unet_path = path.with_name(stem.removesuffix(".text_encoder") + path.suffix)
    te_path = unet_path.with_name(unet_path.stem + ".text_encoder" + path.suffix)
    out: dict[str, torch.Tensor] = {}
    for component, p in (("unet", unet_path), ("text_encoder", te_path)):
        if p == path:
            lists = items
        elif p.exists():
            lists = files.load_pickle(p, allow_pickle)
        else:
            continue
        out.update(
            assign(component, comps[component], _pairs(lists, str(p)), default_targets(component), False, str(p))
        )
    return out
