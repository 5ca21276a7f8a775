"""Checkpoints of a training run, in `<output stem>-checkpoints/step-N/`: the trainable tensors, the optimizer, LR
scheduler and fp16 loss-scaler states (and --ema's averages, in optimizer.pt), and `state.json` (the step, the run's
--steps, and fingerprints of the config, the data and the model, which `--resume` must match).

The data's fingerprint covers the files training reads, as data.candidates finds them (images, masks, captions,
manifest.jsonl, hidden folders included): every name and size, and the content of the captions and the manifest.
The model's covers a local model folder: every file's name and size, and the content of everything but the weights
(configs, tokenizer files). A hub id is taken by its name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import torch

from ..errors import LoraKitError
from .config import TrainConfig
from .data import candidates, files_under
from .recipes import Recipe, checkpoint_tensors, restore_tensors

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf", ".onnx", ".msgpack", ".h5")


def _files_digest(root: Path, wanted, read) -> str:
    """A digest of the files under `root` that `wanted(path)` keeps: their relative paths and sizes, and the content
    of those `read(path)` keeps (hidden files and folders are left out)."""
    h = hashlib.sha256()
    for p in files_under(root, hidden=False):
        rel = p.relative_to(root)
        if not wanted(p):
            continue
        h.update(f"{rel.as_posix()}\0{p.stat().st_size}\0".encode())
        if read(p):
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def data_fingerprint(folder: str | Path, instance_prompt: str | None = None) -> str:
    """A digest of the files training reads, as data.candidates finds them: each image's and mask's path and size,
    each caption (from the manifest or a .txt), its repeats, and the manifest's content."""
    root = Path(folder)
    h = hashlib.sha256()
    for ex in candidates(root, instance_prompt):
        for path in (ex.image, ex.mask):
            size = path.stat().st_size if path is not None and path.is_file() else -1
            h.update(f"{os.path.relpath(path, root) if path else ''}\0{size}\0".encode())
        h.update(f"{ex.caption}\0{ex.repeats}\0".encode())
    manifest = root / "manifest.jsonl"
    if manifest.is_file():
        h.update(hashlib.sha256(manifest.read_bytes()).digest())
    return h.hexdigest()[:16]


def model_fingerprint(spec: str) -> str:
    from ..models import local_paths

    roots = local_paths(spec)
    if not roots:  # a hub id
        return hashlib.sha256(spec.encode()).hexdigest()[:16]
    if len(roots) == 1 and roots[0].is_dir():
        return _files_digest(roots[0], lambda p: True, lambda p: p.suffix.lower() not in WEIGHT_SUFFIXES)
    h = hashlib.sha256()  # single-file checkpoints: each file's size and header (its keys, shapes and metadata)
    for root in roots:
        h.update(_files_digest(root, lambda p: True, lambda p: False).encode() if root.is_dir() else _head(root))
    return h.hexdigest()[:16]


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        head = f.read(min(n, 100_000_000)) if path.suffix == ".safetensors" else b""
    return hashlib.sha256(f"{path.stat().st_size}\0".encode() + head).digest()


def fingerprints(cfg: TrainConfig) -> dict[str, str]:
    """What a checkpoint must share with the run that resumes it."""
    data = data_fingerprint(cfg.data, cfg.instance_prompt)
    return {"config": cfg.fingerprint(), "data": data, "model": model_fingerprint(cfg.model)}


def _checkpoints(cfg: TrainConfig) -> list[Path]:
    folder = cfg.checkpoint_dir
    found = [p for p in folder.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def clear_earlier_run(cfg: TrainConfig) -> None:
    """--force without --resume: remove the checkpoints an earlier run left (lora-train's step-N folders only), so
    that --save-limit and --resume latest see this run's alone."""
    folder = cfg.checkpoint_dir
    if not folder.is_dir():
        return
    for p in folder.glob("step-*"):
        name = p.name.removesuffix(".tmp")
        if p.is_dir() and name[5:].isdigit():
            shutil.rmtree(p)


def save_checkpoint(cfg, step, recipe: Recipe, pipe, optimizer, scheduler, scaler, prints: dict, ema=None) -> Path:
    from ..formats import files

    folder = cfg.checkpoint_dir / f"step-{step}"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "trainable.safetensors").write_bytes(files.serialize(checkpoint_tensors(recipe, pipe)))
    states = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if scaler is not None:  # fp16: the loss scale it has found (else a resume starts again from 65536)
        states["scaler"] = scaler.state_dict()
    if ema is not None:
        states["ema"] = ema.state_dict()
    torch.save(states, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "steps": cfg.steps, **prints}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    if cfg.save_limit:
        for old in _checkpoints(cfg)[: -cfg.save_limit]:
            shutil.rmtree(old)
    return folder


