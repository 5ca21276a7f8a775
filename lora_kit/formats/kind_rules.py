"""The adapter kinds' tensor names and shape rules, without torch (lora-inspect reads headers only).

A module's tensors, by the names LyCORIS files give them: a plain LoRA/LoCon `down`/`up` (+ `mid`, LyCORIS's Tucker
core `lora_mid`), LoHa `hada_*`, LoKr `lokr_*`, (IA)^3 `weight` + `on_input`, full `diff`/`diff_b`, norm-layer
`w_norm`/`b_norm`; any additive one may carry DoRA's `dora_scale`, and most an `alpha`. lora_kit.kinds holds the
maths.
"""

from __future__ import annotations

from collections.abc import Mapping

# every tensor name each kind may hold in a file (besides `alpha`), and which must be there
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
IA3 = ("weight", "on_input")
FULL = ("diff", "diff_b")
NORM = ("w_norm", "b_norm")
SUFFIXES = (*LOHA, *LOKR, *FULL, *NORM, *IA3, "dora_scale")  # (state.split_key tries these after the LoRA ones)


def kind_of(parts: Mapping) -> str:
    """lora, loha, lokr, ia3, full or norm, from the names of a module's tensors (or shapes)."""
    if "down" in parts or "up" in parts:
        return "lora"
    if any(n in parts for n in LOHA):
        return "loha"
    if any(n in parts for n in LOKR):
        return "lokr"
    if "diff" in parts or "diff_b" in parts:
        return "full"
    if "w_norm" in parts or "b_norm" in parts:
        return "norm"
    if "weight" in parts and "on_input" in parts:
        return "ia3"
    return "unknown"


def _prod(shape) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def shape_problem(shapes: Mapping[str, tuple[int, ...]], weight: tuple[int, ...] | None = None) -> str | None:
    """What is wrong with a non-LoRA module's tensor shapes ({name: shape}); `weight` the base weight's shape when
    known. None when well formed."""
    kind = kind_of(shapes)
    have = set(shapes) - {"alpha", "dora_scale"}
    if "alpha" in shapes and tuple(shapes["alpha"]) not in ((), (1,)):
        return f"alpha has shape {tuple(shapes['alpha'])}; expected a single number"
    if kind == "loha":
        need = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
        if "hada_t1" in have or "hada_t2" in have:
            need |= {"hada_t1", "hada_t2"}
        if missing := sorted(need - have):
            return f"LoHa module lacks {', '.join(missing)}"
        a1, b1, a2, b2 = (tuple(shapes[n]) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        if "hada_t1" in have:
            t1, t2 = tuple(shapes["hada_t1"]), tuple(shapes["hada_t2"])
            if not (a1[0] == b1[0] == t1[0] == t1[1] and a2[0] == b2[0] == t2[0] == t2[1] and t1[2:] == t2[2:]):
                return f"LoHa Tucker factors do not agree: a {a1}, b {b1}, t1 {t1} / a {a2}, b {b2}, t2 {t2}"
            out, fan_in = (a1[1], b1[1] * _prod(t1[2:]))
        else:
            if a1[1] != b1[0] or a2[1] != b2[0] or a1[0] != a2[0] or _prod(b1[1:]) != _prod(b2[1:]):
                return f"LoHa factors do not agree: w1 {a1} @ {b1}, w2 {a2} @ {b2}"
            out, fan_in = a1[0], _prod(b1[1:])
        return _fits("LoHa", out, fan_in, weight)
    if kind == "lokr":
        if not ({"lokr_w1"} <= have or {"lokr_w1_a", "lokr_w1_b"} <= have):
            return "LoKr module lacks lokr_w1 (or lokr_w1_a and lokr_w1_b)"
        if not ({"lokr_w2"} <= have or {"lokr_w2_a", "lokr_w2_b"} <= have):
            return "LoKr module lacks lokr_w2 (or lokr_w2_a and lokr_w2_b)"
        w1 = tuple(shapes["lokr_w1"]) if "lokr_w1" in have else (shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][-1])
        if "lokr_w1" not in have and shapes["lokr_w1_a"][1] != shapes["lokr_w1_b"][0]:
            return f"LoKr w1 factors do not agree: {tuple(shapes['lokr_w1_a'])} @ {tuple(shapes['lokr_w1_b'])}"
        if "lokr_w2" in have:
            w2 = tuple(shapes["lokr_w2"])
            out, fan_in = w1[0] * w2[0], w1[1] * _prod(w2[1:])
        elif "lokr_t2" in have:
            a, b, t = (tuple(shapes[n]) for n in ("lokr_w2_a", "lokr_w2_b", "lokr_t2"))
            if not a[0] == t[0] and b[0] == t[1]:
                return f"LoKr Tucker factors do not agree: a {a}, b {b}, t2 {t}"
            out, fan_in = w1[0] * a[1], w1[1] * b[1] * _prod(t[2:])
        else:
            a, b = tuple(shapes["lokr_w2_a"]), tuple(shapes["lokr_w2_b"])
            if a[1] != b[0]:
                return f"LoKr w2 factors do not agree: {a} @ {b}"
            out, fan_in = w1[0] * a[0], w1[1] * _prod(b[1:])
        return _fits("LoKr", out, fan_in, weight)
    if kind == "full":
        if "diff" in shapes and weight is not None and _prod(shapes["diff"]) != _prod(weight):
            return f"diff has shape {tuple(shapes['diff'])}; the layer's weight is {tuple(weight)}"
        return None
    if kind == "ia3":
        if weight is not None and _prod(shapes["weight"]) not in (weight[0], weight[1]):
            return f"IA3 weight has shape {tuple(shapes['weight'])}; the layer's weight is {tuple(weight)}"
        return None
    if kind == "norm":
        if weight is not None and "w_norm" in shapes and _prod(shapes["w_norm"]) != _prod(weight):
            return f"w_norm has shape {tuple(shapes['w_norm'])}; the layer's weight is {tuple(weight)}"
        return None
    return f"holds {', '.join(sorted(shapes))}, which is no adapter kind lora_kit knows"


def _fits(kind: str, out: int, fan_in: int, weight: tuple[int, ...] | None) -> str | None:
    if weight is not None and (out != weight[0] or fan_in != _prod(weight[1:])):
        return f"{kind} factors make a ({out}, {fan_in}) delta; the layer's weight is {tuple(weight)}"
    return None


def describe(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """A short account of a module's factors for lora-inspect: `LoHa rank 8`, `LoKr 4x(16, rank 8)`, `DoRA`."""
    kind = kind_of(shapes)
    dora_on = "+DoRA" if "dora_scale" in shapes else ""
    if kind == "loha":
        return f"LoHa{'-Tucker' if 'hada_t1' in shapes else ''}{dora_on} rank {shapes['hada_w1_b'][0]}"
    if kind == "lokr":
        w1 = "full w1" if "lokr_w1" in shapes else f"w1 rank {shapes['lokr_w1_a'][1]}"
        w2 = "full w2" if "lokr_w2" in shapes else f"w2 rank {shapes['lokr_w2_b'][0]}"
        return f"LoKr{dora_on} ({w1}, {w2})"
    if kind == "lora":
        return f"{'DoRA' if dora_on else 'LoRA'}{' Tucker' if 'mid' in shapes else ''} rank {shapes['down'][0]}"
    return {"ia3": "IA3", "full": "full diff", "norm": "norm diff"}.get(kind, kind)
