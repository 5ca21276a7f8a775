"""diffusers/PEFT LoRA files: `{component}.{path}.lora_A.weight` / `.lora_B.weight`.

Read also: the older diffusers spellings `.lora.down/.lora.up`, `.lora_linear_layer.down/up` and the pre-PEFT
`attn1.processor.to_q_lora.down`. Alphas come from the `lora_adapter_metadata` header (the PEFT LoraConfig with
component-prefixed keys), else from `.alpha` tensors, else alpha = rank. Written files carry that metadata whenever
some alpha differs from its rank, so diffusers never loads them at the wrong strength.

Also read: PEFT's own standalone adapters (`save_pretrained`: a folder with `adapter_config.json` and
`adapter_model.safetensors`, keys `base_model.model.<path>.lora_A.weight`), for one model at a time.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import LoraKitError
from ..inject import _layers
from ..state import COMPONENTS, clip_path, group, split_key
from .peft_config import METADATA_KEY, alpha_for, check_config, configs_of

_SPELLINGS = [  # (regex on the key after the component, replacement giving "path.down" / "path.up")
    (r"(.+)\.lora_A(?:\.default)?\.weight", r"\1.down"),
    (r"(.+)\.lora_B(?:\.default)?\.weight", r"\1.up"),
    (r"(.+)\.lora(?:_linear_layer)?\.down\.weight", r"\1.down"),
    (r"(.+)\.lora(?:_linear_layer)?\.up\.weight", r"\1.up"),
    (r"(.+)\.processor\.(to_q|to_k|to_v)_lora\.(down|up)\.weight", r"\1.\2.\3"),
    (r"(.+)\.processor\.to_out_lora\.(down|up)\.weight", r"\1.to_out.0.\2"),
    (r"(.+)\.alpha", r"\1.alpha"),
]


def is_peft(keys) -> bool:
    return any(k.split(".", 1)[0] in COMPONENTS and (".lora" in k or "_lora." in k) for k in keys)


def _resolve(path: str, layers: set[str]) -> str | None:
    """The model's own path for a file path (transformers 4 files say `text_model.` where 5 may not)."""
    for candidate in (path, *clip_path(path)):
        if candidate in layers:
            return candidate
    return None


def normalize(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str
) -> dict[str, torch.Tensor]:
    """PEFT/diffusers keys -> `{component}.{path as stored}.lora_down.weight/.lora_up.weight/.alpha`, alphas from
    the metadata (no model needed; `from_peft` then maps the paths onto a model)."""
    configs = configs_of(metadata, source)
    out, unknown = {}, []
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        match = next(((p, r) for p, r in _SPELLINGS if re.fullmatch(p, rest)), None)
        if component not in COMPONENTS or match is None:
            unknown.append(key)
            continue
        path, _, part = re.sub(match[0], match[1], rest).rpartition(".")
        suffix = {"down": "lora_down.weight", "up": "lora_up.weight", "alpha": "alpha"}[part]
        out[f"{component}.{path}.{suffix}"] = tensor
    if unknown:
        examples = ", ".join(unknown[:3])
        raise LoraKitError(f"{source}: {len(unknown)} keys are not LoRA keys lora_kit knows, e.g. {examples}")
    for (component, path), parts in group(out).items():
        if "down" not in parts:
            continue  # a module missing a factor is reported by the reader's check (dispatch.checked)
        alpha = alpha_for(path, parts["down"].shape[0], configs.get(component))
        if alpha is not None:
            out[f"{component}.{path}.alpha"] = torch.tensor(alpha)
    return out


def spelling(stem: str) -> tuple[str, str]:
    """(what module a stored `component.path` stem names, the stem lora_kit writes for it), without a model: a CLIP
    text encoder's paths may leave out `text_model.` (transformers 5); lora_kit writes it, as diffusers does."""
    component, _, path = stem.partition(".")
    if not component.startswith("text_encoder"):
        return stem, stem
    canonical, written = clip_path(path)
    return f"{component}.{canonical}", f"{component}.{written}"


def from_peft(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], comps: Mapping[str, nn.Module], source: str
) -> dict[str, torch.Tensor]:
    layers = {c: {p for p, _ in _layers(m)} for c, m in comps.items()}
    out, unknown, owner = {}, [], {}
    for key, tensor in normalize(tensors, metadata, source).items():
        stem, _ = split_key(key)
        component, _, path = stem.partition(".")
        resolved = _resolve(path, layers[component]) if component in layers else None
        if resolved is None:
            unknown.append(key)
            continue
        first = owner.setdefault(f"{component}.{resolved}", stem)
        if first != stem:  # with and without `text_model.`: the last one read would win silently
            raise LoraKitError(f"{source}: {first} and {stem} name one module ({component}.{resolved}); keep one")
        out[key.replace(stem, f"{component}.{resolved}", 1)] = tensor
    if unknown:
        raise LoraKitError(f"{source}: {len(unknown)} keys name no layer of this model, e.g. {', '.join(unknown[:3])}")
    return out


def _key_path(component: str, path: str, comps: Mapping[str, nn.Module] | None) -> str:
    """The path a key names: a CLIP text encoder's with `text_model.` (transformers 5's CLIPTextModel has none), the
    spelling of diffusers' own files and the only one ComfyUI's key map knows."""
    module = (comps or {}).get(component)
    return clip_path(path)[1] if module is not None and "CLIP" in type(module).__name__ else path


