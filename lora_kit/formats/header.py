"""Describe a LoRA file from its header alone (no torch): format, architecture, modules, ranks, alphas, metadata.

Alphas are 0-d tensors; they are read by offset, so even a multi-GB file is described in milliseconds.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections import Counter

from ..errors import LoraKitError
from . import check, dialects, kind_rules, peft_config
from .files import read_header

_STRUCT = {  # safetensors dtypes struct reads as they are
    "F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U64": "<Q",
    "U32": "<I", "U16": "<H", "U8": "<B", "BOOL": "<?",
}  # fmt: skip
_F8 = {"F8_E4M3": (4, 3, False), "F8_E5M2": (5, 2, True)}  # (exponent bits, mantissa bits, IEEE inf/NaN)


def _minifloat(byte: int, exp_bits: int, man_bits: int, ieee: bool) -> float:
    """One 8-bit float: E5M2 as IEEE (inf and NaN at the top exponent), E4M3 as torch's float8_e4m3fn (no inf; NaN
    only with every exponent and mantissa bit set)."""
    sign = -1.0 if byte >> 7 else 1.0
    top, full = (1 << exp_bits) - 1, (1 << man_bits) - 1
    e, m, bias = (byte >> man_bits) & top, byte & full, (1 << (exp_bits - 1)) - 1
    if e == top and (ieee or m == full):
        return sign * math.inf if ieee and m == 0 else math.nan
    if e == 0:
        return sign * m / (full + 1) * 2.0 ** (1 - bias)
    return sign * (1 + m / (full + 1)) * 2.0 ** (e - bias)


def _scalar(dtype: str, raw: bytes) -> float | None:
    """The number in a scalar's bytes, for every dtype a LoRA writer stores alphas in (sd-scripts: its save
    precision, bf16 included; diffusers' kohya converter: int64); None for the packed sub-byte and complex ones."""
    if dtype in _STRUCT:
        return float(struct.unpack(_STRUCT[dtype], raw)[0])
    if dtype == "BF16":  # the upper half of an fp32
        return struct.unpack("<f", b"\0\0" + raw)[0]
    if dtype in _F8:
        return _minifloat(raw[0], *_F8[dtype])
    if dtype == "F8_E8M0":  # a power of two, 0xFF is NaN
        return math.nan if raw[0] == 0xFF else 2.0 ** (raw[0] - 127)
    return None


_KEY = re.compile(  # <stem><separator><part>, in every spelling the readers take (kohya, peft/diffusers, legacy)
    r"^(?P<stem>.+?)(?:[._](?P<down>lora_down|lora_A(?:\.default)?|lora(?:_linear_layer)?\.down)\.weight"
    r"|[._](?P<up>lora_up|lora_B(?:\.default)?|lora(?:_linear_layer)?\.up)\.weight|(?P<alpha>\.alpha)"
    r"|(?P<legacy>:\d+):(?P<legacy_part>up|down)"
    r"|\.(?P<mid>lora_mid)\.weight|\.(?P<dora>lora_magnitude_vector)(?:\.default)?(?:\.weight)?"
    r"|\.(?P<other>" + "|".join(kind_rules.SUFFIXES) + r")(?:\.default)?)$"  # (PEFT's: `.default` after the name)
)


def _split(key: str) -> tuple[str, str] | None:
    """'x.lora_B.weight' -> ('x', 'up'); 'unet:3:down' -> ('unet:3', 'down'); None for a key that is no factor."""
    if xlabs := dialects.xlabs_part(key):  # XLabs' `<stem>_lora1.down.weight` (`.weight` alone is IA3's)
        return xlabs
    m = _KEY.match(key)
    if m is None:
        return None
    if m["legacy"]:
        return m["stem"] + m["legacy"], m["legacy_part"]
    if m["other"]:  # another adapter kind's tensor (kind_rules): the part is its name
        return m["stem"], m["other"]
    if m["dora"]:  # PEFT's DoRA magnitude: one value per output row, (out,) or (1, out, 1, 1)
        return m["stem"], "dora_scale"
    return m["stem"], next(part for part in ("down", "up", "alpha", "mid") if m[part])


def _format(stems) -> str:
    """The file's key dialect (dialects.dialect_of: kohya, kohya-bfl, sd-scripts-sd3, comfyui, xlabs, onetrainer,
    lycoris, peft or legacy), which dispatch.sniff reads it by."""
    return dialects.dialect_of(stems)


def _module(shapes: dict[str, tuple]) -> dict:
    """What describe reports of one module: its adapter kind (kind_rules.describe), linear or kxk conv, and the
    rank of a LoRA pair."""
    info = {"adapter": kind_rules.describe(shapes)}
    conv = any(_kind(shape) == "conv" for part, shape in shapes.items() if part not in ("up", "dora_scale"))
    info["kind"] = "conv" if conv else "linear"  # (a LoHa's conv factors are flat unless Tucker: read as linear)
    if "down" in shapes and "mid" not in shapes:
        info["rank"] = shapes["down"][0]
    return info


