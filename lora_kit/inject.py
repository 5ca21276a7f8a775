"""Put adapters into any nn.Module, and take them out again: inject, remove, collapse, weights, iteration."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from . import quantize
from .errors import LoraKitError, finite
from .layers import LoraAdapter, LoraWrapper, is_norm, wrap
from .targets import Target, layer_kind, resolve


def _layers(module: nn.Module, prefix: str = "", norms: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """(path, layer) for every Linear/Conv2d or wrapper below `module`, not descending into wrappers; with `norms`
    the affine LayerNorm/GroupNorm layers too (what LyCORIS's norm-layer diffs adapt)."""
    for child_name, child in module.named_children():
        path = f"{prefix}{child_name}"
        if isinstance(child, LoraWrapper) or layer_kind(child) is not None or norms and is_norm(child):
            yield path, child
        else:
            yield from _layers(child, path + ".", norms)


def _base(layer: nn.Module) -> nn.Module:
    return layer.base if isinstance(layer, LoraWrapper) else layer


def a_module(model) -> nn.Module:
    """`model` if it is a torch module; else LoraKitError (a pipeline passed where one of its models is meant)."""
    if not isinstance(model, nn.Module):
        raise LoraKitError(
            f"{type(model).__name__} is not a torch module: pass one of a pipeline's models (pipe.unet, "
            "pipe.text_encoder); load, save, set_weights, fuse and collapse take the whole pipeline"
        )
    return model


def find_targets(model: nn.Module, targets: str | Target | Sequence) -> list[str]:
    """Paths of the layers of `model` that `targets` selects, in module order."""
    a_module(model)
    selected: dict[str, None] = {}
    for target in resolve(targets):
        pattern = re.compile(target.children) if target.children else None
        if target.parents:
            classes = target.parent_classes()
            parents = [(p + ".", m) for p, m in model.named_modules() if classes and isinstance(m, classes)]
        else:
            parents = [("", model)]
        for parent_path, parent in parents:
            for rel, layer in _layers(parent):
                if layer_kind(_base(layer)) in target.kinds and (pattern is None or pattern.fullmatch(rel)):
                    selected[(parent_path + rel).lstrip(".")] = None
    paths = set(selected)
    return [p for p, _ in _layers(model) if p in paths]


def targeted(model: nn.Module, targets: str | Target | Sequence) -> list[str]:
    """find_targets, refusing targets that select no layer (a preset for another kind of model, such as `dit` on
    a UNet) in one line that names them and some layers the model has."""
    paths = find_targets(model, targets)
    if not paths:
        examples = [p for p, _ in _layers(model)][:6]
        names = targets if isinstance(targets, str) else [t for t in resolve(targets)]
        raise LoraKitError(
            f"no layer of {type(model).__name__} matches targets {names!r}; "
            f"it has layers such as {', '.join(examples) or '(none)'}"
        )
    return paths


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def inject_lora(
    model: nn.Module,
    targets: str | Target | Sequence = "attn",
    rank: int = 16,
    alpha: float | None = None,
    name: str = "default",
    *,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    dropout: float = 0.0,
    init: str = "kaiming",
    paths: Sequence[str] | None = None,
) -> list[str]:
    """Add adapter `name` to every targeted layer (or exactly `paths`); returns the wrapped paths.

    alpha defaults to rank (scale 1). Convs with kernels larger than 1x1 use conv_rank/conv_alpha when given (kohya's
    conv_dim/conv_alpha). A layer that is already wrapped gets the new adapter in its existing wrapper.
    """
    a_module(model)
    if paths is None:
        paths = targeted(model, targets)
    plan = []
    for path in paths:
        layer = model.get_submodule(path)
        use_conv = conv_rank is not None and layer_kind(_base(layer)) == "conv"
        r, a = (conv_rank, conv_alpha) if use_conv else (rank, alpha)
        wrapper = layer if isinstance(layer, LoraWrapper) else None
        if wrapper is not None and name in wrapper.adapters:
            raise LoraKitError(f"{path} already has an adapter named {name!r}")
        shape = quantize.shape(_base(layer))
        limit = min(shape[0], math.prod(shape[1:]))
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise LoraKitError(f"rank {r!r} of {path}: give a whole number >= 1")
        if r > limit:
            raise LoraKitError(f"rank {r} is larger than min(in, out) = {limit} of {path}")
        if a is not None and finite(a, f"alpha of {path}") <= 0:
            raise LoraKitError(f"alpha {a!r} of {path}: it must be above 0")
        plan.append((path, layer, r, a))
    if not 0 <= finite(dropout, "dropout") < 1:
        raise LoraKitError(f"dropout {dropout!r}: it must be in [0, 1)")
    for path, _, r, a in plan:  # everything validated: now change the model
        attach_adapter(model, path, name, r, a, dropout=dropout, init=init)
    return list(paths)


def attach_adapter(
    model: nn.Module,
    path: str,
    name: str,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    init: str = "kaiming",
) -> LoraAdapter:
    """Add one adapter to the layer at `path`, wrapping it first unless it is already wrapped. The wrapper and the
    adapter take the train/eval mode of the layer they join (an adapter loaded into an eval pipeline is in eval
    mode: no dropout, and the inference forward's kept plan; trainers switch their adapters to training)."""
    layer = model.get_submodule(path)
    wrapper = layer if isinstance(layer, LoraWrapper) else wrap(layer).train(layer.training)
    adapter = wrapper.add_adapter(name, rank, alpha, dropout=dropout, init=init).train(wrapper.training)
    if wrapper is not layer:
        _set_module(model, path, wrapper)
    return adapter


def attach_kind(model: nn.Module, path: str, name: str, parts) -> nn.Module:
    """As attach_adapter, for an adapter of another kind given by its tensors (kinds.KindAdapter)."""
    layer = model.get_submodule(path)
    wrapper = layer if isinstance(layer, LoraWrapper) else wrap(layer).train(layer.training)
    adapter = wrapper.add_kind(name, parts).train(wrapper.training)
    if wrapper is not layer:
        _set_module(model, path, wrapper)
    return adapter


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraWrapper]]:
    """(path, wrapper) for every wrapped layer."""
    a_module(model)
    for path, layer in _layers(model):
        if isinstance(layer, LoraWrapper):
            yield path, layer


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, wrapper in lora_modules(model):
        names.update(dict.fromkeys(wrapper.adapters))
    return list(names)


