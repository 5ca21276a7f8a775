"""LoRA files as stored, without a model: what lora-merge A B, lora-resize and lora-inspect work on.

kohya and native files already have `<stem>.lora_down.weight / .lora_up.weight / .alpha` keys; PEFT files are
normalised to the same suffixes with alphas from their metadata. Writing goes back to the input's format.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import LoraKitError
from ..ops import cast, uniform_alpha
from ..state import SUFFIXES, flatten, modules
from . import dialects, files, kohya, peft
from .dispatch import checked, metadata_for, sniff
from .header import guess_architecture


def read_lora(
    path: str | os.PathLike, allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], str, dict[str, str]]:
    """(LoRA dict keyed as stored, format, header metadata), checked as every reader's (dispatch.checked). A pickled
    {name: tensor} dict is read with allow_pickle (weights_only); cloneofsimo's lists name no module: refused."""
    p = files.check_input(path)
    if p.suffix in files.PICKLES:
        obj = files.load_pickle(p, allow_pickle)
        if isinstance(obj, list):
            raise LoraKitError(
                f"{p}: a cloneofsimo list of factors names no module; convert it first with "
                "lora-convert --model MODEL --allow-pickle"
            )
        tensors, metadata = files.tensor_dict(obj, p), {}
    else:
        tensors, metadata = files.load(p)
    fmt = sniff(tensors, str(p))
    if fmt == "peft":
        state = peft.normalize(tensors, metadata, str(p))
    else:
        if fmt in dialects.READERS:  # ComfyUI's lora_A/lora_B, XLabs' down/up: as kohya's suffixes
            tensors = dialects.as_stored(tensors, fmt)
        odd = [k for k in tensors if not k.endswith(tuple("." + s for s in SUFFIXES))]
        if odd:
            raise LoraKitError(f"{p}: keys that are not LoRA factors or alphas, e.g. {', '.join(odd[:3])}")
        state = dict(tensors)
    return checked(state, p), fmt, metadata


def one_spelling(states: list[Mapping[str, torch.Tensor]], fmt: str, arch: str | None) -> list[list[dict]]:
    """Each LoRA dict (keyed as stored) as dicts that spell every module one way: where the inputs together spell
    one module two ways (kohya `lora_te_` / `lora_te1_`, with or without `text_model`, SGM or diffusers block names;
    PEFT with or without `text_model.`), each spelling becomes the one lora_kit writes. An input that holds both
    gives two dicts, so that a merge sums them instead of keeping the two keys side by side."""
    if fmt not in ("kohya", "peft"):
        return [[dict(s)] for s in states]
    spell = peft.spelling if fmt == "peft" else (lambda stem: kohya.spelling(stem, arch))
    named = {stem: spell(stem) for s in states for stem in modules(s)}
    ways = Counter(module for module, _ in named.values())
    rename = {stem: written for stem, (module, written) in named.items() if ways[module] > 1}
    out = []
    for s in states:
        pieces: list[dict] = []
        for stem, parts in modules(s).items():
            new = rename.get(stem, stem)
            piece = next((p for p in pieces if new not in p), None)
            if piece is None:
                pieces.append(piece := {})
            piece[new] = parts
        out.append([flatten(p) for p in pieces])
    return out


def architecture_of(metadata: Mapping[str, str], state: Mapping[str, torch.Tensor]) -> str | None:
    """sd1/sd2/sdxl/sd3/flux from the header and the keys, or None when the file does not tell."""
    mods = modules(state)
    widths = {stem: parts["down"].shape[1] for stem, parts in mods.items() if "down" in parts}
    arch = guess_architecture(list(mods), dict(metadata), widths)
    return arch if arch in ("sd1", "sd2", "sdxl", "sd3", "flux") else None


def write_lora(
    path: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    fmt: str,
    arch: str | None,
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, object] | None = None,
    force: bool = False,
    prediction: str | None = None,
) -> Path:
    """Write a LoRA dict keyed as stored back in format `fmt` (one alpha, atomic, sshs hashes); `prediction` is the
    base model's prediction type, as the inputs' headers state it (models.prediction_in)."""
    files.check_output(path, force)
    state = cast(uniform_alpha(state), dtype)
    header = metadata_for(state, arch, metadata, prediction)
    tensors = dialects.to_stored(state, fmt)
    if fmt == "peft":
        tensors, extra = peft.to_peft(state)
        header.update(extra)
    ss_only = {k: v for k, v in header.items() if k.startswith("ss_")}
    header.update(files.addnet_hashes(files.serialize(tensors, ss_only)))
    return files.write_atomic(path, files.serialize(tensors, header), force)
