"""Adapter kinds besides the low-rank pair: LoHa, LoKr, (IA)^3, full diff, and DoRA's column rescale.

Each kind is one small class holding its own factors under the names LyCORIS files give them (the canonical state
dict keeps those names: `unet.<path>.hada_w1_a`, ...), and answering one question: its exact `delta(base_weight)`
(fp32, alpha / rank included, the user's weight not). The wrapper adds the deltas of a layer's adapters to the base
weight and runs the base op on the sum (the composed route: LoHa/LoKr/full deltas are not low rank, IA3's depends
on the base weight); a layer holding only plain LoRAs keeps the fast low-rank paths of layers.py.

DoRA is not a kind but an option of the additive ones (`dora_scale`, a LoRA's, LoHa's or LoKr's): the merged
weight V = W + delta is rescaled so each output row (or input column, by the shape of dora_scale) has the norm
dora_scale holds: V * dora_scale / (|V| + eps), as LyCORIS, PEFT and ComfyUI do. At a user weight w other than 1
the three disagree; lora_kit takes ComfyUI's rule, W + w * (dora(V) - W), linear in w and the base itself at 0.

Definitions follow the LyCORIS package (lycoris/functional, modules) and peft (LoHa/LoKr/`use_dora`); the tests
build adapters with their code and compare. Pure functions over tensors where they can be.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
from torch import nn

from . import functional
from .formats.kind_rules import describe, kind_of

_SERIALS = itertools.count(1 << 40)  # (disjoint from layers._SERIALS: identities only need to differ)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).float()


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Tucker rebuild LyCORIS uses for LoHa/LoKr conv factors: core t (r, r, kh, kw), a (r, out), b (r, in)
    -> (out, in, kh, kw)."""
    return torch.einsum("i j ..., i p, j r -> p r ...", t.float(), a.float(), b.float())


def _scale(alpha: torch.Tensor | None, rank: int) -> float:
    return 1.0 if alpha is None else functional.lora_scale(float(alpha), rank)