def remove_lora(model: nn.Module, name: str | None = None) -> list[str]:
    """Remove adapter `name` (all adapters when None); a wrapper left empty is replaced by its original module."""
    touched = []
    for path, wrapper in list(lora_modules(model)):
        if name is not None:
            if name not in wrapper.adapters:
                continue
            del wrapper.adapters[name]
        if name is None or len(wrapper.adapters) == 0:
            _set_module(model, path, wrapper.base)
        touched.append(path)
    return touched


def check_in_memory(model: nn.Module) -> None:
    """LoraKitError unless every adapted layer's base weight holds values: sequential CPU offload keeps them on the
    meta device (accelerate streams them in per call), where nothing can be baked into them."""
    for path, wrapper in lora_modules(model):
        quantize.refuse(wrapper.base, f"{type(model).__name__}.{path}", "collapsing")
        if wrapper.base.weight.is_meta:
            raise LoraKitError(
                f"cannot collapse into {type(model).__name__}.{path}: its base weight is on the meta device "
                "(sequential CPU offload holds it elsewhere); collapse before enabling the offload"
            )


def collapse_lora(model: nn.Module, name: str | None = None) -> list[str]:
    """Bake adapter `name` (every enabled adapter when None), at its weight, into the base weights and remove it.

    The deltas are summed in fp32 and every one is checked for finiteness before any base weight is written; each
    is computed twice (checked, then added) rather than kept, so that memory holds one delta at a time, not an fp32
    copy of every adapted weight (lora-merge into an SD1.5-sized checkpoint: peak memory 1.68x the file size with
    them kept, 1.20x now).
    """
    check_in_memory(model)
    chosen = [(p, w) for p, w in lora_modules(model) if name is None or name in w.adapters]
    for path, wrapper in chosen:
        bias = wrapper.bias_delta(name)
        if not torch.isfinite(wrapper.delta_weight(name)).all() or bias is not None and not bias.isfinite().all():
            raise LoraKitError(f"the LoRA delta of {path} is not finite (NaN/inf); nothing was collapsed")
    for _, wrapper in chosen:
        w, b, bias = wrapper.base.weight, wrapper.base.bias, wrapper.bias_delta(name)
        with torch.no_grad():
            w.copy_((w.float() + wrapper.delta_weight(name)).to(w.dtype))
            if bias is not None:  # (a full diff's diff_b)
                b.copy_((b.float() + bias).to(b.dtype))
    remove_lora(model, name)
    return [p for p, _ in chosen]


