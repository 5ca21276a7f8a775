"""Describe a LoRA file from its header alone (no torch): format, architecture, modules, ranks, alphas, metadata.

Alphas are 0-d tensors; they are read by offset, so even a multi-GB file is described in milliseconds.
"""

from __future__ import annotations

import os
import re
import struct
from collections import Counter

from .files import read_header

_SCALAR = {"F32": "<f", "F16": "<e", "F64": "<d"}
_STEM = re.compile(r"^(.*?)\.(lora_down\.weight|lora_up\.weight|alpha|lora_A\.weight|lora_B\.weight)$")


def _component(stem: str) -> str:
    return stem.split("_")[1] if stem.startswith("lora_") else stem.split(".", 1)[0]  # lora_te1_x -> te1


_CROSS_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # what attn2.to_k reads: the text encoder's width


def guess_architecture(stems: list[str], metadata: dict[str, str], in_features: dict[str, int] | None = None) -> str:
    """The base architecture a LoRA is for: from lora_kit's or kohya's metadata, else from its key names, else
    from the input width of a cross-attention key projection (`in_features`: {stem: down.shape[1]})."""
    if metadata.get("lora_kit.architecture"):
        return metadata["lora_kit.architecture"]
    version = metadata.get("ss_base_model_version", "")
    for prefix, arch in (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"), ("sd3", "sd3"), ("flux", "flux")):
        if version.startswith(prefix):
            return arch
    joined = " ".join(stems)
    if "single_transformer_blocks" in joined or "double_blocks" in joined:
        return "flux"
    if "transformer." in joined or "joint_blocks" in joined:
        return "sd3"
    if "lora_te2_" in joined or "input_blocks" in joined or "text_encoder_2." in joined:
        return "sdxl"
    for stem, width in (in_features or {}).items():
        if stem.endswith(("attn2_to_k", "attn2.to_k")) and width in _CROSS_DIM:
            return _CROSS_DIM[width]
    return "sd1/sd2" if stems else "unknown"


def describe(path: str | os.PathLike) -> dict:
    header, metadata = read_header(path)
    n = struct.unpack("<Q", open(path, "rb").read(8))[0]
    stems: dict[str, dict] = {}
    widths: dict[str, int] = {}
    other = []
    with open(path, "rb") as f:
        for key, entry in header.items():
            m = _STEM.match(key)
            if not m:
                other.append(key)
                continue
            stem, part = m.groups()
            info = stems.setdefault(stem, {})
            if part in ("lora_down.weight", "lora_A.weight"):
                info["rank"] = entry["shape"][0]
                widths[stem] = entry["shape"][1]
                info["kind"] = "conv" if len(entry["shape"]) == 4 and entry["shape"][2:] != [1, 1] else "linear"
                info["dtype"] = entry["dtype"]
            elif part == "alpha" and entry["dtype"] in _SCALAR:
                f.seek(8 + n + entry["data_offsets"][0])
                info["alpha"] = struct.unpack(
                    _SCALAR[entry["dtype"]], f.read(struct.calcsize(_SCALAR[entry["dtype"]]))
                )[0]
    fmt = "kohya" if any(s.startswith("lora_") for s in stems) else ("peft" if stems else "unknown")
    ranks = Counter(i.get("rank") for i in stems.values() if "rank" in i)
    alphas = Counter(round(i["alpha"], 6) for i in stems.values() if "alpha" in i)
    components = Counter(_component(s) for s in stems)
    return {
        "file": str(path),
        "size_bytes": os.path.getsize(path),
        "format": fmt,
        "architecture": guess_architecture(list(stems), metadata, widths),
        "modules": len(stems),
        "components": dict(components),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {f"{k:g}": v for k, v in sorted(alphas.items())},
        "conv_modules": sum(1 for i in stems.values() if i.get("kind") == "conv"),
        "dtypes": sorted({i["dtype"] for i in stems.values() if "dtype" in i}),
        "trigger_words": metadata.get("lora_kit.trigger_words") or metadata.get("modelspec.trigger_phrase"),
        "other_keys": other[:10],
        "metadata": metadata,
    }
