"""Training data: find images and captions, validate them, bucket by aspect ratio, and plan batches.

Captions come from a lora-ppim `manifest.jsonl`, else from a same-name `.txt`, else from `--instance-prompt`.
kohya repeat folders (`10_name/`) repeat their images. Every random choice (order, flips, caption dropout) is a pure
function of (seed, step, sample), so a resumed run and a multi-process run see exactly the same data.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LoraKitError
from ..preprocess.crop import MAX_ASPECT

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_REPEATS = re.compile(r"^(\d+)_(.+)$")


@dataclass
class Example:
    image: Path
    caption: str
    mask: Path | None = None
    size: tuple[int, int] = (0, 0)  # (width, height) of the source image
    repeats: int = 1


def _open(path: Path):
    from PIL import Image, ImageOps

    img = Image.open(path)
    img.load()
    return ImageOps.exif_transpose(img).convert("RGB")


def _size(path: Path) -> tuple[int, int] | None:
    """(width, height) of a readable image, None for a corrupt or non-image file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
        return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


def _txt_caption(image: Path, instance_prompt: str | None) -> str:
    """The caption of `image` from its same-name .txt, else the instance prompt ("" when neither)."""
    txt = image.with_suffix(".txt")
    return txt.read_text().strip() if txt.is_file() else (instance_prompt or "")


def scan(folder: str | Path, instance_prompt: str | None = None) -> tuple[list[Example], list[Path]]:
    """(usable examples, the unreadable images skipped) in `folder`; errors for what cannot train at all."""
    root = Path(folder)
    if root.is_file():
        raise LoraKitError(f"{root}: is a file; the data must be a folder of images (or a lora-ppim output folder)")
    if not root.is_dir():
        raise LoraKitError(f"{root}: no such data folder")
    manifest = root / "manifest.jsonl"
    candidates: list[Example] = []
    if manifest.is_file():
        for n, line in enumerate(manifest.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                image = root / entry["image"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LoraKitError(f"{manifest}: line {n} is not a manifest entry with an 'image'") from None
            mask = root / entry["mask"] if entry.get("mask") else None
            candidates.append(Example(image, entry.get("caption") or _txt_caption(image, instance_prompt), mask))
    else:
        images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        stems = {p.with_suffix("") for p in images}
        orphans = [t for t in sorted(root.rglob("*.txt")) if t.with_suffix("") not in stems]
        if orphans:
            raise LoraKitError(f"{orphans[0]}: caption file without an image (expected {orphans[0].stem}.png/.jpg)")
        for p in images:
            caption = _txt_caption(p, instance_prompt)
            match = _REPEATS.match(p.parent.name) if p.parent != root else None
            candidates.append(Example(p, caption, None, repeats=int(match.group(1)) if match else 1))
    if not candidates:
        raise LoraKitError(f"{root}: no images (jpg, png, webp) found")
    examples, skipped = [], []
    for ex in candidates:
        size = _size(ex.image) if ex.image.is_file() else None
        if size is None:
            skipped.append(ex.image)
            continue
        if not ex.caption:
            raise LoraKitError(f"{ex.image}: no caption (.txt, manifest) and no --instance-prompt")
        ex.size = size
        examples.append(ex)
    if not examples:
        raise LoraKitError(f"{root}: none of the {len(candidates)} images could be read")
    return examples, skipped


def bucket(size: tuple[int, int], resolution: int, step: int, enabled: bool = True) -> tuple[int, int]:
    """(width, height) near resolution^2 pixels at the image's aspect ratio, both multiples of `step`."""
    if not enabled:
        return resolution, resolution
    w, h = size
    aspect = min(max(w / h, 1 / MAX_ASPECT), MAX_ASPECT)
    bw = max(step, round(resolution * aspect**0.5 / step) * step)
    bh = max(step, round(resolution / aspect**0.5 / step) * step)
    return bw, bh


def load(example: Example, size: tuple[int, int], flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pixels (3, H, W) in [-1, 1] and the mask (H, W) in [0, 1] (or None): resized to cover, centre-cropped."""
    from PIL import Image

    def fit(img, resample):
        w, h = size
        scale = max(w / img.width, h / img.height)
        img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), resample)
        left, top = (img.width - w) // 2, (img.height - h) // 2
        img = img.crop((left, top, left + w, top + h))
        return img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img

    pixels = np.asarray(fit(_open(example.image), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    mask = None
    if example.mask is not None:
        if not example.mask.is_file():
            raise LoraKitError(f"{example.mask}: mask listed in the manifest is missing")
        m = fit(Image.open(example.mask).convert("L"), Image.BILINEAR)
        mask = torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), mask


def rng(seed: int, *keys: int) -> random.Random:
    """A generator determined by (seed, keys): the same choice in every process and after a resume."""
    return random.Random(hash((seed, *keys)) & 0xFFFFFFFF)


def torch_generator(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash((seed, *keys)) & 0x7FFFFFFFFFFFFFFF)


class Plan:
    """Which examples form the batch of each step: bucketed, shuffled per epoch, all determined by the seed."""

    def __init__(self, examples: list[Example], batch_size: int, resolution: int, step: int, seed: int,
                 buckets: bool = True):  # fmt: skip
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.sizes = [bucket(ex.size, resolution, step, buckets) for ex in examples]
        self._epochs: dict[int, list[list[int]]] = {}
        groups: dict[tuple[int, int], list[int]] = {}
        for i, ex in enumerate(examples):
            groups.setdefault(self.sizes[i], []).extend([i] * ex.repeats)
        self.groups = groups
        self.per_epoch = len(self._epoch(0))  # every epoch has as many batches: only their order changes

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            r = rng(self.seed, 1, epoch)
            batches = []
            for key in sorted(self.groups):
                idx = list(self.groups[key])
                r.shuffle(idx)
                while len(idx) < self.batch_size:  # a bucket smaller than a batch repeats its images
                    idx += idx[: self.batch_size - len(idx)]
                batches += [idx[i : i + self.batch_size] for i in range(0, len(idx) - self.batch_size + 1,
                                                                        self.batch_size)]  # fmt: skip
            r.shuffle(batches)
            self._epochs = {epoch: batches}
        return self._epochs[epoch]

    def batch(self, index: int) -> list[int]:
        """Example indices of micro-batch `index` (global across processes)."""
        epoch_batches = self._epoch(index // self.per_epoch)
        return epoch_batches[index % self.per_epoch % len(epoch_batches)]
