"""diffusers/PEFT LoRA files: `{component}.{path}.lora_A.weight` / `.lora_B.weight`.

Read also: the older diffusers spellings `.lora.down/.lora.up`, `.lora_linear_layer.down/up` and the pre-PEFT
`attn1.processor.to_q_lora.down`. Alphas come from the `lora_adapter_metadata` header (the PEFT LoraConfig with
component-prefixed keys), else from `.alpha` tensors, else alpha = rank. Written files carry that metadata whenever
some alpha differs from its rank, so diffusers never loads them at the wrong strength.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import LoraKitError
from ..inject import _layers
from ..state import COMPONENTS, group

METADATA_KEY = "lora_adapter_metadata"
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
    for candidate in (path, path.removeprefix("text_model."), "text_model." + path):
        if candidate in layers:
            return candidate
    return None


def _alpha_for(path: str, rank: int, config: Mapping | None) -> float | None:
    if config is None:
        return None
    alpha = float(config.get("lora_alpha", config.get("r", rank)))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            alpha = float(value)
    if config.get("use_rslora"):  # scale alpha / sqrt(r) == (alpha * sqrt(r)) / r
        alpha *= math.sqrt(rank)
    return alpha


def from_peft(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], comps: Mapping[str, nn.Module], source: str
) -> dict[str, torch.Tensor]:
    configs: dict[str, dict] = {}
    if metadata.get(METADATA_KEY):
        try:
            flat = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError:
            raise LoraKitError(f"{source}: its {METADATA_KEY} header is not JSON") from None
        for key, value in flat.items():
            component, _, field = key.partition(".")
            configs.setdefault(component, {})[field] = value
    layers = {c: {p for p, _ in _layers(m)} for c, m in comps.items()}
    out, unknown = {}, []
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        match = next(((p, r) for p, r in _SPELLINGS if re.fullmatch(p, rest)), None)
        if component not in comps or match is None:
            unknown.append(key)
            continue
        path, _, part = re.sub(match[0], match[1], rest).rpartition(".")
        resolved = _resolve(path, layers[component])
        if resolved is None:
            unknown.append(key)
            continue
        suffix = {"down": "lora_down.weight", "up": "lora_up.weight", "alpha": "alpha"}[part]
        out[f"{component}.{resolved}.{suffix}"] = tensor
    if unknown:
        raise LoraKitError(f"{source}: {len(unknown)} keys name no layer of this model, e.g. {', '.join(unknown[:3])}")
    for (component, path), parts in group(out).items():
        alpha = _alpha_for(path, parts["down"].shape[0], configs.get(component))
        if alpha is not None:
            out[f"{component}.{path}.alpha"] = torch.tensor(alpha)
    return out


def to_peft(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Canonical dict (one alpha for all modules) -> (PEFT tensors, header metadata)."""
    tensors: dict[str, torch.Tensor] = {}
    per_component: dict[str, dict[str, tuple[int, float]]] = {}
    for (component, path), parts in group(state).items():
        tensors[f"{component}.{path}.lora_A.weight"] = parts["down"]
        tensors[f"{component}.{path}.lora_B.weight"] = parts["up"]
        rank = parts["down"].shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        per_component.setdefault(component, {})[path] = (rank, alpha)
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
            config[f"{component}.rank_pattern"] = {p: r for p, (r, _) in mods.items() if r != common}
            config[f"{component}.target_modules"] = sorted(mods)
        metadata[METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
    return tensors, metadata
