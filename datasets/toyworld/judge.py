"""The toy-world judge: a small CNN trained on generator ground truth that reads shape, colour, background and kind
(plain / the held-out sks subject / striped) off a 64x64 image. The quality benchmark scores samples with it.

Training images get light blur and noise so that the judge also reads the softer images a diffusion model draws.

    python datasets/toyworld/judge.py train OUT.safetensors [--steps 1500]   # ~minutes on CPU
    python datasets/toyworld/judge.py eval JUDGE.safetensors                 # accuracy on held-out generator images
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate  # noqa: E402

COLOURS = list(generate.COLOURS)
KINDS = ["plain", "subject", "striped"]
HEADS = {"shape": list(generate.SHAPES), "colour": COLOURS, "background": COLOURS, "kind": KINDS}


class Judge(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        layers, c = [], 3
        for out in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU(), nn.MaxPool2d(2)]
            c = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(c, len(values)) for name, values in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images) -> list[dict[str, str]]:
        """PIL images -> [{'shape': ..., 'colour': ..., 'background': ..., 'kind': ...}]."""
        x = torch.stack([_pixels(im) for im in images])
        logits = self.eval()(x)
        return [{name: HEADS[name][int(logits[name][i].argmax())] for name in HEADS} for i in range(len(images))]


def _pixels(image) -> torch.Tensor:
    arr = np.asarray(image.convert("RGB").resize((generate.SIZE, generate.SIZE)), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def labels(s: generate.Sample) -> dict[str, int]:
    colour = generate.SUBJECT["left"] if s.kind == "subject" else s.colour
    return {"shape": HEADS["shape"].index(s.shape), "colour": COLOURS.index(colour),
            "background": COLOURS.index(s.background), "kind": KINDS.index(s.kind)}  # fmt: skip


def batch(step: int, size: int, seed: int, augment: bool = True):
    """Mixed splits (70% plain, 15% subject, 15% striped), optionally blurred and noised."""
    from PIL import ImageFilter

    r = np.random.default_rng([seed, step])
    xs, ys = [], {name: [] for name in HEADS}
    for i in range(size):
        u = r.random()
        split = "train" if u < 0.7 else "subject" if u < 0.85 else "striped"
        s = generate.sample(split, step * size + i, seed)
        img = generate.render(s)
        if augment and r.random() < 0.5:
            img = img.filter(ImageFilter.GaussianBlur(float(r.uniform(0.3, 1.5))))
        x = _pixels(img)
        if augment:
            x = x + torch.from_numpy(r.normal(0, r.uniform(0, 0.1), x.shape).astype(np.float32))
        xs.append(x)
        for name, value in labels(s).items():
            ys[name].append(value)
    return torch.stack(xs), {name: torch.tensor(v) for name, v in ys.items()}


def train(out: str | Path, steps: int = 1500, batch_size: int = 64, seed: int = 0, log=print) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for step in range(steps):
        x, y = batch(step, batch_size, seed + 1)
        logits = judge.train()(x)
        loss = sum(nn.functional.cross_entropy(logits[n], y[n]) for n in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log(f"judge {step + 1}/{steps} loss {loss.item():.4f}")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, tmp)
    tmp.rename(out)
    return out


def load(path: str | Path) -> Judge:
    from safetensors.torch import load_file

    judge = Judge()
    judge.load_state_dict(load_file(str(path)))
    return judge.eval()


def accuracy(judge: Judge, n: int = 512, seed: int = 12345) -> dict[str, float]:
    """Per-head accuracy on held-out generator images (a seed the judge never trained on), with augmentation."""
    correct = {name: 0 for name in HEADS}
    with torch.no_grad():
        for step in range(n // 64):
            x, y = batch(step, 64, seed)
            logits = judge(x)
            for name in HEADS:
                correct[name] += int((logits[name].argmax(1) == y[name]).sum())
    return {name: c / (n // 64 * 64) for name, c in correct.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("out")
    t.add_argument("--steps", type=int, default=1500)
    e = sub.add_parser("eval")
    e.add_argument("judge")
    args = parser.parse_args(argv)
    if args.cmd == "train":
        path = train(args.out, args.steps)
        print(accuracy(load(path)))
    else:
        print(accuracy(load(args.judge)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
