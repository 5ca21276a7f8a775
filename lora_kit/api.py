"""The Python API on a diffusers pipeline (or a bare UNet/transformer/text encoder): load, save, collapse, weights,
step schedules, fused mode."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from . import embeddings, formats
from . import schedule as schedules
from .errors import LoraKitError, finite
from .formats import embeddings as ti_files
from .formats.dispatch import bare_component
from .inject import adapter_names, check_in_memory, collapse_lora, lora_modules, remove_lora
from .models import ARCH_TAG
from .state import COMPONENT_TAG, check_fits, components, given_dtype, load_lora_state_dict, lora_state_dict

BLOCKS = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}
FUSED = "_lora_kit_fused"  # on a component module: lora_kit.fuse was called, so adapters loaded later fuse too


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


def default_name(path: str | os.PathLike) -> str:
    """The adapter name `load` gives a file: its stem (a folder: its name), dots as underscores (module names
    cannot hold dots)."""
    p = Path(path)
    return (p.name if p.is_dir() else p.stem).replace(".", "_")


def load(
    target,
    path: str | os.PathLike,
    *,
    name: str | None = None,
    weight: float = 1.0,
    allow_pickle: bool = False,
    replace: bool = False,
    token: str | None = None,
    component: str | None = None,
) -> str:
    """Add the LoRA in `path` (any supported format, detected) as adapter `name` (default: the file stem, dots as
    underscores).

    Patches the UNet or transformer and the text encoder(s) of a pipeline, or a bare module. A bare text encoder
    takes the adapters of the encoder it is: told from the file and its class where it can be (SDXL's
    CLIPTextModelWithProjection is text_encoder_2), else `component="text_encoder_2"` says it; it then keeps that
    name for `save`. A textual-inversion embedding file adds its tokens instead, and a LoRA brings its
    pivotal-tuning sidecar `x.emb.safetensors` (and cloneofsimo's "<embed>" tokens or `x.ti.pt`); `token` names the
    token of a file that does not name it. Pickles are read only with allow_pickle (weights_only). `replace=True`
    swaps the adapter of that name for the file's (its tokens may be reused); the name keeps its step schedule
    when the new adapter is in the UNet/transformer. Nothing changes on error. Returns the name.
    """
    p = Path(path)
    name, weight = name or default_name(p), finite(weight, "weight")
    if "." in name:
        raise LoraKitError(f"adapter name {name!r} contains '.', which torch module names cannot hold")
    if name in _names(target) and not replace:
        raise LoraKitError(f"an adapter named {name!r} is already loaded; pass replace=True or another name")
    with _playing(target, _role(target, path, component)):
        _load(target, path, name, weight, allow_pickle, token)
    return name


def _role(target, path, component: str | None) -> tuple[str | None, str | None]:
    if not isinstance(target, nn.Module):
        if component is not None:
            raise LoraKitError(f"component={component!r} is for a bare module; a pipeline names its own components")
        return None, None
    return bare_component(target, path, component)


@contextmanager
def _playing(target, role: tuple[str | None, str | None]):
    """A bare module plays component `role[0]` (state.component_name reads it) of architecture `role[1]`
    (models.architecture reads it; None keeps what it was) from here on; undone on error."""
    component, arch = role
    if component is None:
        yield
        return
    module = getattr(target, "_orig_mod", target)
    before = {tag: module.__dict__.get(tag) for tag in (COMPONENT_TAG, ARCH_TAG)}
    module.__dict__[COMPONENT_TAG] = component
    if arch is not None:
        module.__dict__[ARCH_TAG] = arch
    try:
        yield
    except BaseException:
        module.__dict__.update(before)
        raise


def _load(target, path, name: str, weight: float, allow_pickle: bool, token: str | None) -> None:
    if ti_files.is_embedding_file(path, target, allow_pickle):
        state, embeds = {}, ti_files.read(path, target, token=token, allow_pickle=allow_pickle)
    else:
        state, _ = formats.read(path, target, allow_pickle=allow_pickle)
        embeds = ti_files.read_bundled(path, target, token=token, allow_pickle=allow_pickle)
    replacing = name in _names(target)
    pairs, owned = ti_files.encoders(target), _records(target).get(name, {}) if replacing else {}
    for component, tokens in embeds.items():  # before the model changes: every token new (or the replaced one's)
        embeddings.check_new(*pairs[component], tokens, where=str(path), leaving=owned.get(component, ()))
    if replacing:  # everything checked: now the old adapter goes (its schedule stays with the name)
        if state:
            check_fits(target, state, source=str(path))
        _remove(target, name)
    if state:
        load_lora_state_dict(target, state, name=name, weight=weight, source=str(path))
    added = {c: embeddings.add_tokens(*pairs[c], tokens) for c, tokens in embeds.items()}
    if added:
        _records(target, create=True)[name] = added
    _follow_changes(target)


def _follow_changes(target) -> None:
    """Adapters came or went: fused components fuse the new wrappers, schedules re-collect their adapters."""
    for module in components(target).values():
        if getattr(module, FUSED, False):
            _set_fused(module, True)
    schedules.refresh(target)


def unload(target, name: str) -> None:
    """Remove adapter `name` everywhere (layers left without adapters get their original modules back), and the
    tokens and embedding rows its load added: the tokenizers and embedding matrices are as before the load."""
    if name not in _names(target):
        raise LoraKitError(f"no adapter named {name!r}; loaded: {_names(target)}")
    _remove(target, name)
    _follow_changes(target)


def _remove(target, name: str) -> None:
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
    component: str | None = None,
) -> Path:
    """Write adapter `name` (the only one if None). format None = the architecture's default (kohya for
    SD1/SD2/SDXL/FLUX, peft for SD3); dtype None = the dtype the adapter was loaded in (an fp16 file is written
    back in fp16, bit-exact), fp32 for adapters trained here or loaded from files of several dtypes. `component`
    says which text encoder a bare one is (as in `load`)."""
    with _playing(target, _role(target, None, component) if component is not None else (None, None)):
        state = lora_state_dict(target, name)
        dtype = dtype or given_dtype(target, name)
        return formats.write(path, state, target, format=format, dtype=dtype, metadata=metadata, force=force)


def collapse(target, name: str | None = None) -> None:
    """Bake adapter `name` (every enabled adapter when None) at its weight into the base weights."""
    if name is not None and name not in _names(target):
        raise LoraKitError(f"no adapter named {name!r}; loaded: {_names(target)}")
    scheduled = [n for n in schedules.scheduled_names(target) if name is None or n == name]
    if scheduled:
        raise LoraKitError(f"adapters {scheduled} have a step schedule, which cannot be baked in: unschedule first")
    for module in components(target).values():  # every component checked before any changes
        check_in_memory(module)
    for module in components(target).values():
        collapse_lora(module, name)


def set_weights(target, weights: Mapping[str, float | Mapping[str, float] | Sequence[float] | str]) -> None:
    """Set the user weight of each named adapter. {name: w} where w is

    - a float: every module of every component;
    - a dict of components and/or UNet blocks: {"unet": 1.0, "text_encoder": 0.5} (A1111's te:unet pair), or
      {"down": w, "mid": w, "up": w} (every adapted module in those blocks, convs included), or both at once:
      a block key is the more specific and wins over "unet" in its block, whatever the dict order
      ({"unet": 0.8, "down": 0.2} == {"down": 0.2, "unet": 0.8}); components and blocks left out keep their weights;
    - a kohya "LBW" block vector (a list, or a comma-separated string), as in sd-webui-lora-block-weight, which
      sets every module: BASE (the text encoders), IN00.., M00, OUT00.. in SGM block numbering. Full layouts have
      26 entries for SD1/SD2 and 20 for SDXL (BASE, IN00-IN11, M00, OUT00-OUT11 / BASE, IN00-IN08, M00,
      OUT00-OUT08); the short 17 (SD1/SD2: BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03-OUT11) and 12
      (SDXL: BASE, IN04, IN05, IN07, IN08, M00, OUT00-OUT05) name the attention blocks only, the others get 1, as
      do modules outside every block (time embedding, conv_out). lora_kit.schedule.block_id maps a module path.
    """
    if not isinstance(weights, Mapping):
        raise LoraKitError(f"weights {weights!r}: give a dict {{adapter name: weight}}")
    comps, settings = components(target), []  # (adapter, weight): all checked before any is set
    for name, w in weights.items():
        if name not in _names(target):
            raise LoraKitError(f"no adapter named {name!r}; loaded: {_names(target)}")
        if isinstance(w, str | Sequence):
            for component, paths in schedules.block_vector(comps, w).items():
                for path, wrapper in lora_modules(comps[component]):
                    if name in wrapper.adapters:
                        settings.append((wrapper.adapters[name], paths[path]))
            continue
        spec = w if isinstance(w, Mapping) else {c: w for c in comps}
        for key, value in sorted(spec.items(), key=lambda kv: kv[0] in BLOCKS):  # components, then blocks over them
            if key in BLOCKS and "unet" in comps:
                pairs = [(p, m) for p, m in lora_modules(comps["unet"]) if p.startswith(BLOCKS[key])]
            elif key in comps:
                pairs = list(lora_modules(comps[key]))
            else:
                raise LoraKitError(
                    f"weight key {key!r} is neither a component {list(comps)} nor a block {list(BLOCKS)}"
                )
            value = finite(value, f"weight of {name!r} ({key})")
            settings += [(wrapper.adapters[name], value) for _, wrapper in pairs if name in wrapper.adapters]
    for adapter, value in settings:
        adapter.weight = value


def _set_fused(module: nn.Module, fused: bool) -> None:
    for _, wrapper in lora_modules(module):
        wrapper.fused = fused
        wrapper.invalidate()
    setattr(module, FUSED, fused)


def fuse(target) -> None:
    """Fused mode: each adapted layer runs its base op once on base weight + the weighted deltas, composed in fp32
    and cached, recomposed only when a weight, schedule factor or tensor changes. The base weights are never
    written, so `unfuse` (or unloading) gives back the base exactly. Costs one extra weight copy per adapted layer;
    training (gradients to the adapters) always runs unfused, and so does a layer whose base is more than its op
    (forward hooks, as accelerate's offloading adds; a subclass with its own forward, as quantised linears are)."""
    for module in components(target).values():
        _set_fused(module, True)


def unfuse(target) -> None:
    """Back to the unfused forward (cheap weight changes); the composed weights are freed."""
    for module in components(target).values():
        _set_fused(module, False)
