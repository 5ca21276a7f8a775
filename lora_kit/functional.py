"""The LoRA maths, once: every merge, collapse, extract and forward path goes through these functions.

A linear adapter is `down` (r, in) and `up` (out, r); a conv adapter is `down` (r, in, kh, kw), applied with the
base conv's stride/padding/dilation, and `up` (out, r, 1, 1). The delta added to the base weight is

    delta = weight * scale * up @ down        (scale = alpha / rank, fixed by training; weight = the user's)

reshaped to the base weight's shape. Deltas are computed in fp32.
"""

from __future__ import annotations

import math

import torch


def lora_scale(alpha: float, rank: int) -> float:
    """The training-time factor alpha / rank."""
    return float(alpha) / float(rank)


def delta(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`scale * up @ down` in fp32, shaped like the base weight: (out, in) or (out, in, kh, kw)."""
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise ValueError(f"up has rank {up.shape[1]} but down has rank {rank}")
    product = up.reshape(up.shape[0], rank).float() @ down.reshape(rank, -1).float()
    return (product * scale).reshape(up.shape[0], *down.shape[1:])


def factorize(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors `(up, down)` of a delta (out, in[, kh, kw]) by SVD, with `up @ down ~= matrix`.

    The singular values are split as sqrt(S) on each side so both factors have the same magnitude (this keeps
    fp16 storage well conditioned); the shapes follow `delta`'s conventions.
    """
    out_features, rest = matrix.shape[0], matrix.shape[1:]
    flat = matrix.reshape(out_features, -1).float()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    rank = min(rank, s.shape[0])
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    if len(rest) > 1:
        return up.reshape(out_features, rank, 1, 1), down.reshape(rank, *rest)
    return up, down


def init_down(shape: tuple[int, ...], mode: str = "kaiming", generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial `down`: kaiming-uniform (a=sqrt(5), as nn.Linear/PEFT/kohya) or gaussian with std 1/rank."""
    down = torch.empty(shape)
    rank = shape[0]
    if mode == "kaiming":
        fan_in = math.prod(shape[1:])
        # kaiming_uniform_(a=sqrt(5)) gives bound = sqrt(6 / ((1 + a^2) * fan_in)) = 1 / sqrt(fan_in)
        bound = 1.0 / math.sqrt(fan_in)
        return down.uniform_(-bound, bound, generator=generator)
    if mode == "gaussian":
        return down.normal_(0.0, 1.0 / rank, generator=generator)
    raise ValueError(f"init={mode!r} is not supported; use 'kaiming' or 'gaussian'")
