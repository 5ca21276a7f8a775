"""What the wrappers' inference fast path keeps, and how it knows a kept thing is still valid.

A wrapper keeps its last inference forward as a ready function (its plan) and the concatenated pair it runs on; both
stay valid while nothing they depend on changed. Changes are seen three ways: a global generation counter that every
change tensors cannot show bumps (`_bump`: an adapter's strength or flag set, adapters added or removed, fuse, a move
or cast), the in-place version counters of the tensors a plan read (`_snapshot`), and checks that a base module is
still plain (`_plain`, `_unchanged`). A step schedule changes every adapter's factor at every step: `FactorBatch`
rewrites all the layers' weighted ups in a few ops, and `column_scales` shares each step's scale vector.
layers.py holds the wrappers and the adapter kinds they run; this file, the machinery that makes them fast.
"""

from __future__ import annotations

import collections
import itertools
import weakref
from operator import attrgetter
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules import module as _module

if TYPE_CHECKING:
    from .layers import LoraAdapter, LoraWrapper

_SERIALS = itertools.count()  # adapter identities and epochs that, unlike id(), are never reused within a process


def tensor_key(t: torch.Tensor) -> tuple:
    """(storage pointer, in-place version counter): changes when `t` is written in place or given new storage. A
    tensor created under torch.inference_mode keeps no version counter: its writes in place go unseen."""
    return t.data_ptr(), None if t.is_inference() else t._version


_GENERATION = [0]  # bumped by every change a wrapper's fast path cannot see in tensor versions (see LoraWrapper._plan)
_QUIET = [0]  # bumped by every factor set that keeps the plans (LoraWrapper.set_factors): a FactorBatch rebuilds


def _bump() -> None:
    _GENERATION[0] += 1


_VERSION = attrgetter("_version")


def _snapshot(tensors: tuple[torch.Tensor, ...], moved: tuple[torch.Tensor, ...]) -> list:
    """The in-place version counter of each of `tensors`, then the storage pointer of each of `moved`: what a kept
    plan checks at every call. Versions see every in-place write; new storage is seen by `_apply` (`.to()`, `.half()`
    of the pipeline, a wrapper or an adapter: a generation bump), by `__setattr__` (a new Parameter) or, for the
    tensors whose storage a plan depends on, by their pointers (reading one costs twice a version's)."""
    versions = list(map(_VERSION, tensors))
    if moved:
        versions += [t.data_ptr() for t in moved]
    return versions


def _unchanged(base: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, plain: bool) -> bool:
    """Whether `base` still holds these weight and bias tensors (and, if `plain`, is still plain): a plan that
    calls the base's op on them itself must see a parameter replaced or a hook added."""
    held = base._parameters
    return held.get("weight") is weight and held.get("bias") is bias and (not plain or _plain(base))


def _plain(module: nn.Module) -> bool:
    """Whether calling the module's op directly is calling the module: no forward hooks (its own or global) and
    no patched forward (accelerate's offloading, quantisation wrappers)."""
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or "forward" in module.__dict__
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
    )


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # adapter -> how many adapter tables hold it


def _count(modules, n: int) -> None:
    for m in modules:
        _TABLES[m] = _TABLES.get(m, 0) + n


def _shared(adapter: LoraAdapter) -> int:
    """How many adapter tables hold `adapter` (one, unless an adapter object was added to several layers: a factor
    set through one layer without a generation bump would then leave the others' plans stale)."""
    return _TABLES.get(adapter, 0)


_SCALES: dict[tuple, torch.Tensor] = {}


