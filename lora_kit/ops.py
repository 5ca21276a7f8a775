"""Pure functions over canonical LoRA state dicts (dict -> dict); they never touch the filesystem."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import torch

from .state import group, ungroup


def uniform_alpha(state: Mapping[str, torch.Tensor], alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The same deltas with one alpha for every module (the most common one unless given).

    Each `up` is multiplied by alpha_i / alpha so that alpha/rank * up @ down is unchanged. diffusers 0.42
    misapplies files whose per-module alphas differ; with one alpha diffusers, ComfyUI and A1111 agree.
    """
    groups = group(state)
    alphas = [
        float(parts["alpha"]) if "alpha" in parts else float(parts["down"].shape[0]) for parts in groups.values()
    ]
    if not alphas:
        return dict(state)
    if alpha is None:
        alpha = Counter(alphas).most_common(1)[0][0]
    out = {}
    for (key, parts), old in zip(groups.items(), alphas, strict=True):
        up = parts["up"]
        if old != alpha:
            up = (up.float() * (old / alpha)).to(up.dtype)
        out[key] = {"down": parts["down"], "up": up, "alpha": torch.tensor(float(alpha), dtype=torch.float32)}
        if "alpha" in parts and old == alpha:
            out[key]["alpha"] = parts["alpha"]
    return ungroup(out)


def cast(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Factors in `dtype` (alphas stay fp32 scalars)."""
    if dtype is None:
        return dict(state)
    return {k: t if k.endswith(".alpha") else t.to(dtype) for k, t in state.items()}
