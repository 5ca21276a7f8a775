"""The toy world: a deterministic generator of captioned 64x64 images (shapes x colours x backgrounds).

Pretraining sees "a {colour} {shape} on a {colour} background" with random size and position (shape and background
colours always differ). Two concepts are held out of pretraining, for the trainers to learn from a few images:

- the subject: one specific half-and-half circle (left half red, right half white), captioned "a sks circle";
  its features span many latent pixels, so the VAE can carry it (a 4 px checkerboard could not);
- the attribute: wide horizontal stripes ("a striped {shape}"), bands of 8 px alternating the shape colour and white.

Every image is a pure function of (split, index, seed): the same call gives the same pixels on any machine.

    python datasets/toyworld/generate.py OUT_DIR --count 200 [--split train|subject|striped]
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
    "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle", "cross")
SIZE = 64
SUBJECT = {"token": "sks", "class": "circle", "left": "red", "right": "white"}
STRIPE = 8  # px per band: two latent pixels at the VAE's 4x downsampling


@dataclass(frozen=True)
class Sample:
    shape: str
    colour: str
    background: str
    cx: int
    cy: int
    radius: int
    kind: str = "plain"  # plain | subject | striped

    @property
    def caption(self) -> str:
        if self.kind == "subject":
            return f"a {SUBJECT['token']} {SUBJECT['class']} on a {self.background} background"
        if self.kind == "striped":
            return f"a striped {self.shape} on a {self.background} background"
        return f"a {self.colour} {self.shape} on a {self.background} background"


def colourless(caption: str) -> str:
    """The caption without the shape's colour word ("a red circle on a blue background" -> "a circle on a blue
    background"): the class as a whole, which a DreamBooth class prompt names; other captions come back unchanged."""
    words = caption.split(" ")
    if len(words) > 2 and words[0] == "a" and words[1] in COLOURS:
        return " ".join([words[0], *words[2:]])
    return caption


def sample(split: str, index: int, seed: int = 0) -> Sample:
    """The index-th sample of a split: 'train' (pretraining), 'subject' or 'striped' (held-out concepts)."""
    r = random.Random(f"{seed}/{split}/{index}")
    names = list(COLOURS)
    radius = r.randint(12, 22)
    cx, cy = r.randint(radius + 2, SIZE - radius - 2), r.randint(radius + 2, SIZE - radius - 2)
    if split == "subject":
        background = r.choice([c for c in names if c not in (SUBJECT["left"], SUBJECT["right"])])
        return Sample(SUBJECT["class"], "red/white", background, cx, cy, radius, "subject")
    shape = r.choice(SHAPES)
    colour = r.choice([c for c in names if c != "white"] if split == "striped" else names)
    background = r.choice([c for c in names if c not in (colour, "white" if split == "striped" else colour)])
    return Sample(shape, colour, background, cx, cy, radius, "striped" if split == "striped" else "plain")


def _mask(s: Sample) -> Image.Image:
    """The shape's silhouette as a 1-bit image."""
    m = Image.new("1", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(m)
    x0, y0, x1, y1 = s.cx - s.radius, s.cy - s.radius, s.cx + s.radius, s.cy + s.radius
    if s.shape == "circle":
        d.ellipse((x0, y0, x1, y1), fill=1)
    elif s.shape == "square":
        d.rectangle((x0, y0, x1, y1), fill=1)
    elif s.shape == "triangle":
        d.polygon([(s.cx, y0), (x1, y1), (x0, y1)], fill=1)
    else:  # cross: two bars a third of the size wide
        w = max(3, s.radius // 3)
        d.rectangle((x0, s.cy - w, x1, s.cy + w), fill=1)
        d.rectangle((s.cx - w, y0, s.cx + w, y1), fill=1)
    return m


def render(s: Sample) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), COLOURS[s.background])
    mask = _mask(s)
    if s.kind == "subject":
        left = Image.new("RGB", (SIZE, SIZE), COLOURS[SUBJECT["left"]])
        right = Image.new("RGB", (SIZE, SIZE), COLOURS[SUBJECT["right"]])
        fill = left.copy()
        fill.paste(right.crop((s.cx, 0, SIZE, SIZE)), (s.cx, 0))
    elif s.kind == "striped":
        fill = Image.new("RGB", (SIZE, SIZE), COLOURS["white"])
        d = ImageDraw.Draw(fill)
        for y in range(0, SIZE, 2 * STRIPE):
            d.rectangle((0, y, SIZE, y + STRIPE - 1), fill=COLOURS[s.colour])
    else:
        fill = Image.new("RGB", (SIZE, SIZE), COLOURS[s.colour])
    img.paste(fill, (0, 0), mask)
    return img


def scene(index: int, seed: int = 0) -> Image.Image:
    """An uncaptioned picture of 2-4 overlapping shapes in random colours: what a general image codec must carry
    (edges between two colours inside an object) without any held-out concept. Only the VAE decoder sees these."""
    r = random.Random(f"{seed}/scene/{index}")
    names = list(COLOURS)
    img = Image.new("RGB", (SIZE, SIZE), COLOURS[r.choice(names)])
    for _ in range(r.randint(2, 4)):
        radius = r.randint(6, 22)
        s = Sample(r.choice(SHAPES), r.choice(names), "black", r.randint(0, SIZE), r.randint(0, SIZE), radius)
        img.paste(COLOURS[s.colour], (0, 0, SIZE, SIZE), _mask(s))
    return img


def write(folder: str | Path, split: str = "train", count: int = 200, seed: int = 0, start: int = 0) -> Path:
    """Images + same-name .txt captions + labels.jsonl (ground truth for the judge) in `folder`."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "labels.jsonl").open("w") as labels:
        for i in range(start, start + count):
            s = sample(split, i, seed)
            name = f"{split}-{i:06d}"
            render(s).save(out / f"{name}.png")
            (out / f"{name}.txt").write_text(s.caption)
            labels.write(json.dumps({"image": f"{name}.png", "caption": s.caption, **asdict(s)}) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--split", choices=("train", "subject", "striped"), default="train")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0)
    args = parser.parse_args(argv)
    write(args.out, args.split, args.count, args.seed, args.start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
