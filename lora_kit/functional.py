"""The LoRA maths, once: every merge, collapse, extract and forward path goes through these functions.

A linear adapter is `down` (r, in) and `up` (out, r); a conv adapter is `down` (r, in, kh, kw), applied with the
base conv's stride/padding/dilation, and `up` (out, r, 1, 1). The delta added to the base weight is

    delta = weight * scale * up @ down        (scale = alpha / rank, fixed by training; weight = the user's)

reshaped to the base weight's shape. Deltas are computed in fp32; `compose` is the one exception, the inference
forward's transient base + delta in the compute dtype.
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


def compose(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """`weight + up @ down` as one multiply-add in the tensors' own dtype (no fp32 copies), shaped like `weight`:
    the inference forward's transient fused weight, where `up` already carries each adapter's weight x scale and
    `down`/`up` may hold several adapters concatenated along the rank. `weight` must be contiguous."""
    if weight.dim() == up.dim() == down.dim() == 2:  # a linear: runs on every wrapped layer, so no reshapes
        return torch.addmm(weight, up, down)
    return torch.addmm(weight.flatten(1), up.flatten(1), down.flatten(1)).view(weight.shape)


def flat(matrix: torch.Tensor) -> torch.Tensor:
    """A delta (out, in[, kh, kw]) as the fp32 matrix (out, in*kh*kw) that SVD works on."""
    return matrix.reshape(matrix.shape[0], -1).float()


def factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, shape: torch.Size):
    """`(up, down)` of rank `rank` from an SVD of `flat(delta)`, shaped by `delta`'s conventions.

    The singular values are split as sqrt(S) on each side so both factors have the same magnitude (this keeps
    fp16 storage well conditioned).
    """
    rank = min(rank, s.shape[0])
    root = s[:rank].sqrt()
    up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
    if len(shape) > 2:
        return up.reshape(shape[0], rank, 1, 1).contiguous(), down.reshape(rank, *shape[1:]).contiguous()
    return up.contiguous(), down.contiguous()


def factorize(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors `(up, down)` of a delta by a full SVD: `up @ down ~= matrix`."""
    u, s, vh = torch.linalg.svd(flat(matrix), full_matrices=False)
    return factors(u, s, vh, rank, matrix.shape)


def factorize_fast(
    matrix: torch.Tensor, rank: int, oversample: int = 8, iterations: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors by randomized SVD (Halko et al.): a range finder with `iterations` power steps on
    rank + oversample random directions, then an exact SVD of the small projected matrix. On deltas with a
    decaying spectrum the error is within a hair of the full SVD's at a fraction of the cost; when the rank asked
    for is close to the matrix size it falls back to the full SVD."""
    m = flat(matrix)
    k = min(rank + oversample, *m.shape)
    if k >= min(m.shape) // 2:
        return factorize(matrix, rank)
    g = torch.Generator(device=m.device).manual_seed(seed)
    transpose = m.shape[0] < m.shape[1]  # work on the tall orientation: the range basis stays small
    a = m.T if transpose else m
    q, _ = torch.linalg.qr(a @ torch.randn(a.shape[1], k, generator=g, device=m.device))
    for _ in range(iterations):
        q, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ q)
    ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    u = q @ ub
    if transpose:  # a = m.T = u s vh  =>  m = vh.T s u.T
        u, vh = vh.T, u.T
    return factors(u, s, vh, rank, matrix.shape)


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
