"""What makes a LoRA well formed, checked in one place for every reader and for lora-inspect's header read.

The rules work on shapes, not tensors (no torch here), so a loaded state dict and a safetensors header go through
the same checks: every module has a down and an up factor, their ranks agree, down is (rank, in) or
(rank, in, kh, kw), up is (out, rank) or (out, rank, 1, 1) with as many dims as down, and alpha is one number.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..errors import LoraKitError

Shape = tuple[int, ...]

VARIANTS = {  # key fragments of LoRA variants lora_kit does not read yet -> their names
    "hada_": "LoHa", "lokr_": "LoKr", ".lora_mid.": "LoCon with a Tucker core (lora_mid)", ".dora_scale": "DoRA",
    ".lora_magnitude_vector": "DoRA", ".on_input": "IA3", ".diff": "full-weight diff", ".a1.weight": "GLoRA",
    "oft_": "OFT",
}  # fmt: skip


# key prefixes of LoRA dialects no reader maps yet (ComfyUI's LoraSave and ai-toolkit write FLUX/SD3 this way)
DIALECTS = ("diffusion_model.",)


def check_variants(keys: Iterable[str], source: str, entries: Mapping | None = None) -> None:
    """Refuse a base model given as a LoRA, and LoRA variants lora_kit does not read yet, by name, instead of
    dropping their keys. `entries`: the safetensors header when there is one (its shapes tell SD1 from SD2)."""
    from ..single_file.sniff import sniff

    keys = list(keys)
    model = sniff(source, entries or {k: {"shape": []} for k in keys}, {})
    if model is not None:
        raise LoraKitError(f"{source}: is {model.describe()}, a base model, not a LoRA")
    dialect = next((k for k in keys if k.startswith(DIALECTS)), None)
    if dialect is not None:
        raise LoraKitError(f"{source}: a LoRA in ComfyUI's / ai-toolkit's `{dialect.split('.')[0]}.` key dialect "
                           f"({dialect}), which lora_kit does not read yet")  # fmt: skip
    for key in keys:
        for fragment, variant in VARIANTS.items():
            if fragment in key:
                raise LoraKitError(f"{source}: {variant} adapters ({key}) are not supported yet")


def not_a_lora(source: str, keys: list[str]) -> LoraKitError:
    """The error for a file that holds no LoRA lora_kit reads (a model's weights, an empty file, ...)."""
    what = f"keys such as {', '.join(keys[:3])}" if keys else "it holds no tensors"
    return LoraKitError(f"{source}: not a LoRA file lora_kit knows ({what})")


_NAMES = {"down": "lora_down", "up": "lora_up", "alpha": "alpha"}


def module_problem(shapes: Mapping[str, Shape]) -> str | None:
    """What is wrong with one module's factors ({'down', 'up', 'alpha'} -> shape), or None when it is a LoRA."""
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
    return None


def check_factor_dtype(key: str, part: str, dtype: str, source: str) -> None:
    """lora_down and lora_up hold real numbers: an integer, bool or complex factor (no trainer writes one; every
    delta would be made of whole numbers) is refused. Alphas may be integers (diffusers' kohya converter writes
    int64). `dtype` is a safetensors name (F16, I32, ...) or a torch one (float16, int32, ...)."""
    if part in ("down", "up") and not dtype.lower().startswith(("f", "bf")):
        raise LoraKitError(f"{source}: tensor {key} is {dtype}; LoRA factors must be floating point")


def check_modules(modules: Mapping[str, Mapping[str, Shape]], source: str) -> None:
    """Raise for the first malformed module of {stem: {part: shape}}, naming the file, the module and the problem."""
    for stem, shapes in modules.items():
        problem = module_problem(shapes)
        if problem:
            raise LoraKitError(f"{source}: {stem}: {problem}")
