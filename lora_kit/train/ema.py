"""--ema: an fp32 exponential moving average of the trainable tensors, and the weights a run shows and writes.

After every optimizer step each average becomes `decay * average + (1 - decay) * weight` (starting from the initial
weights, with no warmup of the decay). Validation samples and the written file use the average; checkpoints hold it
beside the live weights (checkpoints.py), so a resumed run continues it bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class EMA:
    def __init__(self, decay: float, params: list[torch.nn.Parameter]):
        self.decay, self.params = decay, list(params)
        self.average = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for avg, p in zip(self.average, self.params, strict=True):
            avg.mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "average": self.average}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's averages; a ValueError when they do not fit these tensors (load_checkpoint says so)."""
        saved = state["average"]
        shapes = [tuple(t.shape) for t in saved]
        if shapes != [tuple(a.shape) for a in self.average]:
            raise ValueError("its EMA tensors are not those of this run's adapters")
        for avg, t in zip(self.average, saved, strict=True):
            avg.copy_(t)


def _schedule_free(optimizer) -> bool:
    """A schedule-free optimizer (train()/eval() swap its iterate and its average into the parameters)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # (accelerate's wrapper)
    return callable(getattr(inner, "eval", None)) and callable(getattr(inner, "train", None))


@contextmanager
def evaluated(recipe, optimizer, ema: EMA | None) -> Iterator[None]:
    """Inside, the trainable tensors hold what the run shows and writes: the EMA with --ema, schedule-free's average
    with --optimizer schedulefree, else the live weights; after, the live weights come back bit for bit."""
    params = recipe.trainable()
    live = [p.detach().clone() for p in params]
    inner = getattr(optimizer, "optimizer", optimizer)
    swaps = ema is None and _schedule_free(optimizer)
    with torch.no_grad():
        if ema is not None:
            for p, avg in zip(params, ema.average, strict=True):
                p.copy_(avg)
        elif swaps:
            inner.eval()
    recipe.after_step()  # (new token rows follow their parameter into the embedding matrix)
    try:
        yield
    finally:
        if swaps:
            inner.train()
        with torch.no_grad():
            for p, value in zip(params, live, strict=True):
                p.copy_(value)
        recipe.after_step()
