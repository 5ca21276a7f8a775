"""What makes a LoRA well formed, checked in one place for every reader and for lora-inspect's header read.

The rules work on shapes, not tensors (no torch here), so a loaded state dict and a safetensors header go through
the same checks: every module has a down and an up factor, their ranks agree, down is (rank, in) or
(rank, in, kh, kw), up is (out, rank) or (out, rank, 1, 1) with as many dims as down, and alpha is one number.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..errors import LoraKitError
from .kind_rules import kind_of, shape_problem

Shape = tuple[int, ...]

VARIANTS = {  # key fragments of adapter kinds lora_kit does not read -> their names
    ".a1.weight": "GLoRA", ".b1.weight": "GLoRA", "oft_blocks": "OFT", ".oft_": "OFT", "boft_": "BOFT",
}  # fmt: skip


def check_variants(keys: Iterable[str], source: str, entries: Mapping | None = None) -> None:
    """Refuse a base model given as a LoRA, and LoRA variants lora_kit does not read yet, by name, instead of
    dropping their keys. `entries`: the safetensors header when there is one (its shapes tell SD1 from SD2)."""
    from ..single_file.sniff import sniff

    keys = list(keys)
    model = sniff(source, entries or {k: {"shape": []} for k in keys}, {})
    if model is not None:
        raise LoraKitError(f"{source}: is {model.describe()}, a base model, not a LoRA")
    for key in keys:
        for fragment, variant in VARIANTS.items():
            if fragment in key:
                raise LoraKitError(f"{source}: {variant} adapters ({key}) are not supported yet")


def not_a_lora(source: str, keys: list[str]) -> LoraKitError:
    """The error for a file that holds no LoRA lora_kit reads (a model's weights, an empty file, ...)."""
    what = f"keys such as {', '.join(keys[:3])}" if keys else "it holds no tensors"
    return LoraKitError(f"{source}: not a LoRA file lora_kit knows ({what})")


_NAMES = {"down": "lora_down", "up": "lora_up", "alpha": "alpha"}


def module_problem(shapes: Mapping[str, Shape], weight: Shape | None = None) -> str | None:
    """What is wrong with one module's factors ({'down', 'up', 'alpha'} -> shape), or None when it is a LoRA."""
    if kind_of(shapes) != "lora":
        problem = shape_problem(shapes, weight)
        if problem is None and "dora_scale" in shapes and weight is not None:
            if _prod(shapes["dora_scale"]) not in (weight[0], weight[1]):
                return f"dora_scale has shape {shapes['dora_scale']}; the layer's weight is {weight}"
        return problem
    down, up, alpha = shapes.get("down"), shapes.get("up"), shapes.get("alpha")
    if down is None or up is None:
        have = " and ".join(_NAMES[p] for p in _NAMES if p in shapes)
        return f"has {have} but no {_NAMES['down' if down is None else 'up']}"
    if len(down) not in (2, 4):
        return f"lora_down has shape {down}; expected (rank, in) or (rank, in, kh, kw)"
    if len(up) != len(down) or (len(up) == 4 and up[2:] != (1, 1)):
        expected = "(out, rank)" if len(down) == 2 else "(out, rank, 1, 1)"
        return f"lora_up has shape {up}; with lora_down {down} it must be {expected}"
    if up[1] != down[0]:
        return f"lora_up has rank {up[1]} but lora_down has rank {down[0]}"
    if down[0] == 0:
        return "has rank 0"
    if alpha is not None and alpha not in ((), (1,)):
        return f"alpha has shape {alpha}; expected a single number"
    if "mid" in shapes and (len(shapes["mid"]) != 4 or shapes["mid"][:2] != (down[0], down[0]) or down[2:] != (1, 1)):
        return f"lora_mid has shape {shapes['mid']}; with lora_down {down} it must be ({down[0]}, {down[0]}, kh, kw)"
    if "dora_scale" in shapes:
        dora, fan_in = shapes["dora_scale"], down[1] * (_prod(shapes["mid"][2:]) if "mid" in shapes else 1)
        if _prod(dora) not in (up[0], down[1]):
            return f"dora_scale has shape {dora}; expected ({up[0]}, 1, ...) or (1, {fan_in}, ...)"
    if weight is not None:
        fan_in = down[1] * _prod((shapes["mid"] if "mid" in shapes else down)[2:])
        if up[0] != weight[0] or fan_in != _prod(weight[1:]):
            return f"lora_down {down} / lora_up {up} do not fit a layer with weight {weight}"
    return None


def _prod(shape) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def check_factor_dtype(key: str, part: str, dtype: str, source: str) -> None:
    """lora_down and lora_up hold real numbers: an integer, bool or complex factor (no trainer writes one; every
    delta would be made of whole numbers) is refused. Alphas may be integers (diffusers' kohya converter writes
    int64). `dtype` is a safetensors name (F16, I32, ...) or a torch one (float16, int32, ...)."""
    if part not in ("alpha", "on_input") and not dtype.lower().startswith(("f", "bf")):
        raise LoraKitError(f"{source}: tensor {key} is {dtype}; adapter factors must be floating point")


def check_modules(modules: Mapping[str, Mapping[str, Shape]], source: str) -> None:
    """Raise for the first malformed module of {stem: {part: shape}}, naming the file, the module and the problem."""
    for stem, shapes in modules.items():
        problem = module_problem(shapes)
        if problem:
            raise LoraKitError(f"{source}: {stem}: {problem}")
