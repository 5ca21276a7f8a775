"""The canonical LoRA state dict <-> adapters in a model.

Canonical keys are `{component}.{module_path}.lora_down.weight`, `.lora_up.weight` and `.alpha` (0-d), where the
component is `unet`, `transformer`, `text_encoder`, `text_encoder_2` or `text_encoder_3` and the module path is the
diffusers/transformers module name. Order carries no meaning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from . import offload, quantize
from .errors import LoraKitError, finite
from .formats import kind_rules
from .formats.check import module_problem
from .inject import _layers, adapter_names, attach_adapter, attach_kind, lora_modules
from .layers import LoraWrapper

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
# file suffix -> part name; LoRA's first (`weight`, IA3's, would match any of theirs), then the other kinds' names
SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
            **{name: name for name in kind_rules.SUFFIXES}}  # fmt: skip


COMPONENT_TAG = "_lora_kit_component"  # on a bare module: the component it was loaded as (api.load's `component`)


def component_name(module: nn.Module) -> str:
    """The pipeline component a bare module plays: the one it was loaded as (a bare text_encoder_2 gets its keys
    from a file), else unet, transformer or text_encoder by its class."""
    if module.__dict__.get(COMPONENT_TAG):
        return module.__dict__[COMPONENT_TAG]
    cls = type(module).__name__
    if "UNet" in cls:
        return "unet"
    if "Transformer" in cls and type(module).__module__.startswith("diffusers"):
        return "transformer"
    if type(module).__module__.startswith("transformers"):
        return "text_encoder"
    raise LoraKitError(f"cannot tell which pipeline component a {cls} is; pass a pipeline or a UNet/transformer")


def components(target) -> dict[str, nn.Module]:
    """{component: module} of a diffusers pipeline, or {name: module} for a bare module. A compiled module
    (`torch.compile(pipe.unet)`) stands for the module it compiles: paths and keys are the module's own, and the
    compiled one follows every change (dynamo's guards see it)."""
    if isinstance(target, nn.Module):
        target = getattr(target, "_orig_mod", target)
        return {component_name(target): target}
    found = {c: getattr(target, c) for c in COMPONENTS if isinstance(getattr(target, c, None), nn.Module)}
    found = {c: getattr(m, "_orig_mod", m) for c, m in found.items()}
    if not found:
        raise LoraKitError(f"{type(target).__name__} has no unet, transformer or text encoder to put adapters in")
    return found


def clip_path(path: str, sep: str = ".") -> tuple[str, str]:
    """(a CLIP text encoder's module path without `text_model`, the path LoRA files spell for it). transformers 4
    (and CLIPTextModelWithProjection) nest the text model under `text_model.`, transformers 5's CLIPTextModel does
    not; files say `text_model.` (diffusers', ComfyUI's and sd-scripts' spelling), except the layers outside the
    text model (`text_projection`). `sep` "_" for kohya's flattened names. The one place of this rule."""
    canonical = path.removeprefix(f"text_model{sep}")
    return canonical, canonical if canonical == "text_projection" else f"text_model{sep}{canonical}"


def split_key(key: str) -> tuple[str, str]:
    """'unet.a.b.lora_down.weight' -> ('unet.a.b', 'down'): the module stem and which part the tensor is."""
    for suffix, part in SUFFIXES.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], part
    raise LoraKitError(f"{key!r} is not a LoRA key (<module>.lora_down.weight / .lora_up.weight / .alpha)")