def column_scales(
    factors: tuple[tuple[float, int], ...], device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The vector (fp32, or fp64 for fp64 factors) of each rank column's factor, for ((factor, rank), ...) of the
    active adapters in order. Shared by every layer with the same adapters: a step schedule moves the factors at each
    step, and one copy to the device per step is cheap where one per layer would not be."""
    key = (factors, device, dtype)
    scales = _SCALES.get(key)
    if scales is None:
        if len(_SCALES) >= 64:
            _SCALES.clear()
        _SCALES[key] = scales = device_vector([f for f, rank in factors for _ in range(rank)], device, dtype)
    return scales


def device_vector(values: list[float], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A vector on `device`; on a GPU copied from pinned memory without waiting (the GPU keeps running the work
    already queued)."""
    vector = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return vector.pin_memory().to(device, non_blocking=True)
    return vector.to(device)


def writable(t: torch.Tensor) -> bool:
    """Whether `t` may be written in place here: not a tensor made under torch.inference_mode while outside it (a
    pipeline called under inference_mode leaves its caches so; a later call without it rebuilds them instead)."""
    return not t.is_inference() or torch.is_inference_mode_enabled()


def _set_factor_quietly(adapter: LoraAdapter, factor: float) -> None:
    """As `adapter.factor = factor`, less the generation bump: for callers that keep the layers' plans valid
    themselves. The new epoch leaves the cached pair's key stale, so a later rebuild starts afresh."""
    d = adapter.__dict__
    d["factor"], d["_epoch"] = factor, next(_SERIALS)


class FactorBatch:
    """Step factors for many wrappers in a few ops: what a step schedule does at every step once each layer keeps
    its inference plan. The layers whose pairs have the same columns (the same active adapters and ranks, in the same
    order: usually all of them) share one buffer, rows = every layer's up rows: per step it is the fp32 stack x
    (weight x scale, fixed at build) x a row vector of each column's adapter factor (one broadcast multiply, no
    per-element index), then copied into the layers' own tensors by one multi-tensor copy for all groups: no Python
    per layer besides setting each adapter's factor.

    Built only when every wrapper is unfused with a kept plan, all in one dtype and device; valid while nothing else
    changes (no generation bump, every plan the one seen at build). `apply` returns False when it cannot serve a step
    (then the caller sets the factors layer by layer, and builds anew later)."""

    def __init__(self, wrappers: list[LoraWrapper], names: list[str]):
        self.names, self.generation, self.quiet = list(names), _GENERATION[0], _QUIET[0]
        self.plans, self.outs, self.views, self.adapters = [], [], [], []
        slot = {name: i for i, name in enumerate(self.names)}  # the factor vector: scheduled names, then a 1
        for w in wrappers:  # checks first (cheap: the schedule hook tries a build after every call until one holds)
            scheduled = [(n, a) for n, a in w.adapters._modules.items() if n in slot]
            if any(a.enabled and a.weight != 0 and a.factor == 0 for _, a in scheduled):
                raise ValueError("an adapter switched off by its factor")  # it would need to join the active set
            plan, pair, stack = w._plan, w._caches.get("pair"), w._caches.get("stack")
            if any(a.enabled and a.weight != 0 for a in w.adapters.values()) and (
                plan is None or plan[0] != _GENERATION[0] or w.fused or pair is None or stack is None
            ):
                raise ValueError("an adapted layer without a kept unfused plan")
            self.adapters += [(a, n) for n, a in scheduled]
        held = collections.Counter(a for a, _ in self.adapters)
        if any(_shared(a) > n for a, n in held.items()):  # (its factor set here would leave that layer's plan stale)
            raise ValueError("an adapter object also held by a layer outside the batch")
        groups: dict[tuple[int, ...], list] = {}  # each column's slot -> [(prescaled rows, the layer's pair up)]
        for w in wrappers:
            columns, idx = [], []
            for n, a in w.adapters._modules.items():  # the active adapters in the pair's column order
                if a.active:
                    i = slot.get(n, len(self.names))
                    columns += [a.weight * a.scale * (1.0 if i < len(self.names) else a.factor)] * a.rank
                    idx += [i] * a.rank
            if not columns:
                continue
            raw, out = w._caches["stack"][1][1], w._caches["pair"][1][1]
            rows = raw.reshape(raw.shape[0], -1) * torch.tensor(columns, dtype=raw.dtype, device=raw.device)
            groups.setdefault(tuple(idx), []).append((rows, out))
            self.plans.append((w, w._plan))
            self.outs.append(out)
        if len({(o.dtype, o.device) for o in self.outs}) != 1:
            raise ValueError("no adapted layer, or layers in several dtypes or devices")
        self.groups = []  # (prescaled (rows, R) fp32, column slots (R,), buffer (rows, R) in the layers' dtype)
        for idx, members in groups.items():
            prescaled = torch.cat([rows for rows, _ in members])
            buffer = torch.empty_like(prescaled, dtype=self.outs[0].dtype)
            self.groups.append((prescaled, torch.tensor(idx, device=prescaled.device), buffer))
            offset = 0
            for rows, out in members:
                self.views.append(buffer[offset : offset + len(rows)].view(out.shape))
                offset += len(rows)
        self.outs = [out for members in groups.values() for _, out in members]  # in the views' order
        self.inference = any(t.is_inference() for t in (*self.outs, *(group[2] for group in self.groups)))

    def apply(self, factors: dict[str, float]) -> bool:
        """Set every scheduled adapter's factor to factors[name] (all names of the batch) in one go."""
        if self.generation != _GENERATION[0] or self.quiet != _QUIET[0]:
            return False  # (a factor set layer by layer since: the batch's fixed factors may be stale)
        if any(w._plan is not plan for w, plan in self.plans):
            return False
        if any(factors[n] == 0 for n in self.names):
            return False  # an adapter switching off changes the layers' active sets: a rebuild
        if self.inference and not torch.is_inference_mode_enabled():
            return False  # tensors made under inference_mode, now outside it: the layers rebuild theirs
        vector = device_vector([factors[n] for n in self.names] + [1.0], self.outs[0].device, self.groups[0][0].dtype)
        for prescaled, idx, buffer in self.groups:
            torch.mul(prescaled, vector[idx], out=buffer)
        torch._foreach_copy_(self.outs, self.views)
        for adapter, name in self.adapters:
            _set_factor_quietly(adapter, factors[name])
        _QUIET[0] += 1  # (another batch over these layers holds other factors fixed: it rebuilds)
        self.quiet = _QUIET[0]
        return True
