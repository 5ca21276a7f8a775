"""LoRA files as stored, without a model: what lora-merge A B, lora-resize and lora-inspect work on.

kohya and native files already have `<stem>.lora_down.weight / .lora_up.weight / .alpha` keys; PEFT files are
normalised to the same suffixes with alphas from their metadata. Writing goes back to the input's format.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import LoraKitError
from ..ops import cast, uniform_alpha
from ..state import SUFFIXES, modules
from . import files, peft
from .dispatch import checked, metadata_for, sniff
from .header import guess_architecture


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str, dict[str, str]]:
    """(LoRA dict keyed as stored, format, header metadata), checked as every reader's (dispatch.checked)."""
    p = files.check_input(path)
    tensors, metadata = files.load(p)
    fmt = sniff(tensors, str(p))
    if fmt == "peft":
        state = peft.normalize(tensors, metadata, str(p))
    else:
        odd = [k for k in tensors if not k.endswith(tuple("." + s for s in SUFFIXES))]
        if odd:
            raise LoraKitError(f"{p}: keys that are not LoRA factors or alphas, e.g. {', '.join(odd[:3])}")
        state = dict(tensors)
    return checked(state, p), fmt, metadata


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
) -> Path:
    """Write a LoRA dict keyed as stored back in format `fmt` (one alpha, atomic, sshs hashes)."""
    files.check_output(path, force)
    state = cast(uniform_alpha(state), dtype)
    header = metadata_for(state, arch, metadata)
    tensors = state
    if fmt == "peft":
        tensors, extra = peft.to_peft(state)
        header.update(extra)
    ss_only = {k: v for k, v in header.items() if k.startswith("ss_")}
    header.update(files.addnet_hashes(files.serialize(tensors, ss_only)))
    return files.write_atomic(path, files.serialize(tensors, header), force)
