"""DreamBooth prior preservation: class images, the user's own and those the base model draws, cached on disk.

The class folder (--class-data, default `<output stem>-class-images/`) may hold the user's own class images, under
any name, captioned by their `.txt` or else by the first class prompt: they are used first, and the base model
draws only the shortfall up to `num_class_images`. Drawn image i is `class-NNNNN.png` (its prompt in
`class-NNNNN.txt`), made from prompt i mod n with seed `seed + i`, so the set is reproducible and an interrupted
generation resumes where it stopped. `class-images.json` records what drew them (model, prompts, resolution,
guidance, denoising steps, seed): a folder whose drawn images came from other settings is refused, never reused
under another prompt or model, and never deleted.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from ..errors import LoraKitError
from ..models import _quiet_loggers
from .config import TrainConfig, split_prompts
from .data import IMAGE_SUFFIXES, Example, files_under, scan

RECORD = "class-images.json"
_DRAWN = re.compile(r"^class-(\d{5,})\.png$")


def uses_prior(cfg: TrainConfig) -> bool:
    """DreamBooth's prior preservation; pivotal tuning takes it too when given a class prompt."""
    return cfg.mode == "dreambooth" or (cfg.mode == "pivotal" and bool(cfg.class_prompt))


def class_folder(cfg: TrainConfig) -> Path:
    if cfg.class_data:
        return Path(cfg.class_data)
    return cfg.beside_output("-class-images")


def _drawn(folder: Path) -> dict[int, Path]:
    """The images the base model drew in `folder`, by index."""
    found = (_DRAWN.match(p.name) for p in folder.iterdir()) if folder.is_dir() else ()
    return {int(m.group(1)): folder / m.group(0) for m in found if m}


def _own(folder: Path) -> list[Path]:
    """The user's class images in `folder` (any image that is not a drawn one)."""
    if not folder.is_dir():
        return []
    images = (p for p in files_under(folder) if p.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(p for p in images if not (p.parent == folder and _DRAWN.match(p.name)))


def record(cfg: TrainConfig) -> dict:
    """What draws the class images of `cfg` (the content of class-images.json)."""
    from .checkpoints import model_fingerprint

    prompts = split_prompts(cfg.class_prompt)
    return {"model": cfg.model, "model_files": model_fingerprint(cfg.model), "prompts": prompts,
            "resolution": cfg.resolution, "guidance": cfg.class_guidance, "steps": cfg.validation_steps,
            "seed": cfg.seed}  # fmt: skip


def _shown(value) -> str:
    if value is None:
        return "unset"
    return repr("|".join(value)) if isinstance(value, list) else repr(value)


def check_class_folder(cfg: TrainConfig) -> None:
    """Refuse a class folder whose drawn images came from other settings than `cfg` (one error naming the first
    difference), or whose drawn images have no record of what drew them."""
    folder = class_folder(cfg)
    if not _drawn(folder):
        return
    again = "move them away (or use another --class-data) to draw new ones"
    try:
        old = json.loads((folder / RECORD).read_text())
        if not isinstance(old, dict):
            raise ValueError
    except (OSError, ValueError):
        raise LoraKitError(f"{folder}: holds class-NNNNN.png images without a readable {RECORD} saying what drew "
                           f"them; {again}") from None  # fmt: skip
    new = record(cfg)
    if old.get("model_files") != new["model_files"]:
        was = old.get("model")
        how = f"--model {was}, not {cfg.model}" if was != cfg.model else f"--model {was} before its files changed"
        raise LoraKitError(f"{folder}: its class images were drawn by {how}; {again}")
    for key, flag in (("prompts", "--class-prompt"), ("resolution", "--resolution"), ("guidance", "--class-guidance"),
                      ("steps", "--validation-steps"), ("seed", "--seed")):  # fmt: skip
        if old.get(key) != new[key]:
            was, now = (_shown(old.get(key)), _shown(new[key]))
            raise LoraKitError(f"{folder}: its class images were drawn with {flag} {was}, not {now}; {again}")


def class_examples(cfg: TrainConfig, pipe, accelerator) -> list[Example]:
    """The `num_class_images` class examples: the user's own images in the class folder first, then drawn ones (the
    missing ones drawn now, by the main process)."""
    from tqdm import tqdm

    check_class_folder(cfg)
    folder = class_folder(cfg)
    prompts = split_prompts(cfg.class_prompt)
    own = _own(folder)
    need = max(0, cfg.num_class_images - len(own))
    # an image and its prompt: the .txt is written after the image is in place, so a run killed in between leaves an
    # image without its .txt (written by the next run), never a .txt without an image (which scan refuses)
    missing = [i for i in range(need) if not all((folder / f"class-{i:05d}{s}").exists() for s in (".png", ".txt"))]
    if missing and accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / RECORD).exists():
            tmp = folder / f".{RECORD}.tmp"
            tmp.write_text(json.dumps(record(cfg), indent=1) + "\n")
            tmp.rename(folder / RECORD)
        guidance = {} if cfg.class_guidance is None else {"guidance_scale": cfg.class_guidance}
        for i in tqdm(missing, desc="class images", file=sys.stderr, disable=None):
            prompt = prompts[i % len(prompts)]
            if not (folder / f"class-{i:05d}.png").exists():
                g = torch.Generator().manual_seed(cfg.seed + i)
                with torch.no_grad(), _quiet_loggers():  # diffusers' echo of a long prompt's cut words
                    image = pipe(prompt, num_inference_steps=cfg.validation_steps, generator=g,
                                 height=cfg.resolution, width=cfg.resolution, **guidance).images[0]  # fmt: skip
                tmp = folder / f".class-{i:05d}.png.tmp"
                image.save(tmp, format="PNG")
                tmp.rename(folder / f"class-{i:05d}.png")
            tmp = folder / f".class-{i:05d}.txt.tmp"
            tmp.write_text(prompt)
            tmp.rename(folder / f"class-{i:05d}.txt")
    accelerator.wait_for_everyone()
    examples, _ = scan(folder, prompts[0])
    drawn = {path: i for i, path in _drawn(folder).items()}
    mine = [ex for ex in examples if ex.image not in drawn][: cfg.num_class_images]
    return mine + sorted((ex for ex in examples if drawn.get(ex.image, need) < need), key=lambda ex: drawn[ex.image])
