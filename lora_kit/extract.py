"""Extract a LoRA from two pipelines (base, tuned): collect the targeted weights, then ops.extract."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import ops
from .errors import LoraKitError
from .inject import find_targets
from .models import architecture, open_pipeline
from .state import components

DEFAULT_TARGETS = {"unet": "locon", "transformer": "dit"}


def targeted_weights(pipe, targets: str | None, text_encoders: bool) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {'component.path': weight}} of the layers an extraction covers."""
    out = {}
    for comp, module in components(pipe).items():
        if comp.startswith("text_encoder"):
            if not text_encoders or "CLIP" not in type(module).__name__:
                continue
            preset = "clip-all"
        else:
            preset = targets or DEFAULT_TARGETS[comp]
        out[comp] = {f"{comp}.{p}": module.get_submodule(p).weight.detach() for p in find_targets(module, preset)}
    return out


def extract_pipelines(
    base: str, tuned: str, rank: int, conv_rank: int | None = None, targets: str | None = None,
    text_encoders: bool = False, fast: bool = True, min_diff: float = 0.0, progress: Callable = lambda x: x,
):  # fmt: skip
    """(LoRA state, per-module errors, total error, skipped components, the base pipeline) for BASE -> TUNED."""
    base_pipe, tuned_pipe = open_pipeline(base), open_pipeline(tuned)
    a, b = architecture(components(base_pipe)), architecture(components(tuned_pipe))
    if a != b:
        raise LoraKitError(f"{base} is {a} but {tuned} is {b}: extract needs two models of one architecture")
    base_w = targeted_weights(base_pipe, targets, text_encoders)
    tuned_w = targeted_weights(tuned_pipe, targets, text_encoders)
    merged_base, merged_tuned, skipped = {}, {}, []
    for comp, weights in base_w.items():
        diff = max(((tuned_w[comp][k].float() - w.float()).abs().max().item() for k, w in weights.items()), default=0)
        if diff <= min_diff:
            skipped.append(comp)
            continue
        merged_base.update(weights)
        merged_tuned.update(tuned_w[comp])
    if not merged_base:
        raise LoraKitError(f"{tuned} does not differ from {base} in any targeted layer")
    state, errors, total = ops.extract(merged_base, merged_tuned, rank, conv_rank, fast=fast, progress=progress)
    return state, errors, total, skipped, base_pipe
