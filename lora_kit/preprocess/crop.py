"""Crop geometry: where each crop window lies in the upright source image, and resizing image and mask through it;
and lora-train's aspect-ratio buckets (`bucket`, here so that lora-ppim --crop none writes exactly what lora-train
takes, without importing torch).

A window is (left, top, right, bottom) in source pixels (floats) with the target's aspect ratio; resizing through
it with PIL's `box=` argument gives exactly the requested size without an intermediate image.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .images import Rejected

Box = tuple[float, float, float, float]

# The most a random crop zooms in beyond the smallest window that covers the target (1.5 = up to 2/3 of a side).
MAX_RANDOM_ZOOM = 1.5
MAX_ASPECT = 4.0  # the widest aspect ratio lora-train's buckets take, 4:1 as kohya's
BUCKET_STEP = 64  # bucket sides are multiples of the model's step; 64 (SD1.x/SD2.x, kohya's default) is the coarsest


@dataclass
class Crop:
    box: Box  # in source pixels
    size: tuple[int, int]  # (width, height) written


def bucket(size: tuple[int, int], resolution: int, step: int, enabled: bool = True) -> tuple[int, int]:
    """lora-train's (width, height) for an image of `size`: the image's own size when that is a bucket already
    (`is_bucket`), else near resolution^2 pixels at the image's aspect ratio (at most 4:1), both multiples of `step`.
    So what lora-ppim --crop none writes at step 64 is not resized again by a model whose step is 64, 32 or 16."""
    if not enabled:
        return resolution, resolution
    if is_bucket(size, resolution, step):
        return tuple(size)
    w, h = size
    return _sides(min(max(w / h, 1 / MAX_ASPECT), MAX_ASPECT), resolution, step)


def is_bucket(size: tuple[int, int], resolution: int, step: int) -> bool:
    """Whether lora-train takes an image of `size` as it is: both sides multiples of `step`, at most 4:1, and its
    pixels within the budget of a bucket at the coarsest step that divides both sides (`step` doubled while it does,
    up to BUCKET_STEP): rounding each side to a multiple of that step moves resolution^2 by at most half a step
    times the sides of a 4:1 bucket, plus a quarter step^2. So a bucket of `_sides` at step 64 is its own bucket at
    steps 32 and 16 as well, and what lora-ppim --crop none writes at its default step is not resized again."""
    w, h = size
    if w <= 0 or h <= 0 or w % step or h % step or not 1 / MAX_ASPECT <= w / h <= MAX_ASPECT:
        return False
    coarse = step
    while coarse * 2 <= BUCKET_STEP and w % (coarse * 2) == 0 and h % (coarse * 2) == 0:
        coarse *= 2
    slack = coarse / 2 * (MAX_ASPECT**0.5 + MAX_ASPECT**-0.5) * resolution + coarse**2 / 4
    return abs(w * h - resolution**2) <= slack


def _sides(aspect: float, resolution: int, step: int) -> tuple[int, int]:
    bw = max(step, round(resolution * aspect**0.5 / step) * step)
    bh = max(step, round(resolution / aspect**0.5 / step) * step)
    return bw, bh


def target(size: tuple[int, int], resolution: tuple[int, int], mode: str, step: int = BUCKET_STEP) -> tuple[int, int]:
    """The (width, height) written for an image of `size`: `resolution` for the fixed crops; for `none`, lora-train's
    bucket of the image at `resolution` (square: lora-train's --resolution) and `step`."""
    return bucket(size, resolution[0], step) if mode == "none" else resolution


def plan(size: tuple[int, int], resolution: tuple[int, int], mode: str, count: int = 1,
         centre: tuple[float, float] | None = None, upscale: bool = False, seed: str = "0",
         step: int = BUCKET_STEP) -> list[Crop]:  # fmt: skip
    """The crops of one image, each of `target(size, resolution, mode, step)`. `centre` is (x, y) in [0, 1] image
    fractions (the mask's centroid for `subject`); `seed` makes random crops a function of the run's seed and the
    image alone."""
    check_fits(size, resolution, mode, upscale, step)
    w, h = size
    tw, th = target(size, resolution, mode, step)
    cover = max(tw / w, th / h)  # the scale at which the image just covers the target
    if mode in ("center", "subject", "none"):  # none: the target is the image's bucket, cropped as lora-train would
        cx, cy = centre if (mode == "subject" and centre is not None) else (0.5, 0.5)
        return [Crop(window(size, (tw, th), cover, (cx * w, cy * h)), (tw, th))]
    if mode == "random":
        rng = random.Random(f"{seed}")
        crops = []
        for _ in range(count):
            s = cover * rng.uniform(1.0, MAX_RANDOM_ZOOM)
            if not upscale:
                s = max(cover, min(s, 1.0))
            cw, ch = tw / s, th / s
            left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            crops.append(Crop((left, top, left + cw, top + ch), (tw, th)))
        return crops
    raise ValueError(mode)


def check_fits(size: tuple[int, int], resolution: tuple[int, int], mode: str, upscale: bool,
               step: int = BUCKET_STEP) -> None:  # fmt: skip
    """Rejected("too small") when the crop (its bucket for `none`) would have to enlarge the image and enlarging is
    off."""
    w, h = size
    tw, th = target(size, resolution, mode, step)
    if not upscale and (w < tw or h < th):
        raise Rejected("too small", f"{w}x{h} cannot fill a {tw}x{th} crop without enlarging (--upscale)")


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