def _kind(down: tuple) -> str:
    return "conv" if len(down) == 4 and down[2:] != (1, 1) else "linear"


def _component(stem: str) -> str:
    if stem.startswith("lora_"):
        return stem.split("_")[1]  # lora_te1_x -> te1
    if stem.startswith("lycoris_"):
        return "lycoris"
    return re.split(r"[.:]", stem, maxsplit=1)[0]


_CROSS_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # what attn2.to_k reads: the text encoder's width


def guess_architecture(stems: list[str], metadata: dict[str, str], in_features: dict[str, int] | None = None) -> str:
    """The base architecture a LoRA is for: from lora_kit's or kohya's metadata, else from its key names, else
    from the input width of a cross-attention key projection (`in_features`: {stem: down.shape[1]})."""
    if metadata.get("lora_kit.architecture"):
        return metadata["lora_kit.architecture"]
    if stated := _stated(metadata):
        return stated
    joined = " ".join(stems)
    if "single_transformer_blocks" in joined or "double_blocks" in joined:
        return "flux"
    # a DiT's blocks (FLUX's double blocks and SD3's are alike by name): the attention's input width tells them apart
    dit = {w for stem, w in (in_features or {}).items() if "transformer_blocks" in stem and "attn" in stem
           and not any(block in stem for block in _UNET_BLOCKS)}  # fmt: skip
    if 3072 in dit:
        return "flux"
    flat_dit = any(s.startswith(("lycoris_transformer_blocks", "lora_transformer_transformer_blocks")) for s in stems)
    if "transformer." in joined or "joint_blocks" in joined or flat_dit or dit & {1536, 2432}:
        return "sd3"
    if "lora_te2_" in joined or "input_blocks" in joined or "text_encoder_2." in joined:
        return "sdxl"
    for stem, width in (in_features or {}).items():
        if stem.endswith(("attn2_to_k", "attn2.to_k")) and width in _CROSS_DIM:
            return _CROSS_DIM[width]
    return "sd1/sd2" if stems else "unknown"


