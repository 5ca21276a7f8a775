"""Wrapper layers: `LoraInjectedLinear` and `LoraInjectedConv2d`.

A wrapper keeps the original module as `.base` (untouched, so removing the wrapper restores the exact object) and
holds one or more named adapters in `.adapters`. Each adapter has `down`, `up`, a 0-d `alpha` buffer (scale =
alpha / rank), dropout on its input (active in training mode only), a user `weight` and an `enabled` flag.
Adapter parameters are fp32 whatever the base dtype; the forward works under autocast and in plain fp16/bf16/fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import functional


class LoraAdapter(nn.Module):
    """One named adapter: the trainable factors plus alpha, dropout, weight and the enabled flag."""

    def __init__(
        self,
        down_shape: tuple[int, ...],
        up_shape: tuple[int, ...],
        alpha: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        device: torch.device | None = None,
    ):
        super().__init__()
        self.down = nn.Parameter(functional.init_down(down_shape, init).to(device))
        self.up = nn.Parameter(torch.zeros(up_shape, device=device))
        self.register_buffer("alpha", torch.tensor(float(alpha), device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.weight = 1.0  # the user's strength at inference: 0 = off, 1 = as trained
        self.enabled = True

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return functional.lora_scale(self.alpha.item(), self.rank)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha.item():g}, weight={self.weight:g}, enabled={self.enabled}"


class LoraWrapper(nn.Module):
    """What both wrappers share: the adapter table, deltas, and the sum over active adapters."""

    base: nn.Module

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()

    # The subclass says how its adapter factors are shaped and applied.
    def _factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def _apply_adapter(self, x: torch.Tensor, adapter: LoraAdapter) -> torch.Tensor:
        raise NotImplementedError

    @property
    def max_rank(self) -> int:
        weight = self.base.weight
        return min(weight.shape[0], math.prod(weight.shape[1:]))

    def add_adapter(
        self, name: str, rank: int, alpha: float | None = None, dropout: float = 0.0, init: str = "kaiming"
    ) -> LoraAdapter:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this module")
        if not name or "." in name or hasattr(self.adapters, name):  # ModuleDict keys cannot shadow its methods
            raise ValueError(f"adapter name {name!r} is not usable: no dots, and not a torch method name")
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} is not in 1..{self.max_rank} (min of in and out features) for this module")
        down_shape, up_shape = self._factor_shapes(rank)
        adapter = LoraAdapter(
            down_shape, up_shape, rank if alpha is None else alpha, dropout, init, device=self.base.weight.device
        )
        self.adapters[name] = adapter
        return adapter

    def delta_weight(self, name: str | None = None, *, with_weight: bool = True) -> torch.Tensor:
        """fp32 delta of one adapter (or, with name=None, the sum of the enabled ones), shaped like base.weight."""
        names = [name] if name is not None else [n for n, a in self.adapters.items() if a.enabled]
        total = torch.zeros(self.base.weight.shape, dtype=torch.float32, device=self.base.weight.device)
        for n in names:
            a = self.adapters[n]
            factor = a.scale * (a.weight if with_weight else 1.0)
            total += functional.delta(a.up.detach(), a.down.detach(), factor)
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for adapter in self.adapters.values():
            if not adapter.enabled or adapter.weight == 0:
                continue
            # fp32 adapters on a fp16/bf16 input: lift the input; under autocast the ops run in the autocast dtype.
            h = self._apply_adapter(adapter.dropout(x).to(adapter.down.dtype), adapter)
            y = y + (h * (adapter.weight * adapter.scale)).to(y.dtype)
        return y


class LoraInjectedLinear(LoraWrapper):
    """nn.Linear + named low-rank adapters: y = base(x) + sum weight * scale * up(down(dropout(x)))."""

    def __init__(self, base: nn.Linear):
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoraInjectedLinear wraps nn.Linear, got {type(base).__name__}")
        super().__init__(base)

    def _factor_shapes(self, rank):
        return (rank, self.base.in_features), (self.base.out_features, rank)

    def _apply_adapter(self, x, adapter):
        return F.linear(F.linear(x, adapter.down), adapter.up)


class LoraInjectedConv2d(LoraWrapper):
    """nn.Conv2d + named adapters: `down` is a conv with the base's kernel/stride/padding/dilation, `up` is 1x1."""

    def __init__(self, base: nn.Conv2d):
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"LoraInjectedConv2d wraps nn.Conv2d, got {type(base).__name__}")
        if base.groups != 1:
            raise ValueError(f"grouped convolutions (groups={base.groups}) are not supported by LoRA")
        super().__init__(base)

    def _factor_shapes(self, rank):
        b = self.base
        return (rank, b.in_channels, *b.kernel_size), (b.out_channels, rank, 1, 1)

    def _apply_adapter(self, x, adapter):
        # _conv_forward applies the base's padding mode, stride, padding and dilation to our weight.
        return F.conv2d(self.base._conv_forward(x, adapter.down, None), adapter.up)


WRAPPERS: dict[type[nn.Module], type[LoraWrapper]] = {nn.Linear: LoraInjectedLinear, nn.Conv2d: LoraInjectedConv2d}


def wrap(module: nn.Module) -> LoraWrapper:
    """The wrapper class for a Linear/Conv2d (by isinstance), around `module`."""
    for cls, wrapper in WRAPPERS.items():
        if isinstance(module, cls):
            return wrapper(module)
    raise TypeError(f"cannot put LoRA on {type(module).__name__}: only nn.Linear and nn.Conv2d are supported")
