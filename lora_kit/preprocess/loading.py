"""Open the local transformers models preprocessing uses, and refuse a folder that holds another kind of model.

transformers happily loads a CLIPSeg folder into CLIPModel (dropping the decoder) or fills missing weights with
random values; a caption or mask from such a model is silent garbage, so both are errors here.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..errors import LoraKitError


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise LoraKitError("--device cuda: no CUDA device is available (try --device cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LoraKitError("--device mps: no MPS device is available (try --device cpu)")
    return name


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


@contextlib.contextmanager
def quiet_transformers():
    """No load reports, torchvision notices or weight-loading bars in the middle of our own progress bar."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def model_config(path: str, option: str):
    """The folder's transformers config, after checking that the folder exists and is a model folder."""
    from transformers import AutoConfig

    p = Path(path)
    if not p.exists():
        raise LoraKitError(f"{option} {path}: no such folder")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise LoraKitError(f"{option} {path}: not a transformers model folder (no config.json)")
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(p)
    except (OSError, ValueError, KeyError) as e:
        raise LoraKitError(f"{option} {path}: unreadable config.json ({_one_line(e)})") from None


def load_model(cls, path: str, option: str, device: str, dtype):
    """`cls.from_pretrained(path)` in eval mode on `device`; every weight must come from the folder."""
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(path, output_loading_info=True, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise LoraKitError(f"{option} {path}: cannot load {cls.__name__} ({_one_line(e)})") from None
    mismatched = [k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys") or []]
    missing = sorted(info.get("missing_keys") or []) + sorted(mismatched)
    if missing:
        raise LoraKitError(f"{option} {path}: {len(missing)} weights of {type(model).__name__} are missing or "
                           f"mismatched (e.g. {missing[0]}); not a complete model of that kind")  # fmt: skip
    return model.to(device).eval()


def load_processor(path: str, option: str):
    from transformers import AutoProcessor

    try:
        with quiet_transformers():
            return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LoraKitError(f"{option} {path}: no usable processor/tokenizer files ({_one_line(e)})") from None


def to_device(inputs, device: str, dtype) -> dict:
    """Tensors to `device`; floating ones (pixel values) to the model's dtype, ids and masks left as they are."""
    out = {}
    for k, v in dict(inputs).items():
        if hasattr(v, "to"):
            v = v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device)
        out[k] = v
    return out


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")
