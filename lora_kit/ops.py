"""Pure functions over LoRA dicts (dict -> dict); they never touch the filesystem.

A LoRA dict has keys `<stem>.lora_down.weight`, `<stem>.lora_up.weight` and `<stem>.alpha`; the stem can be a
canonical `unet.<path>` or a stored kohya name. Every delta goes through `functional`, in fp32. Modules of the other
adapter kinds (LoHa, LoKr, DoRA, IA3, full diff: lora_kit.kinds) pass through uniform_alpha and cast unchanged in
meaning; resize/rerank and merge_deltas turn any kind into a plain LoRA by an SVD of its exact delta.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral

import torch

from . import functional, kinds
from .errors import LoraKitError
from .formats.kind_rules import describe, kind_of
from .state import alpha_of, flatten, modules

LoraDict = Mapping[str, torch.Tensor]


def uniform_alpha(state: LoraDict, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The same deltas with one alpha for every LoRA module (unless given, the most common nonzero one; the most
    common rank when every alpha is 0).

    Each `up` is multiplied by alpha_i / alpha so that alpha/rank * up @ down is unchanged. diffusers 0.42
    misapplies files whose per-module alphas differ; with one alpha diffusers, ComfyUI and A1111 agree. An alpha of
    0 means scale 0 (as diffusers and ComfyUI read it; sd-scripts never stores one): that module's up becomes zeros.
    A LoRA's other tensors (a Tucker `mid`, `dora_scale`, `diff_b`) stay as they are: the rescale of up keeps the
    delta they act on. Modules of other kinds (LoHa, LoKr, IA3, full: their alpha means something else, or nothing)
    are left as they are.
    """
    mods = modules(state)
    pairs = {stem: parts for stem, parts in mods.items() if kind_of(parts) == "lora"}
    if not pairs:
        return dict(state)
    alphas = {stem: alpha_of(parts) for stem, parts in pairs.items()}
    if alpha is None:
        nonzero = [a for a in alphas.values() if a != 0]
        ranks = [parts["down"].shape[0] for parts in pairs.values()]
        alpha = Counter(nonzero or map(float, ranks)).most_common(1)[0][0]
    elif not alpha or not math.isfinite(alpha):
        raise LoraKitError(f"alpha {alpha!r}: the common alpha must be a nonzero finite number")
    out = dict(mods)
    for stem, parts in pairs.items():
        up, old = parts["up"], alphas[stem]
        if old != alpha:
            up = (up.float() * (old / alpha)).to(up.dtype)
        same = "alpha" in parts and old == alpha
        out[stem] = {**parts, "up": up, "alpha": parts["alpha"] if same else torch.tensor(float(alpha))}
    return flatten(out)


WRITABLE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
_NOT_CAST = (".alpha", ".on_input")  # a scale and IA3's flag: not factors


def cast(state: LoraDict, dtype: torch.dtype | str | None) -> dict[str, torch.Tensor]:
    """Every float tensor in `dtype` (a torch float dtype or its name: "fp16", "bf16", "fp32"), except alphas (fp32
    scalars) and IA3's `on_input` flag."""
    if dtype is None:
        return dict(state)
    dtype = WRITABLE.get(dtype, getattr(torch, dtype, None)) if isinstance(dtype, str) else dtype
    if dtype not in WRITABLE.values():
        raise LoraKitError(f"dtype {dtype!r}: LoRA factors are written as fp16, bf16, fp32 or fp64")
    return {k: t.to(dtype) if t.is_floating_point() and not k.endswith(_NOT_CAST) else t for k, t in state.items()}


