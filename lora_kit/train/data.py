"""Training data: find images and captions, validate them, bucket by aspect ratio, and plan batches.

Captions come from a lora-ppim `manifest.jsonl`, else from a same-name `.txt`, else from `--instance-prompt`.
kohya repeat folders (`10_name/`) repeat their images, also a manifest's (lora-ppim keeps them: `images/10_name/`).
An image that cannot be read (lora-ppim's check: not an image, corrupt, truncated, a decompression bomb) is skipped
by name; anything else wrong with the data (a caption that is not UTF-8, a manifest field of the wrong type, a mask
that is missing, unreadable or not its image's size, a folder that cannot be read) is one error at scan time, before
the model loads.

Every random choice (order, flips, caption dropout) is a pure function of (seed, step, sample), so a resumed run
and a multi-process run see exactly the same data.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LoraKitError
from ..formats.files import special_kind
from ..preprocess.crop import bucket  # shared with lora-ppim --crop none
from ..preprocess.images import Rejected, decoded, open_quietly, upright

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
    img = open_quietly(path)
    img.load()
    return upright(img)[0].convert("RGB")


def _size(path: Path) -> tuple[int, int] | None:
    """(width, height) of a readable image, upright; None for a file lora-ppim would reject (not an image, corrupt,
    truncated, a decompression bomb)."""
    try:
        with decoded(path, animated_ok=True) as img:  # an animated image trains on its first frame
            return upright(img)[0].size
    except Rejected:
        return None


def _mask_problem(mask: Path, image: Path, size: tuple[int, int]) -> str | None:
    """Why the manifest's `mask` cannot weight the loss of `image` (upright `size`), or None: masks are read when a
    batch is drawn, so they are checked here, before training starts."""
    if not mask.is_file():
        return f"mask {mask} of image {image}: no such file"
    try:
        with decoded(mask) as m:
            mask_size = m.size
    except Rejected as r:
        return f"mask {mask} of image {image}: {r.reason} ({r.detail})"
    if mask_size != size:
        w, h = mask_size
        return f"mask {mask} of image {image} is {w}x{h}, the image {size[0]}x{size[1]}; a mask must have its size"
    return None


def _read_text(path: Path, what: str) -> str:
    """The text of a caption file or manifest; one error naming it when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: Notepad's byte-order mark is not part of the caption
    except UnicodeDecodeError as e:
        raise LoraKitError(f"{path}: {what} is not UTF-8 text (byte {e.start}: {e.object[e.start]:#04x})") from None


def _txt_caption(image: Path, instance_prompt: str | None) -> str:
    """The caption of `image` from its same-name .txt, else the instance prompt ("" when neither)."""
    txt = image.with_suffix(".txt")
    if txt.exists() and not txt.is_file():  # (a folder read as no caption was reported as a missing caption)
        what = "a folder" if txt.is_dir() else special_kind(txt)
        raise LoraKitError(f"{txt}: the caption of {image.name} is {what}, not a text file")
    return _read_text(txt, "the caption file").strip() if txt.is_file() else (instance_prompt or "")


def _repeats(image: Path, root: Path) -> int:
    """kohya's repeat folders: an image directly in a folder `N_name` below `root` counts N times, others once. The
    same for a manifest's images, so lora-ppim's images/N_name/ (it keeps the input's folders) repeat as before."""
    match = _REPEATS.match(image.parent.name) if image.parent != root else None
    return int(match.group(1)) if match else 1


def files_under(root: Path, hidden: bool = True) -> list[Path]:
    """Every file under `root`, sorted (symlinked folders not followed, as rglob; hidden files and folders left out
    unless `hidden`). A folder that cannot be read is an error: rglob would skip it, and its images, silently."""

    def refuse(e: OSError):
        raise LoraKitError(f"{e.filename}: cannot read this folder ({e.strerror}), so its files would be left out")

    found = []
    for folder, dirs, names in os.walk(root, onerror=refuse):
        if not hidden:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            names = [n for n in names if not n.startswith(".")]
        found += [Path(folder, n) for n in names]
    return sorted(p for p in found if p.is_file())


# what the fields lora-train reads may hold (the others lora-ppim writes, source, width, ..., are for people)
MANIFEST_FIELDS = {
    "image": ((str,), "a path relative to the manifest"),
    "caption": ((str, type(None)), "text or null"),
    "mask": ((str, type(None)), "a path relative to the manifest, or null"),
}


