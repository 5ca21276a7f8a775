"""Crop geometry: where each crop window lies in the upright source image, and resizing image and mask through it.

A window is (left, top, right, bottom) in source pixels (floats) with the target's aspect ratio; resizing through
it with PIL's `box=` argument gives exactly the requested size without an intermediate image.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .images import Rejected

Box = tuple[float, float, float, float]

# The most a random crop zooms in beyond the smallest window that covers the target (1.5 = up to 2/3 of a side).
MAX_RANDOM_ZOOM = 1.5
MAX_ASPECT = 4.0  # the widest aspect ratio lora-train's buckets take (train/data.py: bucket), 4:1 as kohya's


@dataclass
class Crop:
    box: Box  # in source pixels
    size: tuple[int, int]  # (width, height) written


def plan(size: tuple[int, int], target: tuple[int, int], mode: str, count: int = 1,
         centre: tuple[float, float] | None = None, upscale: bool = False, seed: str = "0") -> list[Crop]:  # fmt: skip
    """The crops of one image. `centre` is (x, y) in [0, 1] image fractions (the mask's centroid for `subject`);
    `seed` makes random crops a function of the run's seed and the image alone."""
    w, h = size
    tw, th = target
    if mode == "none":
        # Keep the aspect ratio (lora-train buckets it) and about tw*th pixels; only enlarge when asked to. Beyond
        # the buckets' 1:4..4:1 the excess is centre-cropped: lora-train would crop it anyway.
        aspect = min(max(w / h, 1 / MAX_ASPECT), MAX_ASPECT)
        cw, ch = min(w, h * aspect), min(h, w / aspect)
        s = math.sqrt(tw * th / (cw * ch))
        if s > 1 and not upscale:
            s = 1.0
        box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
        return [Crop(box, (max(1, round(cw * s)), max(1, round(ch * s))))]
    check_fits(size, target, mode, upscale)
    cover = max(tw / w, th / h)  # the scale at which the image just covers the target
    if mode in ("center", "subject"):
        cx, cy = centre if (mode == "subject" and centre is not None) else (0.5, 0.5)
        return [Crop(window(size, target, cover, (cx * w, cy * h)), target)]
    if mode == "random":
        rng = random.Random(f"{seed}")
        crops = []
        for _ in range(count):
            s = cover * rng.uniform(1.0, MAX_RANDOM_ZOOM)
            if not upscale:
                s = max(cover, min(s, 1.0))
            cw, ch = tw / s, th / s
            left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            crops.append(Crop((left, top, left + cw, top + ch), target))
        return crops
    raise ValueError(mode)


def check_fits(size: tuple[int, int], target: tuple[int, int], mode: str, upscale: bool) -> None:
    """Rejected("too small") when a fixed-size crop would have to enlarge the image and enlarging is off."""
    w, h = size
    if mode != "none" and not upscale and (w < target[0] or h < target[1]):
        raise Rejected(
            "too small", f"{w}x{h} cannot fill a {target[0]}x{target[1]} crop without enlarging (--upscale)"
        )


def window(size: tuple[int, int], target: tuple[int, int], scale: float, centre: tuple[float, float]) -> Box:
    """The window that `scale` maps onto `target`, centred on `centre` (pixels) as far as the image allows.

    Clamping keeps `centre` inside: the window is at most the image, so sliding it back in never passes the centre.
    """
    w, h = size
    cw, ch = min(w, target[0] / scale), min(h, target[1] / scale)
    left = min(max(centre[0] - cw / 2, 0.0), w - cw)
    top = min(max(centre[1] - ch / 2, 0.0), h - ch)
    return (left, top, left + cw, top + ch)


def apply(image, crop: Crop, resample: str):
    """The RGB image resized through the crop window."""
    from PIL import Image

    filters = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "box": Image.BOX}
    return image.resize(crop.size, filters[resample], box=crop.box)


def apply_to_mask(prob, source_size: tuple[int, int], crop: Crop):
    """A float probability map covering the whole source (any resolution) -> float32 array of the crop's size."""
    import numpy as np
    from PIL import Image

    mh, mw = prob.shape
    sx, sy = mw / source_size[0], mh / source_size[1]
    left, top, right, bottom = crop.box
    img = Image.fromarray(prob.astype(np.float32), "F")
    out = img.resize(crop.size, Image.BILINEAR, box=(left * sx, top * sy, right * sx, bottom * sy))
    return np.asarray(out, dtype=np.float32)


def centroid(prob) -> tuple[float, float] | None:
    """(x, y) centre of mass of a [0, 1] map as fractions of its width and height; None when it is empty."""
    import numpy as np

    prob = np.asarray(prob, dtype=np.float64)
    total = float(prob.sum())
    if total <= 0:
        return None
    h, w = prob.shape
    xs = (np.arange(w) + 0.5) / w
    ys = (np.arange(h) + 0.5) / h
    return float((prob.sum(axis=0) * xs).sum() / total), float((prob.sum(axis=1) * ys).sum() / total)
