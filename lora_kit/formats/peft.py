"""diffusers/PEFT LoRA files: `{component}.{path}.lora_A.weight` / `.lora_B.weight`.

Read also: the older diffusers spellings `.lora.down/.lora.up`, `.lora_linear_layer.down/up` and the pre-PEFT
`attn1.processor.to_q_lora.down`. Alphas come from the `lora_adapter_metadata` header (the PEFT LoraConfig with
component-prefixed keys), else from `.alpha` tensors, else alpha = rank. Written files carry that metadata whenever
some alpha differs from its rank or a module is DoRA, so diffusers never loads them at the wrong strength.

Also read: PEFT's own standalone adapters (`save_pretrained`: a folder with `adapter_config.json` and
`adapter_model.safetensors`, keys `base_model.model.<path>.lora_A.weight`), for one model at a time.

Besides LoRA, both hold what PEFT makes of the other kinds (see canonical): DoRA (LoraConfig(use_dora=True): a
`lora_magnitude_vector` per module, (out,) for a Linear, (1, out, 1, 1) for a Conv2d, one norm per output row, read
as the canonical dora_scale (out, 1[, 1, 1])), LoHa and LoKr (LoHaConfig, LoKrConfig: the LyCORIS tensor names, but
scaled by alpha / r of the config whatever the factors, folded here into LyCORIS's rule). Written: LoRA and DoRA by
output rows; the other kinds have no PEFT/diffusers form diffusers loads, and are refused.
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
from ..state import COMPONENTS, SUFFIXES, clip_path, flatten, group, split_key
from .kind_rules import LOHA, LOKR, describe, kind_of
from .peft_config import METADATA_KEY, alpha_for, check_config, configs_of, kind_scale

_KINDS = "|".join(sorted((*LOHA, *LOKR), key=len, reverse=True))  # PEFT's LoHa/LoKr names are LyCORIS's
_SPELLINGS = [  # (regex on the key after the component, replacement giving "path.<part>")
    (r"(.+)\.lora_A(?:\.default)?\.weight", r"\1.down"),
    (r"(.+)\.lora_B(?:\.default)?\.weight", r"\1.up"),
    (r"(.+)\.lora(?:_linear_layer)?\.down\.weight", r"\1.down"),
    (r"(.+)\.lora(?:_linear_layer)?\.up\.weight", r"\1.up"),
    (r"(.+)\.processor\.(to_q|to_k|to_v)_lora\.(down|up)\.weight", r"\1.\2.\3"),
    (r"(.+)\.processor\.to_out_lora\.(down|up)\.weight", r"\1.to_out.0.\2"),
    # DoRA: PEFT and diffusers' save_lora_weights write `.lora_magnitude_vector`, diffusers' kohya converter
    # `.lora_magnitude_vector.weight`, a PEFT model's own state dict `.lora_magnitude_vector.default.weight`
    (r"(.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?", r"\1.magnitude"),
    (rf"(.+)\.({_KINDS})(?:\.default)?", r"\1.\2"),
    (r"(.+)\.alpha", r"\1.alpha"),
]


def is_peft(keys) -> bool:
    marks = (".lora", "_lora.", ".hada_", ".lokr_")
    return any(k.split(".", 1)[0] in COMPONENTS and any(m in k for m in marks) for k in keys)


def _resolve(path: str, layers: set[str]) -> str | None:
    """The model's own path for a file path (transformers 4 files say `text_model.` where 5 may not)."""
    for candidate in (path, *clip_path(path)):
        if candidate in layers:
            return candidate
    return None


def normalize(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str
) -> dict[str, torch.Tensor]:
    """PEFT/diffusers keys -> canonical `{component}.{path as stored}.<suffix>` (see canonical), alphas from the
    metadata (no model needed; `from_peft` then maps the paths onto a model)."""
    configs = configs_of(metadata, source)
    found: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        match = next(((p, r) for p, r in _SPELLINGS if re.fullmatch(p, rest)), None)
        if component not in COMPONENTS or match is None:
            unknown.append(key)
            continue
        path, _, part = re.sub(match[0], match[1], rest).rpartition(".")
        found.setdefault((component, path), {})[part] = tensor
    if unknown:
        examples = ", ".join(unknown[:3])
        raise LoraKitError(f"{source}: {len(unknown)} keys are not LoRA keys lora_kit knows, e.g. {examples}")
    mods = {f"{c}.{path}": canonical(parts, path, configs.get(c), source) for (c, path), parts in found.items()}
    return flatten(mods)