def resume_folder(cfg: TrainConfig) -> Path:
    """The checkpoint `cfg.resume` names ("latest" or a folder); an error if there is none."""
    if cfg.resume == "latest":
        found = _checkpoints(cfg)
        if not found:
            raise LoraKitError(f"{cfg.checkpoint_dir}: no checkpoint to resume from")
        return found[-1]
    folder = Path(cfg.resume)
    if not (folder / "state.json").is_file():
        raise LoraKitError(f"{folder}: not a lora-train checkpoint (no state.json)")
    return folder


def check_resume(cfg: TrainConfig, prints: dict) -> Path:
    """The checkpoint to resume from, refused (one error) when its config, data or model differ from `prints`, its
    step lies beyond cfg.steps, or its tensor or optimizer file is missing or damaged."""
    from ..formats import files

    folder = resume_folder(cfg)
    try:
        state = json.loads((folder / "state.json").read_text())
        step = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise LoraKitError(f"{folder / 'state.json'}: not a lora-train checkpoint state") from None
    if "data" not in state or "model" not in state:
        raise LoraKitError(f"{folder}: the checkpoint does not record its data and model (an older lora_kit made it); "
                           "start again without --resume")  # fmt: skip
    what = {"model": f"model (the files of {cfg.model} are not those it trained with)",
            "data": f"data (the files in {cfg.data} are not those it trained on)",
            "config": "training config (a setting that shapes the adapters or the data order differs)"}  # fmt: skip
    for key in ("model", "data", "config"):
        if state.get(key) != prints[key]:
            raise LoraKitError(f"{folder}: the checkpoint was made with a different {what[key]}")
    if step > cfg.steps:
        raise LoraKitError(f"{folder}: the checkpoint is at step {step}, beyond --steps {cfg.steps}")
    files.read_header(folder / "trainable.safetensors")  # a missing or corrupt file: one line, before the model loads
    _states(folder, mmap=True)
    return folder


def _first_line(e: Exception) -> str:
    """The gist of a library's error (torch's unpickling errors run to dozens of lines)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _states(folder: Path, mmap: bool = False) -> dict:
    """The optimizer, LR-scheduler (and loss-scaler) states of a checkpoint; one error naming optimizer.pt when it
    is missing or not such a file (`mmap`: only check it, without reading the tensors)."""
    path = folder / "optimizer.pt"
    if not path.is_file():
        raise LoraKitError(f"{path}: no such file; the checkpoint is incomplete")
    try:
        if not zipfile.is_zipfile(path):  # what torch.save writes (and what torch's mmap error would not say)
            raise ValueError("not a zip archive, as torch.save writes")
        saved = torch.load(path, weights_only=True, mmap=mmap)
    except Exception as e:  # a damaged file fails in pickle, zip or torch, each with its own error type
        raise LoraKitError(
            f"{path}: not a readable optimizer state ({_first_line(e)}); resume from another checkpoint"
        ) from None
    if not isinstance(saved, dict) or not {"optimizer", "scheduler"} <= saved.keys():
        raise LoraKitError(f"{path}: not a lora-train optimizer state (no optimizer and scheduler entries)")
    return saved


def load_checkpoint(cfg, recipe: Recipe, pipe, optimizer, scheduler, scaler, prints: dict, ema=None) -> int:
    """Restore the checkpoint `cfg.resume` names into the run; returns its step."""
    from ..formats import files

    folder = check_resume(cfg, prints)
    tensors, _ = files.load(folder / "trainable.safetensors")
    saved = _states(folder)
    try:  # the fingerprints matched, so only an edited checkpoint gets here: still one line
        restore_tensors(recipe, pipe, tensors)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise LoraKitError(f"{folder}: the checkpoint does not fit this run ({_first_line(e)})") from None
    return int(json.loads((folder / "state.json").read_text())["step"])
