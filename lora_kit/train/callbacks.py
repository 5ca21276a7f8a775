"""Side concerns of training, as callbacks `cb(step, loss, context)` the loop calls after each optimizer step:
validation sample grids (PNG) and the loss log (CSV, plus tensorboard when it is installed)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from ..state import components
from .config import TrainConfig


def grid(images, columns: int = 2):
    """Images (PIL, same size) tiled row-major into one image."""
    from PIL import Image

    w, h = images[0].size
    rows = -(-len(images) // columns)
    out = Image.new("RGB", (columns * w, rows * h), "white")
    for i, img in enumerate(images):
        out.paste(img, ((i % columns) * w, (i // columns) * h))
    return out


class Validation:
    """Every `validate_every` steps: 4 samples of `validation_prompt` (seeds 0-3) as one grid PNG in
    `<output stem>-samples/step-N.png`, drawn with the weights the run writes (context["weights"]: --ema's average,
    schedule-free's), the live ones restored after."""

    def __init__(self, cfg: TrainConfig, n: int = 4):
        self.cfg, self.n, self.folder = cfg, n, cfg.samples_dir

    def __call__(self, step: int, loss: float, context: dict) -> None:
        cfg = self.cfg
        if not (cfg.validation_prompt and cfg.validate_every) or (step % cfg.validate_every and step != cfg.steps):
            return
        pipe = context["pipe"]
        modules = list(components(pipe).values())  # the UNet/transformer and every text encoder
        modes = [(m, m.training) for module in modules for m in module.modules()]  # adapters train, the rest not
        for m in modules:
            m.eval()
        from ..models import _quiet_loggers

        # diffusers would echo a long prompt's cut words on every sample
        with torch.no_grad(), _quiet_loggers(), context.get("weights", nullcontext)():
            images = [
                pipe(cfg.validation_prompt, num_inference_steps=cfg.validation_steps, height=cfg.resolution,
                     width=cfg.resolution, generator=torch.Generator().manual_seed(i)).images[0]
                for i in range(self.n)
            ]  # fmt: skip
        for m, mode in modes:
            m.train(mode)
        self.folder.mkdir(parents=True, exist_ok=True)
        grid(images).save(self.folder / f"step-{step}.png")


class LossLog:
    """`loss.csv` (step, loss, learning rate) in `logdir`, and tensorboard scalars when tensorboard is installed."""

    def __init__(self, cfg: TrainConfig):
        self.folder = Path(cfg.logdir) if cfg.logdir else None
        self.writer = None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.folder))
            except ImportError:  # tensorboard is optional; the CSV is always written
                self.writer = None

    def __call__(self, step: int, loss: float, context: dict) -> None:
        if self.folder is None:
            return
        lr = context["optimizer"].param_groups[0]["lr"]
        csv = self.folder / "loss.csv"
        if not csv.exists():
            csv.write_text("step,loss,lr\n")
        with csv.open("a") as f:
            f.write(f"{step},{loss:.6f},{lr:.6g}\n")
        if self.writer is not None:
            self.writer.add_scalar("loss", loss, step)
            self.writer.add_scalar("lr", lr, step)
            self.writer.flush()


def default_callbacks(cfg: TrainConfig) -> list:
    return [Validation(cfg), LossLog(cfg)]