def modules(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{stem: {'down', 'up', 'alpha'}}. The stem is whatever precedes the suffix: 'unet.<path>' in a canonical
    dict, 'lora_unet_<...>' in a kohya file; the ops work on either."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        stem, part = split_key(key)
        out.setdefault(stem, {})[part] = tensor
    return out


def flatten(mods: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    inverse = {part: suffix for suffix, part in SUFFIXES.items()}
    return {f"{stem}.{inverse[part]}": t for stem, parts in mods.items() for part, t in parts.items()}


def group(state: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """Canonical dict -> {(component, path): {'down', 'up', 'alpha'}}."""
    return {tuple(stem.split(".", 1)): parts for stem, parts in modules(state).items()}


def ungroup(groups: Mapping[tuple[str, str], Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return flatten({f"{c}.{p}": parts for (c, p), parts in groups.items()})


def plain_pair(parts: Mapping) -> bool:
    """Whether a module's tensors are a plain LoRA pair (down, up, alpha): the kind the fast paths run."""
    return set(parts) <= {"down", "up", "alpha"}


def alpha_of(parts: Mapping[str, torch.Tensor]) -> float:
    """A module's alpha; a file without one means alpha = rank (scale 1), as in kohya and ComfyUI."""
    return float(parts["alpha"]) if "alpha" in parts else float(parts["down"].shape[0])


def only_adapter_name(target) -> str:
    names: dict[str, None] = {}
    for module in components(target).values():
        names.update(dict.fromkeys(adapter_names(module)))
    if len(names) != 1:
        raise LoraKitError(f"say which adapter: the model has {list(names) or 'none'}")
    return next(iter(names))


def lora_state_dict(target, name: str | None = None) -> dict[str, torch.Tensor]:
    """The canonical state dict of adapter `name` (the only one if None) across the target's components."""
    name = name or only_adapter_name(target)
    state: dict[str, torch.Tensor] = {}
    for component, module in components(target).items():
        for path, wrapper in lora_modules(module):
            if name in wrapper.adapters:
                a = wrapper.adapters[name]
                prefix = f"{component}.{path}."
                if not a.plain:  # another kind: its tensors under their file names
                    suffix = {part: s for s, part in SUFFIXES.items()}
                    state.update({prefix + suffix[n]: t.detach().clone() for n, t in a.parts().items()})
                    continue
                offload.reclaim([a], strict=False)  # (offloaded after the load: its values are in accelerate's map)
                state[prefix + "lora_down.weight"] = a.down.detach().clone()
                state[prefix + "lora_up.weight"] = a.up.detach().clone()
                state[prefix + "alpha"] = a.alpha.detach().clone()
    if not state:
        raise LoraKitError(f"no adapter named {name!r} in the model")
    return state


def given_dtype(target, name: str | None = None) -> torch.dtype | None:
    """The dtype adapter `name`'s factors were given in, when every module of it came from a state dict (a file)
    in one dtype: what `save` writes unless told, so file -> memory -> file is bit-exact. None (fp32) for adapters
    made here (trained, injected) or gathered from several dtypes."""
    name = name or only_adapter_name(target)
    found = {
        getattr(wrapper.adapters[name], "given_dtype", None)
        for module in components(target).values()
        for _, wrapper in lora_modules(module)
        if name in wrapper.adapters
    }
    return found.pop() if len(found) == 1 else None


def _check_group(component: str, path: str, parts: Mapping, layers: dict | None, name: str) -> str | None:
    """Why this (component, path) cannot take these factors, or None when it fits."""
    if layers is None:
        return f"{component}.{path}: the model has no component {component!r}"
    if path not in layers:
        return f"{component}.{path}: no such Linear/Conv2d in the {component}"
    layer = layers[path]
    if isinstance(layer, LoraWrapper) and name in layer.adapters:
        return f"{component}.{path}: already has an adapter named {name!r}"
    base = layer.base if isinstance(layer, LoraWrapper) else layer
    shape = quantize.shape(base)  # (as its op sees it: a 4-bit weight is packed)
    if not plain_pair(parts):
        shapes = {part: tuple(t.shape) for part, t in parts.items()}
        problem = module_problem(shapes, shape)
        for name in ("diff_b", "b_norm"):
            if problem is None and name in parts and (base.bias is None or parts[name].numel() != base.bias.numel()):
                problem = f"{name} {shapes[name]} does not fit the layer's bias ({type(base).__name__})"
        return None if problem is None else f"{component}.{path}: {problem}"
    if "down" not in parts or "up" not in parts:
        return f"{component}.{path}: lora_down and lora_up must both be present"
    down, up = parts["down"], parts["up"]
    rank = down.shape[0]
    fan_in = math.prod(shape[1:])
    if down.numel() != rank * fan_in or up.numel() != shape[0] * rank or up.shape[:2] != (shape[0], rank):
        return (
            f"{component}.{path}: down {tuple(down.shape)} / up {tuple(up.shape)} do not fit a layer with weight "
            f"{shape}"
        )
    return None


def check_fits(target, state: Mapping[str, torch.Tensor], name: str = "", source: str = "state dict") -> dict:
    """The state's modules grouped (see group), once every one names a Linear/Conv2d of `target` (a pipeline or a
    module) whose weight its factors fit and that has no adapter `name` yet; else LoraKitError naming `source` and
    the first mismatches."""
    layers = {c: dict(_layers(m, norms=True)) for c, m in components(target).items()}
    groups = group(state)
    problems = [p for (c, path), parts in groups.items() if (p := _check_group(c, path, parts, layers.get(c), name))]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise LoraKitError(f"{source} does not fit the model: {'; '.join(problems[:3])}{more}")
    return groups


def load_lora_state_dict(
    target, state: Mapping[str, torch.Tensor], name: str = "default", weight: float = 1.0, source: str = "state dict"
) -> list[str]:
    """Inject adapter `name` from a canonical state dict; returns 'component.path' of every adapted layer.

    Everything is checked before the model is touched: an unknown module, a missing factor or a shape that does
    not fit raises LoraKitError naming `source` and the first mismatches, and leaves the model as it was.
    """
    comps, weight = components(target), finite(weight, "weight")
    groups = check_fits(target, state, name, source)
    done = []
    for (component, path), parts in groups.items():
        if not plain_pair(parts):
            adapter = attach_kind(comps[component], path, name, parts)
            adapter.weight = weight
            dtypes = {t.dtype for n, t in parts.items() if n not in ("alpha", "on_input")}
            adapter.given_dtype = dtypes.pop() if len(dtypes) == 1 else None
            done.append(f"{component}.{path}")
            continue
        down = parts["down"]
        rank = down.shape[0]
        adapter = attach_adapter(comps[component], path, name, rank, alpha_of(parts))
        with torch.no_grad():
            adapter.down.copy_(down.reshape(adapter.down.shape).float())
            adapter.up.copy_(parts["up"].reshape(adapter.up.shape).float())
        adapter.weight = weight
        adapter.given_dtype = down.dtype if parts["up"].dtype == down.dtype else None  # what `save` writes back
        done.append(f"{component}.{path}")
    return done