def canonical(parts: Mapping[str, torch.Tensor], path: str, config: Mapping | None, source: str) -> dict:
    """One module's PEFT tensors ({down, up, magnitude, alpha, hada_*, lokr_*}) -> its canonical parts, under
    `config` (its LoraConfig/LoHaConfig/LoKrConfig, None when the file has none):

    - LoRA: alpha from the config (alpha_for), else the file's `.alpha`, else none (alpha = rank);
    - DoRA: lora_magnitude_vector, one norm per output row whatever its shape, -> dora_scale (out, 1[, 1, 1]);
    - LoHa: alpha * (LyCORIS's rank, hada_w1_b's) / r, the same scale alpha / r;
    - LoKr: alpha * rank / r with LyCORIS's rank (of the first decomposed factor, kinds._lokr_rank); when w1 and w2
      are both whole, LyCORIS scales by 1 and PEFT by alpha / r: that scale is folded into lokr_w2 and alpha dropped.

    Without a config LoHa and LoKr tensors are taken as they are (LyCORIS's rule, a missing alpha is scale 1)."""
    out = dict(parts)
    if "magnitude" in out:
        magnitude = out.pop("magnitude")
        if "up" in out and "down" in out:  # (a module missing a factor is reported by the reader's check)
            rows = out["up"].shape[0]
            if magnitude.numel() != rows:
                raise LoraKitError(
                    f"{source}: {path}.lora_magnitude_vector has shape {tuple(magnitude.shape)}; DoRA holds one norm "
                    f"per output row ({rows})"
                )
            magnitude = magnitude.reshape(rows, *[1] * (out["down"].dim() - 1))
        out["dora_scale"] = magnitude
    kind = kind_of(out)
    if kind == "lora" and "down" in out:
        alpha = alpha_for(path, out["down"].shape[0], config)
        if alpha is not None:
            out["alpha"] = torch.tensor(alpha)
    elif kind in ("loha", "lokr") and config is not None:
        alpha, r = kind_scale(path, config)
        rank = _lycoris_rank(out)
        if rank is not None:
            out["alpha"] = torch.tensor(alpha * rank / r)
        elif "lokr_w2" in out:
            w2 = out["lokr_w2"]
            out["lokr_w2"] = (w2.float() * (alpha / r)).to(w2.dtype)
            out.pop("alpha", None)
    return out


def _lycoris_rank(parts: Mapping[str, torch.Tensor]) -> int | None:
    """The rank LyCORIS divides alpha by (kinds.loha_delta, kinds._lokr_rank), None for a LoKr of two whole
    matrices (scale 1) or factors missing (the reader's check reports them)."""
    if "hada_w1_b" in parts:
        return parts["hada_w1_b"].shape[0]
    if "lokr_w1_a" in parts:
        return parts["lokr_w1_a"].shape[1]
    if "lokr_w2_a" in parts:
        return parts["lokr_w2_a"].shape[0 if "lokr_t2" in parts else 1]
    return None


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
    CLIP text-encoder keys say `text_model.` (see _key_path); without, paths are written as they are. DoRA modules
    get PEFT's `lora_magnitude_vector` and their component's config `use_dora: true`; what PEFT cannot hold is
    refused (_writable)."""
    tensors: dict[str, torch.Tensor] = {}
    per_component: dict[str, dict[str, tuple[int, float]]] = {}
    dora: dict[str, dict[str, bool]] = {}
    for (component, path), parts in group(state).items():
        parts = _writable(component, path, parts)
        key_path = _key_path(component, path, comps)
        tensors[f"{component}.{key_path}.lora_A.weight"] = parts["down"]
        tensors[f"{component}.{key_path}.lora_B.weight"] = parts["up"]
        if "dora_scale" in parts:  # PEFT's shapes: (out,) for a Linear, (1, out, 1, 1) for a Conv2d
            shape = (-1,) if parts["down"].dim() == 2 else (1, -1, 1, 1)
            tensors[f"{component}.{key_path}.lora_magnitude_vector"] = parts["dora_scale"].reshape(shape)
        dora.setdefault(component, {})[path] = "dora_scale" in parts
        rank = parts["down"].shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        # a text encoder's LoraConfig names its paths without `text_model.`: diffusers strips that prefix from the
        # keys for a model without it (transformers 5) and PEFT matches these names as suffixes in either
        config_path = clip_path(path)[0] if component.startswith("text_encoder") else path
        per_component.setdefault(component, {})[config_path] = (rank, alpha)
    for component, flags in dora.items():  # use_dora is one flag of a LoraConfig, for every module it adapts
        if any(flags.values()) and not all(flags.values()):
            plain = next(p for p, f in flags.items() if not f)
            raise LoraKitError(
                f"PEFT/diffusers files cannot hold DoRA and plain LoRA modules in one component ({component}: "
                f"{plain} is plain); write format kohya"
            )
    metadata = {"format": "pt"}
    uses_dora = {component for component, flags in dora.items() if any(flags.values())}
    if uses_dora or any(rank != alpha for mods in per_component.values() for rank, alpha in mods.values()):
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
            if component in uses_dora:
                config[f"{component}.use_dora"] = True
        metadata[METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
    return tensors, metadata


def _writable(component: str, path: str, parts: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A module's parts as PEFT can hold them: a LoRA pair, with DoRA by output rows; a Tucker LoCon's core folded
    into its down (the same delta: kinds.fold_mid). Anything else is one LoraKitError naming the module and kind."""
    kind, why = kind_of(parts), None
    if kind != "lora" or not {"down", "up"} <= set(parts):
        why = describe({n: tuple(t.shape) for n, t in parts.items()})
    elif "dora_scale" in parts:
        rows, scale = parts["up"].shape[0], parts["dora_scale"]
        if not (scale.shape[0] == rows and scale.numel() == rows):
            why = f"DoRA by input columns (dora_scale {tuple(scale.shape)}, an older LyCORIS form)"
    if why is not None:
        raise LoraKitError(
            f"{component}.{path}: PEFT/diffusers files cannot hold a {why} module; write format kohya, or make it "
            "a plain LoRA first (lora-convert --rank)"
        )
    if "mid" in parts:
        from ..kinds import fold_mid

        parts = {n: t for n, t in parts.items() if n != "mid"} | {
            "down": fold_mid(parts["down"], parts["mid"]).to(parts["down"].dtype)
        }
    return parts