def set_weight(model: nn.Module, name: str, weight: float, paths: Sequence[str] | None = None) -> int:
    """Set the user weight of adapter `name` (on `paths` only, when given); returns how many modules changed."""
    wanted, weight = set(paths) if paths is not None else None, finite(weight, "weight")
    n = 0
    for path, wrapper in lora_modules(model):
        if name in wrapper.adapters and (wanted is None or path in wanted):
            wrapper.adapters[name].weight = weight
            n += 1
    if n == 0:
        raise LoraKitError(f"no adapter named {name!r} in {type(model).__name__}; adapters: {adapter_names(model)}")
    return n


def tune_lora_scale(model: nn.Module, weight: float) -> None:
    """cloneofsimo-compatible alias: set the user weight of every adapter."""
    weight = finite(weight, "weight")
    for _, wrapper in lora_modules(model):
        for adapter in wrapper.adapters.values():
            adapter.weight = weight


def enable_lora(model: nn.Module, name: str | None = None, enabled: bool = True) -> None:
    for _, wrapper in lora_modules(model):
        for n, adapter in wrapper.adapters.items():
            if name is None or n == name:
                adapter.enabled = enabled


@contextmanager
def lora_disabled(*models: nn.Module) -> Iterator[None]:
    """Inside the block every enabled adapter of the models is switched off (added token embeddings stay as they
    are); exactly those are switched back on afterwards."""
    switched = [a for m in models for _, w in lora_modules(m) for a in w.adapters.values() if a.enabled]
    for adapter in switched:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter in switched:
            adapter.enabled = True


def extract_lora_ups_down(model: nn.Module, name: str | None = None) -> Iterator[tuple[nn.Parameter, nn.Parameter]]:
    """cloneofsimo's iterator: `(up, down)` for every LoRA pair (or those of adapter `name`) in module order; adapters
    of other kinds (kinds.KindAdapter: LoHa, LoKr, DoRA, ...) have no such pair and are left out (lora_parameters
    gives their tensors)."""
    for _, wrapper in lora_modules(model):
        for n, adapter in wrapper.adapters.items():
            if (name is None or n == name) and adapter.plain:
                yield adapter.up, adapter.down


def lora_parameters(model: nn.Module, name: str | None = None) -> Iterator[nn.Parameter]:
    """Every trainable tensor of adapter `name` (of every adapter when None), in module order: down then up of a
    LoRA pair, every factor of another kind (LoHa's hada_*, LoKr's lokr_*, DoRA's down, up and dora_scale)."""
    for _, wrapper in lora_modules(model):
        for n, adapter in wrapper.adapters.items():
            if name is None or n == name:
                yield from (adapter.down, adapter.up) if adapter.plain else adapter.parameters()