def _stated(metadata: dict[str, str]) -> str | None:
    """The architecture lora_kit's or kohya's metadata names (one of models.ARCHITECTURES), else None."""
    if metadata.get("lora_kit.architecture") in _ARCHS:
        return metadata["lora_kit.architecture"]
    version = metadata.get("ss_base_model_version", "")
    for prefix, arch in (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"), ("sd3", "sd3"), ("flux", "flux")):
        if version.startswith(prefix):
            return arch
    return None


_ARCHS = ("sd1", "sd2", "sdxl", "sd3", "flux")  # models.ARCHITECTURES (models imports torch)
_UNET_BLOCKS = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block")


def architectures_for(stems: list[str], metadata: dict[str, str], in_features: dict[str, int] | None = None) -> set:
    """The base architectures a LoRA can be for, from what its header says for certain (guess_architecture, which
    names one where a reader must pick, takes more risks): the one its metadata names; else from its keys FLUX's or
    SD3's blocks, a transformer (SD3 or FLUX) or a UNet (SD1, SD2 or SDXL; the input width of a cross-attention key
    projection tells which); else any."""
    if stated := _stated(metadata):
        return {stated}
    joined = " ".join(stems)
    if any(block in joined for block in ("double_blocks", "single_blocks", "single_transformer_blocks")):
        return {"flux"}
    if "joint_blocks" in joined:
        return {"sd3"}
    unet = any(block in stem for stem in stems for block in _UNET_BLOCKS)
    transformer = any(stem.startswith(("transformer.", "lora_transformer_"))
                      or ("transformer_blocks" in stem and not any(b in stem for b in _UNET_BLOCKS))
                      for stem in stems)  # fmt: skip
    if unet == transformer:  # neither (text encoders only), or both (no model has both)
        return set(_ARCHS)
    if transformer:  # FLUX's attention is 3072 wide, SD3's and SD3.5's 1536 or 2432
        widths = {w for stem, w in (in_features or {}).items() if "transformer_blocks" in stem and "attn" in stem}
        return {"flux"} if 3072 in widths else {"sd3"} if widths and widths <= {1536, 2432} else {"sd3", "flux"}
    for stem, width in (in_features or {}).items():
        if stem.endswith(("attn2_to_k", "attn2.to_k")) and width in _CROSS_DIM:
            return {_CROSS_DIM[width]}
    return {"sd1", "sd2", "sdxl"}


def check_lora(header: dict, source: str) -> tuple[dict[str, tuple[str, str]], dict[str, dict[str, tuple]]]:
    """({key: (stem, part)} of every factor and alpha, {stem: {part: shape}}) of a LoRA's header (a safetensors
    header, or a pickle's shapes and dtypes), checked as every reader checks a LoRA: no base model and no variant
    lora_kit does not read (check.check_variants), well-formed modules (check.check_modules), float factors."""
    check.check_variants(header, source, header)
    parts = {key: split for key in header if (split := _split(key))}
    ia3 = {stem for stem, part in parts.values() if part == "on_input"}  # (`x.weight` is IA3's only beside on_input)
    parts = {key: (stem, part) for key, (stem, part) in parts.items() if part != "weight" or stem in ia3}
    if not parts:
        raise check.not_a_lora(source, list(header))
    shapes: dict[str, dict[str, tuple]] = {}
    for key, (stem, part) in parts.items():
        shapes.setdefault(stem, {})[part] = tuple(header[key]["shape"])
    check.check_modules(shapes, source)
    for key, (_, part) in parts.items():
        check.check_factor_dtype(key, part, header[key]["dtype"], source)
    return parts, shapes


def describe_checkpoint(model, path) -> dict:
    """What lora-inspect prints of a base model's checkpoint (or one part of one)."""
    from ..single_file.sniff import ARCH_NAMES

    dtypes = Counter(model.dtypes.values())
    arch = model.arch or model.part_arch
    return {
        "file": str(path),
        "size_bytes": os.path.getsize(path),
        "format": "checkpoint" if model.arch else "checkpoint part",
        "architecture": ARCH_NAMES.get(arch, "unknown") if arch else "(a part of any)",
        "components": {comp: (prefix or "(no prefix)") for comp, prefix in model.parts.items()},
        "tensors": len(model.shapes),
        "parameters": sum(math.prod(s) for s in model.shapes.values()),
        "dtypes": dict(dtypes.most_common()),
        "prediction_type": model.prediction(),
        "metadata": {k: v for k, v in model.metadata.items() if k != "lora_kit.pipeline"},
    }


def describe(path: str | os.PathLike) -> dict:
    """What lora-inspect prints. A file that is no LoRA, a variant lora_kit does not read or a malformed module
    (check.module_problem, on the shapes in the header) is a LoraKitError, as in every other tool."""
    from ..single_file.sniff import sniff

    header, metadata = read_header(path)
    if model := sniff(path, header, metadata):
        return describe_checkpoint(model, path)
    parts, shapes = check_lora(header, str(path))
    stems = {stem: _module(s) for stem, s in shapes.items()}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        for key, (stem, part) in parts.items():
            if part not in ("up", "alpha", "on_input") and "dtype" not in stems[stem]:
                stems[stem]["dtype"] = header[key]["dtype"]
            elif part == "alpha":
                start, end = header[key]["data_offsets"]
                f.seek(8 + n + start)
                alpha = _scalar(header[key]["dtype"], f.read(end - start))
                if alpha is None:
                    continue
                if not math.isfinite(alpha):
                    raise LoraKitError(f"{path}: tensor {key} holds NaN or inf")
                stems[stem]["alpha"] = alpha
    configs = peft_config.configs_of(metadata, str(path))  # a PEFT file's alphas live in its LoraConfig
    for stem, info in stems.items():
        component, _, module = stem.partition(".")
        if "rank" not in info or "alpha" in info:
            continue
        if alpha := peft_config.alpha_for(module, info["rank"], configs.get(component)):
            info["alpha"] = alpha
    widths = {stem: shapes[stem]["down"][1] for stem in shapes if "down" in shapes[stem]}
    other = [key for key in header if key not in parts]
    ranks = Counter(i["rank"] for i in stems.values() if "rank" in i)
    adapters = Counter(f"{_component(stem)}: {i['adapter']}" for stem, i in stems.items())  # kinds per component
    alphas = Counter(round(i["alpha"], 6) for i in stems.values() if "alpha" in i)
    components = Counter(_component(s) for s in stems)
    return {
        "file": str(path),
        "size_bytes": os.path.getsize(path),
        "format": _format(stems),
        "architecture": guess_architecture(list(stems), metadata, widths),
        "modules": len(stems),
        "components": dict(components),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "adapters": dict(adapters.most_common()),
        "alphas": {f"{k:g}": v for k, v in sorted(alphas.items())},
        "conv_modules": sum(1 for i in stems.values() if i["kind"] == "conv"),
        "dtypes": sorted({i["dtype"] for i in stems.values() if "dtype" in i}),
        "trigger_words": metadata.get("lora_kit.trigger_words") or metadata.get("modelspec.trigger_phrase"),
        "quantized_base": metadata.get("lora_kit.quantized_base"),  # what lora-train --quantize-base trained on
        "other_keys": other[:10],
        "metadata": metadata,
    }