def _pattern(component: str, path: str, paths) -> str:
    """A rank_pattern key for `path`. PEFT matches a pattern as a suffix of the module path, so a bare "proj_out"
    would also give every single_transformer_blocks.N.proj_out its rank: anchored ("^proj_out") as diffusers'
    load_lora_adapter writes them. A text encoder's stays a suffix (its paths start with `text_model.` in
    transformers 4 and not in 5, as diffusers' text-encoder loader leaves them) unless it ends another path."""
    if component.startswith("text_encoder") and not any(q.endswith("." + path) for q in paths):
        return path
    return f"^{path}"


STANDALONE_CONFIG = "adapter_config.json"
_STANDALONE_KEY = re.compile(
    rf"base_model\.model\.(.+)\.(lora_A|lora_B|lora_magnitude_vector|{_KINDS})(?:\.default)?(?:\.weight)?"
)
_PARTS = {  # peft_type -> {tensor name in its keys: the part canonical() takes}
    "LORA": {"lora_A": "down", "lora_B": "up", "lora_magnitude_vector": "magnitude"},
    "LOHA": {n: n for n in LOHA},
    "LOKR": {n: n for n in LOKR},
}


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
    adapter's (if two do, e.g. SDXL's two CLIPs, pass the module itself). A LoraConfig (use_dora too), LoHaConfig or
    LoKrConfig; scales follow the config (see canonical): lora_alpha or alpha, alpha_pattern, rank_pattern, and
    rsLoRA's alpha / sqrt(r) scale as alpha * sqrt(r).
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
    if kind not in _PARTS:
        raise LoraKitError(f"{p}: a PEFT {kind} adapter; lora_kit reads PEFT's LoRA, DoRA, LoHa and LoKr adapters")
    config = check_config(config, f"{folder / STANDALONE_CONFIG}: ")
    if p.suffix in files.PICKLES:
        tensors, metadata = files.tensor_dict(files.load_pickle(p, allow_pickle), p), {}
    else:
        tensors, metadata = files.load(p)
    factors, unknown = {}, []
    for key, tensor in tensors.items():
        m = _STANDALONE_KEY.fullmatch(key)
        if m is None or m[2] not in _PARTS[kind]:
            unknown.append(key)
        else:
            factors.setdefault(m[1], {})[_PARTS[kind][m[2]]] = tensor
    if unknown:
        examples = ", ".join(unknown[:3])
        raise LoraKitError(f"{p}: {len(unknown)} keys are not PEFT {kind} factors lora_kit reads, e.g. {examples}")
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
        if kind == "LORA" and not {"down", "up"} <= set(parts):
            raise LoraKitError(f"{p}: {path} needs both lora_A and lora_B")
        if kind == "LORA" and config.get("use_dora") and "magnitude" not in parts:
            raise LoraKitError(f"{p}: {path} has no lora_magnitude_vector, but the config says use_dora")
        suffix = {part: s for s, part in SUFFIXES.items()}
        prefix = f"{component}.{resolved[path]}."
        out.update({prefix + suffix[n]: t for n, t in canonical(parts, path, config, str(p)).items()})
    return out, metadata
