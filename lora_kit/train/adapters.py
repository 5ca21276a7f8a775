"""The adapters a training run adds to a model: LoRA pairs (inject_lora), or another kind (--adapter dora, loha,
lokr) made by kinds.init_parts on each targeted layer, and their trainable tensors by canonical suffix (checkpoints).

Every kind takes the same targets, ranks and alphas as LoRA: --rank/--alpha, --conv-rank/--conv-alpha on kxk convs
(locon), --text-encoder-rank/--text-encoder-alpha on the text encoders.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import kinds, quantize
from ..errors import LoraKitError
from ..inject import attach_kind, inject_lora, lora_parameters, targeted
from ..layers import LoraWrapper
from ..state import SUFFIXES
from ..targets import layer_kind
from .config import TrainConfig


def add(module: nn.Module, cfg: TrainConfig, name: str, targets: str, rank: int, alpha: float | None, *,
        conv_rank: int | None = None, conv_alpha: float | None = None) -> list[nn.Parameter]:  # fmt: skip
    """Add adapter `name` of kind cfg.adapter to the targeted layers of `module`; returns its trainable tensors."""
    if cfg.adapter == "lora":
        inject_lora(module, targets, rank=rank, alpha=alpha, name=name, conv_rank=conv_rank, conv_alpha=conv_alpha,
                    dropout=cfg.dropout, init=cfg.init)  # fmt: skip
        return list(lora_parameters(module, name))
    plan = []
    for path in targeted(module, targets):
        layer = module.get_submodule(path)
        base = layer.base if isinstance(layer, LoraWrapper) else layer
        use_conv = conv_rank is not None and layer_kind(base) == "conv"
        r, a = (conv_rank, conv_alpha) if use_conv else (rank, alpha)
        shape = quantize.shape(base)
        limit = min(shape[0], math.prod(shape[1:]))
        if cfg.adapter == "dora" and r > limit:  # (a LoRA pair's rule; LoHa and LoKr take any rank, as LyCORIS does)
            raise LoraKitError(f"rank {r} is larger than min(in, out) = {limit} of {path}")
        plan.append((path, base, r, a))
    for path, base, r, a in plan:  # everything checked: now change the model
        parts = kinds.init_parts(cfg.adapter, quantize.shape(base), r, a, factor=cfg.lokr_factor,
                                 full_w1=cfg.lokr_full_w1, weight=quantize.dense(base), init=cfg.init)  # fmt: skip
        attach_kind(module, path, name, parts)
    return list(lora_parameters(module, name))


def trainable_tensors(adapter: nn.Module) -> dict[str, torch.Tensor]:
    """An adapter's live trainable tensors under their canonical suffixes (`lora_down.weight`, `hada_w1_a`, ...):
    what a checkpoint holds of it besides alpha, and what --resume copies back."""
    if adapter.plain:
        return {"lora_down.weight": adapter.down, "lora_up.weight": adapter.up}
    suffix = {part: s for s, part in SUFFIXES.items()}
    return {suffix[n]: t for n, t in adapter.parts().items() if isinstance(t, nn.Parameter)}