def loha_delta(p: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank; with Tucker cores each side is t x_1 a x_2 b."""
    rank = p["hada_w1_b"].shape[0]
    if "hada_t1" in p:
        w1 = _tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
        w2 = _tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
    else:
        w1 = _flat(p["hada_w1_a"]) @ _flat(p["hada_w1_b"])
        w2 = _flat(p["hada_w2_a"]) @ _flat(p["hada_w2_b"])
    return (w1 * w2 * _scale(p.get("alpha"), rank)).reshape(shape)


def _lokr_rank(p: Mapping[str, torch.Tensor]) -> int | None:
    """The rank alpha is divided by: of the first decomposed factor (LyCORIS's rank_scale); None when both are
    whole matrices (scale 1 whatever alpha says, as LyCORIS and ComfyUI take it)."""
    if "lokr_w1_a" in p:
        return p["lokr_w1_a"].shape[1]
    if "lokr_w2_a" in p:
        return p["lokr_w2_a"].shape[1] if "lokr_t2" not in p else p["lokr_w2_a"].shape[0]
    return None


def lokr_factors(p: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1, w2) of a LoKr module, fp32: w1 (out_m, in_m), w2 (out_k, in_n[, kh, kw]) with out_m * out_k = out and
    in_m * in_n = in."""
    w1 = p["lokr_w1"].float() if "lokr_w1" in p else _flat(p["lokr_w1_a"]) @ _flat(p["lokr_w1_b"])
    if "lokr_w2" in p:
        w2 = p["lokr_w2"].float()
    elif "lokr_t2" in p:
        w2 = _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    else:
        w2 = _flat(p["lokr_w2_a"]) @ _flat(p["lokr_w2_b"])
        out_k, in_n = w2.shape[0], shape[1] // w1.shape[1]
        w2 = w2.reshape(out_k, in_n, *shape[2:])
    return w1, w2


def lokr_delta(p: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """kron(w1, w2) * alpha / rank (see _lokr_rank)."""
    w1, w2 = lokr_factors(p, shape)
    w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim()))
    rank = _lokr_rank(p)
    scale = 1.0 if rank is None else _scale(p.get("alpha"), rank)
    return (torch.kron(w1, w2.contiguous()) * scale).reshape(shape)


def ia3_delta(p: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """W * w along the input channels (`on_input` set) or the output channels: IA3 scales by (1 + w)."""
    on_input = bool(p["on_input"]) if "on_input" in p else False
    axis = 1 if on_input else 0
    view = [1] * weight.dim()
    view[axis] = weight.shape[axis]
    return weight.float() * p["weight"].float().reshape(view)


def lora_delta(p: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """scale * up @ down; with a Tucker core (`lora_mid`, LyCORIS's LoCon) down is first folded through it."""
    down = fold_mid(p["down"], p["mid"]) if "mid" in p else p["down"]
    scale = _scale(p.get("alpha"), down.shape[0])
    return functional.delta(p["up"], down, scale).reshape(shape)


def fold_mid(down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """A Tucker LoCon's down (r, in, 1, 1) through its core (r, r, kh, kw) as one plain conv down (r, in, kh, kw):
    up @ fold(mid, down) is the same delta, so such a module is a plain low-rank pair."""
    return torch.einsum("i j ..., j c -> i c ...", mid.float(), _flat(down))


def additive_delta(p: Mapping[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """A module's delta before any DoRA rescale (fp32, shaped like `weight`)."""
    kind, shape = kind_of(p), tuple(weight.shape)
    if kind == "lora":
        return lora_delta(p, shape)
    if kind == "loha":
        return loha_delta(p, shape)
    if kind == "lokr":
        return lokr_delta(p, shape)
    if kind == "ia3":
        return ia3_delta(p, weight)
    if kind in ("full", "norm"):  # (a norm-layer diff is a full diff of the norm's weight and bias)
        diff = p.get("diff", p.get("w_norm"))
        return diff.float().reshape(shape) if diff is not None else torch.zeros(shape, device=weight.device)
    raise ValueError(f"no weight delta for a {kind} module")


def dora(merged: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """The merged weight with each output row (dora_scale (out, 1, ...)) or input column (dora_scale (1, in, ...))
    rescaled to the norm dora_scale holds; the norm + fp32 eps, as LyCORIS and ComfyUI take it."""
    merged, scale = merged.float(), dora_scale.float()
    if scale.dim() == 1:  # PEFT's lora_magnitude_vector: (out,)
        scale = scale.reshape(-1, *[1] * (merged.dim() - 1))
    if scale.shape[0] == merged.shape[0] and (scale.numel() == merged.shape[0]):
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(scale.shape)
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, merged.shape[1], *[1] * (merged.dim() - 2))
    return merged * (scale.reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps))


def apply(weight: torch.Tensor, adapters: list[tuple[Mapping[str, torch.Tensor], float]]) -> torch.Tensor:
    """The base weight with `adapters` [(parts, user weight)] applied, fp32: the additive ones summed first, then
    each DoRA one in turn on the weight so far (W + w * (dora(W + delta) - W))."""
    base = weight.float()
    out = base.clone()
    for parts, w in adapters:
        if "dora_scale" not in parts and w != 0:
            out += additive_delta(parts, weight) * w
    for parts, w in adapters:
        if "dora_scale" in parts and w != 0:
            rescaled = dora(out + additive_delta(parts, weight), parts["dora_scale"])
            out = out + (rescaled - out) * w if w != 1 else rescaled
    return out


def bias_delta(adapters: list[tuple[Mapping[str, torch.Tensor], float]]) -> torch.Tensor | None:
    """The sum of the full-diff adapters' bias deltas (`diff_b`) x their weights, fp32; None when none has one."""
    found = [p[n].float() * w for p, w in adapters for n in ("diff_b", "b_norm") if n in p and w != 0]
    return torch.stack(found).sum(0) if found else None


def needs_base(parts: Mapping) -> bool:
    """Whether the module's delta depends on the base weight (DoRA, IA3): converting it to a plain LoRA needs the
    model."""
    return "dora_scale" in parts or kind_of(parts) == "ia3"


class Strength:
    """What every adapter kind's strength means to the forward (LoraAdapter and KindAdapter alike)."""

    weight: float  # the user's strength at inference: 0 = off, 1 = as trained
    factor: float  # the step schedule's multiplier at the current denoising step (1 when unscheduled)
    enabled: bool

    @property
    def active(self) -> bool:
        """Whether the forward adds this adapter: enabled, with a nonzero weight and step factor."""
        return self.enabled and self.weight != 0 and self.factor != 0

    @property
    def effective_weight(self) -> float:
        """What the forward multiplies this adapter's delta by (besides scale): weight x factor."""
        return self.weight * self.factor


class KindAdapter(Strength, nn.Module):
    """One named adapter of a non-pair kind in a wrapper: its tensors as fp32 parameters under their file names,
    alpha as a 0-d buffer, and the user `weight`, step `factor` and `enabled` flag LoraAdapter has."""

    plain = False  # (the wrapper's low-rank fast paths do not apply)

    def __init__(self, parts: Mapping[str, torch.Tensor], device: torch.device | None = None):
        super().__init__()
        self.kind = kind_of(parts)
        self.on_input = bool(parts["on_input"]) if "on_input" in parts else None
        for name, t in parts.items():
            if name == "alpha":
                self.register_buffer("alpha", t.detach().float().reshape(()).to(device))
            elif name != "on_input":
                self.register_parameter(name, nn.Parameter(t.detach().float().to(device).clone()))
        self.weight_ = 1.0
        self.factor = 1.0
        self.enabled = True
        self.serial = next(_SERIALS)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in ("weight_", "factor", "enabled"):  # layers whose kept plans skip this adapter must see it
            from .layers import _bump

            _bump()

    # `weight` is the user's strength; nn.Module would take a `weight` attribute for IA3's parameter, which is kept
    # under `weight_ia3` in _parameters instead.
    def register_parameter(self, name, param) -> None:
        super().register_parameter("weight_ia3" if name == "weight" else name, param)

    @property
    def weight(self) -> float:
        return self.weight_

    @weight.setter
    def weight(self, value: float) -> None:
        self.weight_ = value

    def parts(self) -> dict[str, torch.Tensor]:
        """The tensors under their file names (live parameters: callers detach or clone)."""
        out = {("weight" if n == "weight_ia3" else n): p for n, p in self._parameters.items()}
        out.update(self._buffers)
        if self.on_input is not None:
            out["on_input"] = torch.tensor(int(self.on_input))
        return out

    def state_key(self) -> tuple:
        """Changes whenever this adapter's contribution can (its strengths, flag, or any tensor)."""
        tensors = tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in self._parameters.values())
        return self.serial, self.weight, self.factor, self.enabled, tensors

    def extra_repr(self) -> str:
        return f"kind={describe({n: tuple(t.shape) for n, t in self.parts().items()})}, weight={self.weight:g}"


def _linear_shape(parts: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """The (out, in) a linear LoHa/LoKr/full module's delta has, from its factors."""
    if "diff" in parts:
        return tuple(parts["diff"].shape)
    if "hada_w1_a" in parts:
        return parts["hada_w1_a"].shape[0], parts["hada_w1_b"].shape[1]
    w1 = parts["lokr_w1"].shape if "lokr_w1" in parts else (parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[1])
    w2 = parts["lokr_w2"].shape if "lokr_w2" in parts else (parts["lokr_w2_a"].shape[0], parts["lokr_w2_b"].shape[1])
    return w1[0] * w2[0], w1[1] * w2[1]


def split_rows(parts: Mapping[str, torch.Tensor], sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    """A linear adapter on a fused layer (an original checkpoint's qkv) as one adapter per part, by output rows
    (`sizes`, in fused order): each part's rows of the delta as a full `diff` (LoHa and LoKr deltas are not
    separable by rows otherwise), IA3's and DoRA's per-row vectors cut the same way. Exact: every part's delta is
    its rows of the fused one. A DoRA norm over input columns spans every row: ValueError."""
    if "lora_up.weight" in parts:  # a LoRA with DoRA (plain pairs are split by their readers): rows of up and scale
        out = sum(sizes)
        if parts.get("dora_scale") is None or parts["dora_scale"].shape[0] != out or "lora_mid.weight" in parts:
            raise ValueError("a LoRA with a DoRA norm over input columns or a Tucker core spans every part")
        ups, scales = parts["lora_up.weight"].split(sizes), parts["dora_scale"].split(sizes)
        return [{**parts, "lora_up.weight": up, "dora_scale": scale} for up, scale in zip(ups, scales, strict=True)]
    if kind_of(parts) == "ia3":
        if "on_input" in parts and bool(parts["on_input"]):
            return [dict(parts) for _ in sizes]
        return [{**parts, "weight": w} for w in parts["weight"].split(sizes)]
    if kind_of(parts) not in ("loha", "lokr", "full"):
        raise ValueError(f"a {kind_of(parts)} module is not split by split_rows")
    out = sum(sizes)
    if "dora_scale" in parts and parts["dora_scale"].shape[0] != out:
        raise ValueError("its DoRA norm is taken over input columns, which span every part")
    shape = _linear_shape(parts)
    if shape[0] != out:
        raise ValueError(f"its delta has {shape[0]} rows, the parts {out}")
    delta = additive_delta(parts, torch.empty(shape, device="meta")) if kind_of(parts) != "full" else None
    source = parts.get("diff") if delta is None else delta
    pieces = []
    for rows in torch.arange(out).split(sizes):
        piece = {} if source is None else {"diff": source[rows]}
        for name in ("diff_b", "dora_scale"):
            if name in parts:
                piece[name] = parts[name][rows]
        pieces.append(piece)
    return pieces


# --- fresh adapters to train (lora-train --adapter): LyCORIS's initialisations, each with a delta of exactly 0 ---

TRAINABLE = ("dora", "loha", "lokr")  # the kinds init_parts makes (plain LoRA: layers.LoraAdapter)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of a dimension into (m, n), m <= n, m * n = dimension: (factor, dimension / factor) when factor
    divides it, else the most balanced split whose m is at most factor (any m when factor is -1)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _kaiming(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """LyCORIS's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return nn.init.kaiming_uniform_(torch.empty(shape), a=5**0.5, generator=generator)


def _normal(shape: tuple[int, ...], std: float, generator: torch.Generator | None) -> torch.Tensor:
    return nn.init.normal_(torch.empty(shape), std=std, generator=generator)


def init_parts(
    kind: str,
    weight_shape: tuple[int, ...],
    rank: int,
    alpha: float | None = None,
    *,
    factor: int = -1,
    full_w1: bool = True,
    generator: torch.Generator | None = None,
    weight: torch.Tensor | None = None,
    init: str = "kaiming",
) -> dict[str, torch.Tensor]:
    """A fresh adapter of `kind` (dora, loha or lokr) for a Linear or Conv2d weight of `weight_shape` (out, in[, kh,
    kw]), as LyCORIS's modules start one: its delta is exactly 0. alpha None = rank. Random draws from `generator`
    (torch's global RNG when None), in LyCORIS's order, so that a seeded LyCORIS module starts from the same numbers.

    - dora: a LoRA pair (down by `init`, as lora-train's; up 0) and `dora_scale`, the norm of each output row of
      `weight` (the base weight, required): (out, 1[, 1, 1]). dora(W + 0) is W up to the eps of the norm's division
      (W * |W| / (|W| + eps), as LyCORIS and ComfyUI compute it).
    - loha: hada_w1_a ~ N(0, 0.1), hada_w1_b and hada_w2_b ~ N(0, 1), hada_w2_a = 0 (convs flat: b (rank, in*kh*kw)).
    - lokr: out and in split by factorization(dim, factor) into w1 (out_l, in_m) x w2 (out_k, in_n[, kh, kw]); w1 whole
      (kaiming) unless not `full_w1` and rank < max(out_l, in_m) / 2 (then lokr_w1_a/b at rank, both kaiming: LyCORIS's
      decompose_both); w2 as lokr_w2_a (kaiming) @ lokr_w2_b (0) at rank unless rank >= max(out_k, in_n) / 2, where
      LyCORIS keeps it whole (0). With both whole the scale is 1 (alpha is stored as the rank, as LyCORIS does).
    """
    import math  # (here, not on top: the top of this file is another part's)

    if kind not in TRAINABLE:
        raise ValueError(f"init_parts makes {', '.join(TRAINABLE)} adapters, not {kind!r}")
    shape = tuple(int(n) for n in weight_shape)
    if len(shape) not in (2, 4):
        raise ValueError(f"weight shape {shape}: a Linear (out, in) or Conv2d (out, in, kh, kw) weight")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank {rank!r}: give a whole number >= 1")
    out, fan_in, kernel = shape[0], shape[1], shape[2:]
    alpha = float(rank if alpha is None else alpha)
    if kind == "dora":
        if weight is None or tuple(weight.shape) != shape:
            raise ValueError(f"a DoRA adapter needs the base weight of shape {shape} (its rows' norms)")
        w = weight.detach().float()
        return {
            "down": functional.init_down((rank, fan_in, *kernel), init, generator),
            "up": torch.zeros(out, rank, *[1] * len(kernel)),
            "dora_scale": w.reshape(out, -1).norm(dim=1, keepdim=True).reshape(out, *[1] * (w.dim() - 1)),
            "alpha": torch.tensor(alpha),
        }
    if kind == "loha":
        flat_in = fan_in * math.prod(kernel)
        w1_b = _normal((rank, flat_in), 1.0, generator)
        w1_a = _normal((out, rank), 0.1, generator)
        w2_b = _normal((rank, flat_in), 1.0, generator)
        return {"hada_w1_a": w1_a, "hada_w1_b": w1_b, "hada_w2_a": torch.zeros(out, rank), "hada_w2_b": w2_b,
                "alpha": torch.tensor(alpha)}  # fmt: skip
    in_m, in_n = factorization(fan_in, factor)
    out_l, out_k = factorization(out, factor)
    parts: dict[str, torch.Tensor] = {}
    whole_w2 = rank >= max(out_k, in_n) / 2
    if whole_w2:
        parts["lokr_w2"] = torch.zeros(out_k, in_n, *kernel)
    else:
        parts["lokr_w2_a"] = _kaiming((out_k, rank), generator)
        parts["lokr_w2_b"] = torch.zeros(rank, in_n * math.prod(kernel))
    whole_w1 = full_w1 or rank >= max(out_l, in_m) / 2
    if whole_w1:
        parts["lokr_w1"] = _kaiming((out_l, in_m), generator)
    else:
        parts["lokr_w1_a"] = _kaiming((out_l, rank), generator)
        parts["lokr_w1_b"] = _kaiming((rank, in_m), generator)
    parts["alpha"] = torch.tensor(float(rank) if whole_w1 and whole_w2 else alpha)
    return parts