def delta(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A module's full delta scale * up @ down (fp32, shaped like the base weight)."""
    return functional.delta(parts["up"], parts["down"], functional.lora_scale(alpha_of(parts), parts["down"].shape[0]))


def is_pair(parts: Mapping) -> bool:
    """A LoRA/LoCon module without DoRA (a Tucker `mid` and a `diff_b` beside it allowed): its weight delta is
    scale * up @ down, a LoRA of rank down.shape[0] as it stands."""
    return kind_of(parts) == "lora" and "dora_scale" not in parts


def _pair_shape(parts: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    kernel = parts["mid"].shape[2:] if "mid" in parts else parts["down"].shape[2:]
    return (parts["up"].shape[0], parts["down"].shape[1], *kernel)


def module_delta(parts: Mapping[str, torch.Tensor], base: torch.Tensor | None = None, stem: str = "") -> torch.Tensor:
    """The exact weight delta of one module of any kind (fp32, shaped like the layer's weight), the user weight 1:
    scale * up @ down for a LoRA pair, kinds.additive_delta for LoHa/LoKr/full, kinds.apply(base) - base for DoRA and
    IA3, whose delta depends on the base weight. `base` is the layer's weight; a meta tensor gives its shape only,
    which is all LoHa/LoKr need (their factors do not tell a conv's kernel size)."""
    if kinds.needs_base(parts):
        if base is None or base.is_meta:
            raise LoraKitError(
                f"{stem}: a {describe(_shapes(parts))} module's delta depends on the base weight; converting it needs "
                "the model (--model)"
            )
        return kinds.apply(base, [(parts, 1.0)]) - base.float()
    if is_pair(parts):
        return kinds.lora_delta(parts, tuple(base.shape) if base is not None else _pair_shape(parts))
    if base is None and "diff" in parts:
        return parts["diff"].float()
    if base is None:
        raise LoraKitError(f"{stem}: a {describe(_shapes(parts))} module's delta needs its layer's shape (the model)")
    return kinds.additive_delta(parts, base)


def _shapes(parts: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in parts.items()}


def check_pairs(loras: Sequence[LoraDict], names: Sequence[str]) -> None:
    """Refuse modules that are not LoRA pairs (merge concatenates pairs, Tucker LoCons folded; merge_deltas takes
    any kind)."""
    for lora, name in zip(loras, names, strict=True):
        for stem, parts in modules(lora).items():
            if not is_pair(parts) or "diff_b" in parts:
                raise LoraKitError(
                    f"{name}: {stem} is a {describe(_shapes(parts))} module, not a LoRA pair; merge_deltas merges it "
                    "(by SVD of the summed deltas, at a rank)"
                )


def merge(
    loras: Sequence[LoraDict], weights: Sequence[float], names: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """One LoRA whose delta is exactly sum_i weights[i] * delta_i for every module.

    Ranks are concatenated (down stacked, each up scaled by its weight and scale; a Tucker LoCon's core folded into
    its down), so nothing is approximated; modules present in only some inputs take only those. Alpha = total rank
    (scale 1). Re-compress with `rerank`. Other kinds are refused: merge_deltas sums them. `names` (the files, say)
    name the inputs in errors.
    """
    if len(loras) != len(weights):
        raise LoraKitError(f"{len(loras)} LoRAs but {len(weights)} weights")
    if not all(math.isfinite(w) for w in weights):
        raise LoraKitError(f"merge weights must be finite numbers, got {list(weights)}")
    if not any(weights):
        raise LoraKitError(f"merge weights are all 0 ({list(weights)}): the merged LoRA would hold no module")
    names = names or [f"input {i + 1}" for i in range(len(loras))]
    check_pairs(loras, names)
    all_mods = [modules(lora) for lora in loras]
    stems = list(dict.fromkeys(stem for mods in all_mods for stem in mods))
    out = {}
    for stem in stems:
        downs, ups, first = [], [], None
        for mods, w, name in zip(all_mods, weights, names, strict=True):
            parts = mods.get(stem)
            if parts is None or w == 0:
                continue
            if first is None:
                first = (name, _pair_shape(parts))
            elif _pair_shape(parts) != first[1]:
                shapes = f"({first[1]} vs {_pair_shape(parts)})"
                raise LoraKitError(
                    f"{stem}: {first[0]} and {name} disagree on its weight shape {shapes} - are they for the same "
                    "base model?"
                )
            scale = functional.lora_scale(alpha_of(parts), parts["down"].shape[0])
            downs.append(kinds.fold_mid(parts["down"], parts["mid"]) if "mid" in parts else parts["down"].float())
            ups.append(parts["up"].float() * (w * scale))
        if downs:
            down, up = torch.cat(downs, 0), torch.cat(ups, 1)
            out[stem] = {"down": down, "up": up, "alpha": torch.tensor(float(down.shape[0]))}
    return flatten(out)


def _relative(err2: float, norm2: float) -> float:
    return math.sqrt(err2 / norm2) if norm2 > 0 else 0.0


def _same(items):
    return items


@dataclass
class _Module:
    """One module to factor: its exact delta (computed when its turn comes: one fp32 delta in memory at a time), the
    LoRA pair it already is (kept when the chosen rank does not shrink it), and tensors carried beside the new pair
    (a full diff's `diff_b`)."""

    delta: Callable[[], torch.Tensor]
    pair: Mapping[str, torch.Tensor] | None = None
    extra: Mapping[str, torch.Tensor] = field(default_factory=dict)


def _refactor(
    items: Mapping[str, _Module], choose_rank: Callable[[torch.Tensor, torch.Tensor], int], progress: Callable = _same
) -> tuple[dict[str, torch.Tensor], dict[str, float], float]:
    """Re-factor every module's delta by SVD at the rank `choose_rank(delta, singular values)` picks.

    Returns (new LoRA dict with alpha = new rank, per-module relative error, total relative error: Frobenius norms of
    the delta's residual over the delta's). A LoRA pair whose chosen rank is not below its own is kept exactly as it
    is (a Tucker core folded into its down, exactly).
    """
    out, errors = {}, {}
    err2_total = norm2_total = 0.0
    for stem, item in progress(items.items()):
        d = item.delta()
        u, s, vh = torch.linalg.svd(functional.flat(d), full_matrices=False)
        rank = max(1, min(choose_rank(d, s), s.shape[0]))
        norm2 = float(s.square().sum())
        pair = item.pair
        if pair is not None and rank >= pair["down"].shape[0]:
            out[stem], err2 = _folded(pair), 0.0
        else:
            up, down = functional.factors(u, s, vh, rank, d.shape)
            out[stem] = {"down": down, "up": up, "alpha": torch.tensor(float(rank)), **item.extra}
            err2 = float(s[rank:].square().sum())
        errors[stem] = _relative(err2, norm2)
        err2_total, norm2_total = err2_total + err2, norm2_total + norm2
    return flatten(out), errors, _relative(err2_total, norm2_total)


def _folded(parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA pair with its Tucker core (`mid`) folded into down (kinds.fold_mid: the same delta, a plain pair)."""
    if "mid" not in parts:
        return dict(parts)
    down = kinds.fold_mid(parts["down"], parts["mid"]).to(parts["down"].dtype)
    return {n: t for n, t in parts.items() if n != "mid"} | {"down": down}


def fold_mids(state: LoraDict) -> dict[str, torch.Tensor]:
    """The same deltas with every Tucker LoCon (`mid`) as a plain pair: its core folded into down, exactly."""
    return flatten({stem: _folded(parts) if is_pair(parts) else parts for stem, parts in modules(state).items()})


def _items(state: LoraDict, bases: Mapping[str, torch.Tensor] | None) -> dict[str, _Module]:
    """Each module of `state` as a _Module: its delta by module_delta (`bases` {stem: layer weight} for the kinds
    whose delta needs the layer's shape or values); a module holding only a bias delta has no weight delta: refused,
    it cannot become a LoRA."""
    bases = bases or {}
    out = {}
    for stem, parts in modules(state).items():
        if kind_of(parts) == "full" and "diff" not in parts:
            raise LoraKitError(f"{stem}: holds only a bias delta (diff_b); no LoRA can hold it")
        if kind_of(parts) not in ("lora", "loha", "lokr", "ia3", "full"):
            raise LoraKitError(f"{stem}: a {describe(_shapes(parts))} module changes no weight; no LoRA can hold it")
        extra = {"diff_b": parts["diff_b"]} if "diff_b" in parts else {}
        out[stem] = _Module(
            lambda p=parts, s=stem: module_delta(p, bases.get(s), s), parts if is_pair(parts) else None, extra
        )
    return out


def _is_kxk(d: torch.Tensor) -> bool:
    return d.dim() == 4 and tuple(d.shape[2:]) != (1, 1)


def check_ranks(**ranks: int | None) -> None:
    """Refuse a rank below 1 (None: not given), naming it: `check_ranks(rank=r, conv_rank=c)`."""
    for name, value in ranks.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value < 1):
            raise LoraKitError(f"{name} must be a whole number >= 1, got {value!r}")


def rerank(
    state: LoraDict,
    rank: int,
    conv_rank: int | None = None,
    progress: Callable = _same,
    bases: Mapping[str, torch.Tensor] | None = None,
):
    """Best rank-`rank` approximation of every module (convs larger than 1x1: `conv_rank` if given); modules of any
    kind (`bases` as for resize)."""
    check_ranks(rank=rank, conv_rank=conv_rank)
    return _refactor(_items(state, bases), _chooser(rank, None, conv_rank), progress)


DYNAMIC = {  # kohya resize_lora's rules -> (what the parameter may be, is it allowed)
    "sv_ratio": ("a finite number >= 1", lambda p: 1 <= p < math.inf),
    "sv_fro": ("in (0, 1]", lambda p: 0 < p <= 1),
    "sv_cumulative": ("in (0, 1]", lambda p: 0 < p <= 1),
}


def check_dynamic(method: str, param: float) -> None:
    """Refuse an unknown dynamic rule or a parameter outside its range (NaN included), before any work."""
    if method not in DYNAMIC:
        raise LoraKitError(f"dynamic method {method!r} is not one of {', '.join(DYNAMIC)}")
    allowed, ok = DYNAMIC[method]
    if isinstance(param, bool) or not isinstance(param, int | float):
        raise LoraKitError(f"{method} must be a number ({allowed}), got {param!r}")
    if not ok(param):
        raise LoraKitError(f"{method} must be {allowed}, got {param:g}")


def dynamic_rank(s: torch.Tensor, method: str, param: float) -> int:
    """kohya resize_lora's rules: sv_ratio keeps singular values above S[0]/param; sv_cumulative keeps the shortest
    prefix whose share of sum(S) reaches param; sv_fro the same for the Frobenius norm (sum S^2 reaching param^2).
    The result is clamped to [1, len(S) - 1]."""
    check_dynamic(method, param)
    if method == "sv_ratio":
        index = int((s > s[0] / param).sum())
    elif method == "sv_cumulative":
        index = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), param)) + 1
    else:
        sq = s.square()
        index = int(torch.searchsorted(torch.cumsum(sq, 0) / sq.sum(), param**2)) + 1
    if s[0] <= 1e-6:
        return 1
    return max(1, min(index, len(s) - 1))


def check_resize(rank: int | None, dynamic: tuple[str, float] | None, conv_rank: int | None) -> None:
    """Refuse resize arguments that cannot work (no rule, a rank below 1, a dynamic rule out of range)."""
    if rank is None and dynamic is None:
        raise LoraKitError("give a rank, a dynamic rule, or both")
    check_ranks(rank=rank, conv_rank=conv_rank)
    if dynamic:
        if not (isinstance(dynamic, tuple | list) and len(dynamic) == 2):
            raise LoraKitError(f"dynamic {dynamic!r}: give (method, number), e.g. ('sv_fro', 0.9)")
        check_dynamic(*dynamic)


def resize(
    state: LoraDict,
    rank: int | None = None,
    dynamic: tuple[str, float] | None = None,
    conv_rank: int | None = None,
    progress: Callable = _same,
    bases: Mapping[str, torch.Tensor] | None = None,
):
    """Shrink every module to `rank` or by a dynamic rule (capped at `rank` when both are given), keeping each
    delta's strength. Modules of other kinds (LoHa, LoKr, DoRA, IA3, full) become LoRA pairs, their exact delta
    factored the same way (module_delta; `bases` {stem: the layer's weight}: a meta tensor for the shape LoHa/LoKr
    need, the real weight for DoRA/IA3); a full diff's `diff_b` stays beside its new pair. Returns (LoRA dict,
    per-module relative error, total relative error)."""
    check_resize(rank, dynamic, conv_rank)
    return _refactor(_items(state, bases), _chooser(rank, dynamic, conv_rank), progress)


def _chooser(rank: int | None, dynamic: tuple[str, float] | None, conv_rank: int | None) -> Callable:
    def choose(d: torch.Tensor, s: torch.Tensor) -> int:
        cap = conv_rank if conv_rank and _is_kxk(d) else rank
        k = dynamic_rank(s, *dynamic) if dynamic else cap
        return min(k, cap) if cap else k

    return choose


def merge_deltas(
    loras: Sequence[LoraDict],
    weights: Sequence[float],
    rank: int | None = None,
    conv_rank: int | None = None,
    dynamic: tuple[str, float] | None = None,
    bases: Mapping[str, torch.Tensor] | None = None,
    names: Sequence[str] | None = None,
    progress: Callable = _same,
):
    """One LoRA approximating sum_i weights[i] * delta_i per module, for modules of any kind: each delta exact
    (module_delta, `bases` as for resize), their weighted sum factored by SVD at `rank` / `dynamic` as resize does
    (full diffs' `diff_b` summed the same way and kept beside the pair). Modules whose every input is a LoRA pair
    are concatenated exactly first (merge) and kept when no larger than the rank asked for. Returns (LoRA dict,
    per-module relative error, total relative error)."""
    check_resize(rank, dynamic, conv_rank)
    if len(loras) != len(weights):
        raise LoraKitError(f"{len(loras)} LoRAs but {len(weights)} weights")
    if not all(math.isfinite(w) for w in weights) or not any(weights):
        raise LoraKitError(f"merge weights must be finite numbers, not all 0, got {list(weights)}")
    names = names or [f"input {i + 1}" for i in range(len(loras))]
    all_mods = [modules(lora) for lora in loras]
    stems = list(dict.fromkeys(stem for mods in all_mods for stem in mods))
    items = {}
    for stem in stems:
        given = [(mods[stem], w, n) for mods, w, n in zip(all_mods, weights, names, strict=True) if stem in mods and w]
        if not given:
            continue
        if all(is_pair(p) and "diff_b" not in p for p, _, _ in given):
            pair = modules(merge([flatten({stem: p}) for p, _, _ in given], [w for _, w, _ in given]))[stem]
            items[stem] = _Module(lambda p=pair, s=stem: module_delta(p, (bases or {}).get(s), s), pair)
            continue
        biases = [p["diff_b"].float() * w for p, w, _ in given if "diff_b" in p]
        extra = {"diff_b": torch.stack(biases).sum(0)} if biases else {}
        items[stem] = _Module(lambda g=given, s=stem: _summed(g, (bases or {}).get(s), s), None, extra)
    return _refactor(items, _chooser(rank, dynamic, conv_rank), progress)


def _summed(given: list, base: torch.Tensor | None, stem: str) -> torch.Tensor:
    """sum w * delta over [(parts, w, input name)], every delta the same shape (else an error naming both inputs)."""
    total, first = None, None
    for parts, w, name in given:
        if kind_of(parts) not in ("lora", "loha", "lokr", "ia3", "full"):
            raise LoraKitError(f"{name}: {stem} is a {describe(_shapes(parts))} module, which no LoRA can hold")
        if kind_of(parts) == "full" and "diff" not in parts:
            continue  # (a bias delta only: summed into diff_b)
        d = module_delta(parts, base, stem) * w
        if total is None:
            total, first = d, name
        elif d.shape != total.shape:
            raise LoraKitError(
                f"{stem}: {first} and {name} disagree on its weight shape ({tuple(total.shape)} vs {tuple(d.shape)}) "
                "- are they for the same base model?"
            )
        else:
            total += d
    if total is None:
        raise LoraKitError(f"{stem}: holds only bias deltas (diff_b); no LoRA can hold them")
    return total


def extract(
    base: Mapping[str, torch.Tensor],
    tuned: Mapping[str, torch.Tensor],
    rank: int,
    conv_rank: int | None = None,
    fast: bool = True,
    progress: Callable = _same,
) -> tuple[dict[str, torch.Tensor], dict[str, float], float]:
    """A LoRA approximating tuned - base for every stem ({stem: weight}; both must have the same stems and shapes),
    by SVD in fp32.

    `fast` uses the randomized SVD (functional.factorize_fast), whose error on real weight deltas is within ~0.5% of
    the full SVD's. Returns (LoRA dict with alpha = rank, per-module relative error, total relative error).
    """
    check_ranks(rank=rank, conv_rank=conv_rank)
    mismatch = shape_mismatch(base, tuned)
    if mismatch:
        raise LoraKitError(f"base and tuned {mismatch}")
    for which, weights in (("base", base), ("tuned", tuned)):  # no SVD of NaN or inf (a LinAlgError)
        bad = next((stem for stem, w in weights.items() if not w.isfinite().all()), None)
        if bad is not None:
            raise LoraKitError(f"{which} weight {bad} holds NaN or inf; extract needs finite weights")
    out, errors = {}, {}
    err2_total = norm2_total = 0.0
    for stem, w_base in progress(base.items()):
        w_tuned = tuned[stem]
        d = w_tuned.float() - w_base.float()
        r = min(conv_rank if conv_rank and _is_kxk(d) else rank, *functional.flat(d).shape)
        up, down = (functional.factorize_fast if fast else functional.factorize)(d, r)
        err2 = float((functional.flat(d) - up.reshape(up.shape[0], -1) @ down.reshape(r, -1)).square().sum())
        norm2 = float(d.square().sum())
        out[stem] = {"down": down, "up": up, "alpha": torch.tensor(float(r))}
        errors[stem] = _relative(err2, norm2)
        err2_total, norm2_total = err2_total + err2, norm2_total + norm2
    return flatten(out), errors, _relative(err2_total, norm2_total)


def shape_mismatch(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor]) -> str | None:
    """How two {stem: weight} dicts first differ ("differ at <stem>: ..."), or None when both have the same stems
    with the same shapes."""
    for stem in dict.fromkeys([*base, *tuned]):
        if stem not in base or stem not in tuned:
            return f"differ at {stem}: only {'tuned' if stem in tuned else 'base'} has it"
        if base[stem].shape != tuned[stem].shape:
            return f"differ at {stem}: {tuple(base[stem].shape)} vs {tuple(tuned[stem].shape)}"
    return None