def _manifest(manifest: Path, instance_prompt: str | None) -> list[Example]:
    """The examples of a lora-ppim manifest.jsonl; one error naming the line of an entry that is not one."""
    root, examples = manifest.parent, []
    for n, line in enumerate(_read_text(manifest, "the manifest").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict) or "image" not in entry:
            raise LoraKitError(f"{manifest}: line {n} is not a manifest entry with an 'image'")
        for key, (kinds, wanted) in MANIFEST_FIELDS.items():
            value = entry.get(key)
            if not isinstance(value, kinds) or (key == "image" and not value.strip()):
                raise LoraKitError(f"{manifest}: line {n}: {key!r} is {value!r}; it must be {wanted}")
        image = root / entry["image"]
        mask = root / entry["mask"] if entry.get("mask") else None
        caption = (entry.get("caption") or "").strip() or _txt_caption(image, instance_prompt)
        examples.append(Example(image, caption, mask, repeats=_repeats(image, root)))
    return examples


def candidates(folder: str | Path, instance_prompt: str | None = None) -> list[Example]:
    """The examples `scan` considers, before any image is opened: a manifest's entries, else every image under
    `folder` (hidden folders too) with its .txt caption. The one rule for which files training reads, which the
    resume fingerprint (checkpoints.data_fingerprint) covers too."""
    root = Path(folder)
    if root.is_file():
        raise LoraKitError(f"{root}: is a file; the data must be a folder of images (or a lora-ppim output folder)")
    if not root.is_dir():
        raise LoraKitError(f"{root}: no such data folder")
    manifest = root / "manifest.jsonl"
    if manifest.is_file():
        return _manifest(manifest, instance_prompt)
    found = files_under(root)
    images = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
    stems = {p.with_suffix("") for p in images}
    orphans = [t for t in found if t.suffix == ".txt" and t.with_suffix("") not in stems]
    if orphans:
        raise LoraKitError(f"{orphans[0]}: caption file without an image (expected {orphans[0].stem}.png/.jpg)")
    return [Example(p, _txt_caption(p, instance_prompt), None, repeats=_repeats(p, root)) for p in images]


def scan(folder: str | Path, instance_prompt: str | None = None) -> tuple[list[Example], list[Path]]:
    """(usable examples, the unreadable images skipped) in `folder`; errors for what cannot train at all, or would
    fail later (a caption that is not text, a bad manifest entry or mask)."""
    root = Path(folder)
    considered = candidates(root, instance_prompt)
    if not considered:
        raise LoraKitError(f"{root}: no images (jpg, png, webp) found")
    examples, skipped = [], []
    for ex in considered:
        size = _size(ex.image) if ex.image.is_file() else None
        if size is None:
            skipped.append(ex.image)
            continue
        if not ex.caption:
            raise LoraKitError(f"{ex.image}: no caption (.txt, manifest) and no --instance-prompt")
        if ex.mask is not None and (problem := _mask_problem(ex.mask, ex.image, size)):
            raise LoraKitError(problem)
        ex.size = size
        examples.append(ex)
    if not examples:
        raise LoraKitError(f"{root}: none of the {len(considered)} images could be read")
    return examples, skipped


def cover(source: tuple[int, int], size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """How an image of `source` (width, height) becomes `size`: ((width, height) it is resized to, covering `size`),
    ((left, top) of the centre crop in the resized image)."""
    (sw, sh), (w, h) = source, size
    scale = max(w / sw, h / sh)
    rw, rh = max(w, round(sw * scale)), max(h, round(sh * scale))
    return (rw, rh), ((rw - w) // 2, (rh - h) // 2)


def sdxl_time_ids(source: tuple[int, int], size: tuple[int, int]) -> list[int]:
    """SDXL's size conditioning of an image of `source` (width, height) trained at `size`, as diffusers' SDXL
    trainers and sd-scripts build it: (original height, original width, crop top, crop left, target height, target
    width), the crop in the resized image's pixels. A flip leaves it unchanged (as diffusers' example)."""
    _, (left, top) = cover(source, size)
    return [source[1], source[0], top, left, size[1], size[0]]


def load(example: Example, size: tuple[int, int], flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pixels (3, H, W) in [-1, 1] and the mask (H, W) in [0, 1] (or None): resized to cover, centre-cropped."""
    from PIL import Image

    def fit(img, resample):
        w, h = size
        resized, (left, top) = cover(img.size, size)
        img = img.resize(resized, resample)
        img = img.crop((left, top, left + w, top + h))
        return img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img

    pixels = np.asarray(fit(_open(example.image), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    mask = None
    if example.mask is not None:
        if not example.mask.is_file():
            raise LoraKitError(f"{example.mask}: mask listed in the manifest is missing")
        m = fit(open_quietly(example.mask).convert("L"), Image.BILINEAR)
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