def to_peft(
    state: Mapping[str, torch.Tensor], comps: Mapping[str, nn.Module] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Canonical dict (one alpha for all modules) -> (PEFT tensors, header metadata). With the model's components,
    CLIP text-encoder keys say `text_model.` (see _key_path); without, paths are written as they are."""
    tensors: dict[str, torch.Tensor] = {}
    per_component: dict[str, dict[str, tuple[int, float]]] = {}
    for (component, path), parts in group(state).items():
        key_path = _key_path(component, path, comps)
        tensors[f"{component}.{key_path}.lora_A.weight"] = parts["down"]
        tensors[f"{component}.{key_path}.lora_B.weight"] = parts["up"]
        rank = parts["down"].shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        # a text encoder's LoraConfig names its paths without `text_model.`: diffusers strips that prefix from the
        # keys for a model without it (transformers 5) and PEFT matches these names as suffixes in either
        config_path = clip_path(path)[0] if component.startswith("text_encoder") else path
        per_component.setdefault(component, {})[config_path] = (rank, alpha)
    metadata = {"format": "pt"}
    if any(rank != alpha for mods in per_component.values() for rank, alpha in mods.values()):
        config = {}
        for component, mods in per_component.items():
            alphas = {alpha for _, alpha in mods.values()}
            if len(alphas) != 1:
                raise LoraKitError("PEFT files need one alpha per component; make the alphas uniform first")
            common = Counter(rank for rank, _ in mods.values()).most_common(1)[0][0]
            config[f"{component}.r"] = common
            config[f"{component}.lora_alpha"] = alphas.pop()
            config[f"{component}.rank_pattern"] = {
                _pattern(component, p, mods): r for p, (r, _) in mods.items() if r != common
            }
            config[f"{component}.target_modules"] = sorted(mods)
        metadata[METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
    return tensors, metadata


def _pattern(component: str, path: str, paths) -> str:
    """A rank_pattern key for `path`. PEFT matches a pattern as a suffix of the module path, so a bare "proj_out"
    would also give every single_transformer_blocks.N.proj_out its rank: anchored ("^proj_out") as diffusers'
    load_lora_adapter writes them. A text encoder's stays a suffix (its paths start with `text_model.` in
    transformers 4 and not in 5, as diffusers' text-encoder loader leaves them) unless it ends another path."""
    if component.startswith("text_encoder") and not any(q.endswith("." + path) for q in paths):
        return path
    return f"^{path}"


STANDALONE_CONFIG = "adapter_config.json"
_STANDALONE_KEY = re.compile(r"base_model\.model\.(.+)\.lora_(A|B)(?:\.default)?\.weight")


def is_standalone(path) -> bool:
    """A `save_pretrained` folder, or the adapter_model file inside one."""
    p = Path(path)
    if p.is_dir():
        return (p / STANDALONE_CONFIG).is_file()
    return p.is_file() and p.name.startswith("adapter_model.") and (p.parent / STANDALONE_CONFIG).is_file()


def read_standalone(
    path, comps: Mapping[str, nn.Module], allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A PEFT standalone adapter -> (canonical dict, metadata) for the one component whose layers it names.

    With a bare module, that module; with a pipeline, the component whose Linear/Conv2d paths include all of the
    adapter's (if two do, e.g. SDXL's two CLIPs, pass the module itself). Alphas follow the config: lora_alpha,
    alpha_pattern, and rsLoRA's alpha / sqrt(r) scale as alpha * sqrt(r).
    """
    from . import files

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    if p.is_dir():
        p = next((folder / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (folder / n).is_file()), p)
        if p == folder:
            raise LoraKitError(f"{folder}: has {STANDALONE_CONFIG} but no adapter_model.safetensors")
    try:
        config = json.loads((folder / STANDALONE_CONFIG).read_text())
        assert isinstance(config, dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AssertionError):
        raise LoraKitError(f"{folder / STANDALONE_CONFIG}: not a JSON object") from None
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise LoraKitError(f"{p}: a PEFT {kind} adapter; lora_kit reads LoRA adapters only")
    config = check_config(config, f"{folder / STANDALONE_CONFIG}: ")
    if config.get("use_dora"):
        raise LoraKitError(f"{p}: a DoRA adapter (use_dora); lora_kit does not read DoRA yet")
    if p.suffix in files.PICKLES:
        tensors, metadata = files.tensor_dict(files.load_pickle(p, allow_pickle), p), {}
    else:
        tensors, metadata = files.load(p)
    factors, unknown = {}, []
    for key, tensor in tensors.items():
        m = _STANDALONE_KEY.fullmatch(key)
        if m is None:
            unknown.append(key)
        else:
            factors.setdefault(m[1], {})["down" if m[2] == "A" else "up"] = tensor
    if unknown:
        examples = ", ".join(unknown[:3])
        raise LoraKitError(f"{p}: {len(unknown)} keys are not LoRA factors lora_kit reads, e.g. {examples}")
    fits = {}
    for component, module in comps.items():
        layers = {q for q, _ in _layers(module)}
        resolved = {path: _resolve(path, layers) for path in factors}
        if None not in resolved.values():
            fits[component] = resolved
    if len(fits) != 1:
        why = "matches no" if not fits else f"matches several ({', '.join(fits)}):"
        example = next(iter(factors), "(none)")
        raise LoraKitError(
            f"{p}: the adapter (e.g. {example}) {why} component of this model; load it into the module it was made for"
        )
    ((component, resolved),) = fits.items()
    out = {}
    for path, parts in factors.items():
        if set(parts) != {"down", "up"}:
            raise LoraKitError(f"{p}: {path} needs both lora_A and lora_B")
        prefix = f"{component}.{resolved[path]}."
        out[prefix + "lora_down.weight"] = parts["down"]
        out[prefix + "lora_up.weight"] = parts["up"]
        out[prefix + "alpha"] = torch.tensor(alpha_for(path, parts["down"].shape[0], config))
    return out, metadata
