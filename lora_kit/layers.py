"""Wrapper layers: `LoraInjectedLinear`, `LoraInjectedConv2d` (and `LoraInjectedNorm` for norm-layer diffs).

A wrapper keeps the original module as `.base` (untouched, so removing the wrapper restores the exact object) and
holds one or more named adapters in `.adapters`. Each adapter has `down`, `up`, a 0-d `alpha` buffer (scale =
alpha / rank), dropout on its input (active in training mode only), a user `weight`, a step-schedule `factor`
(lora_kit.schedule sets it; the forward applies weight x factor) and an `enabled` flag.
Adapter parameters are fp32 whatever the base dtype; the forward works under autocast and in plain fp16/bf16/fp32.

Paths (all compute base(x) + sum weight * factor * scale * up(down(x)), up to rounding):
- training (a gradient must reach the adapters, or dropout is active): that formula adapter by adapter, in fp32;
- inference, unfused: the downs of all active adapters concatenated along the rank and their ups (each times
  weight * factor * scale) likewise, in the compute dtype, so one down/up pair runs whatever the number of adapters,
  and up's product is accumulated into the base output by the same GEMM (addmm / baddbmm); or, where the input has
  so many positions that this costs more, the base op on a transient base + up @ down weight built for the call
  (`functional.compose`: one GEMM, freed after the call; see `LoraWrapper._inference`);
- fused (`wrapper.fused`, set by lora_kit.fuse): base.weight + the deltas, composed once, through the base's op.
The concatenated pair and the fused weight are cached and rebuilt when a weight, factor, enabled flag or tensor
changes (tensor changes are seen through torch's in-place version counters, new Parameters and moves or casts
through `.to()`: code that writes through `.data`, or assigns it, must call `invalidate()`, as must code that writes
in place into tensors created under torch.inference_mode, which keep no version counter). Caches are used only when
no gradient has to reach the adapters and no dropout is active; training always takes the per-adapter loop.
What keeps those caches honest (generation counter, version snapshots, FactorBatch for step schedules) is plans.py.

Adapters of other kinds (kinds.KindAdapter: LoHa, LoKr, DoRA, IA3, full and norm diffs) are no low-rank pair: a layer
holding an active one runs the composed route, its base op on the weight with every active adapter applied
(kinds.apply), composed per call in fp32 (LoraWrapper._composed_forward); layers holding only pairs keep the paths
above.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import functional, kinds, offload, quantize
from .plans import (  # (re-exported: lora_kit.layers.FactorBatch, .tensor_key, ._bump are what callers know)
    _GENERATION,
    _QUIET,
    _SERIALS,
    FactorBatch,  # noqa: F401 (re-exported: schedule.py and the tests know it here)
    _bump,
    _count,
    _plain,
    _set_factor_quietly,
    _shared,
    _snapshot,
    _unchanged,
    column_scales,
    tensor_key,
    writable,
)

_PLAIN = frozenset({"weight", "factor", "enabled"})  # LoraAdapter's plain Python attributes
_WATCHED = _PLAIN | {"down", "up", "alpha"}  # what LoraAdapter.state_key follows


class _Adapters(nn.ModuleDict):
    """The adapter table of a wrapper: adding or removing an adapter is a change the fast path must see (item
    assignment and update() go through add_module), and each adapter counts the tables holding it (see _shared)."""

    def _changed(self, before: list) -> None:
        _count(before, -1)
        _count(self._modules.values(), 1)
        _bump()

    def __delitem__(self, key) -> None:
        before = list(self._modules.values())
        super().__delitem__(key)
        self._changed(before)

    def clear(self) -> None:
        before = list(self._modules.values())
        super().clear()
        self._changed(before)

    def add_module(self, name, module) -> None:
        before = list(self._modules.values())
        super().add_module(name, module)
        self._changed(before)

    def __setattr__(self, name, value) -> None:  # (setattr(table, name, adapter) registers it too)
        before = list(self._modules.values())
        super().__setattr__(name, value)
        self._changed(before)

    def __delattr__(self, name) -> None:
        before = list(self._modules.values())
        super().__delattr__(name)
        self._changed(before)

    def __setstate__(self, state) -> None:  # (a copy: copy.deepcopy, torch.load of a whole module)
        super().__setstate__(state)
        _count(self._modules.values(), 1)


class LoraAdapter(kinds.Strength, nn.Module):
    """One named adapter: the trainable factors plus alpha, dropout, weight and the enabled flag."""

    plain = True  # a low-rank pair the fast paths concatenate (kinds.KindAdapter: the composed route)

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
        self.factor = 1.0  # the step schedule's multiplier at the current denoising step (1 when unscheduled)
        self.enabled = True
        self.serial = next(_SERIALS)
        self._scale: tuple[tuple, float] | None = None

    def __setattr__(self, name: str, value) -> None:
        if name in _PLAIN:  # a step schedule sets factors on every layer at every step: skip nn.Module's checks
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)
        if name in _WATCHED:  # a new strength, flag or tensor: a new epoch (a new tensor: a new tensor epoch too)
            self.__dict__["_epoch"] = next(_SERIALS)
            if name in ("down", "up", "alpha"):
                self.__dict__["_tensor_epoch"] = next(_SERIALS)
            _bump()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        _bump()  # new storage for down/up/alpha (moved or cast): the layers' kept plans do not read pointers
        return out

    def register_parameter(self, name, param) -> None:  # (a tensor set without __setattr__: the same change)
        super().register_parameter(name, param)
        self._new_tensor()

    def register_buffer(self, name, tensor, persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        self._new_tensor()

    def _new_tensor(self) -> None:
        d = self.__dict__
        d["_epoch"], d["_tensor_epoch"] = next(_SERIALS), next(_SERIALS)
        _bump()

    @property
    def rank(self) -> int:
        return self._parameters["down"].shape[0]

    @property
    def scale(self) -> float:
        # alpha.item() would synchronise a GPU on every forward: keep the float until alpha itself changes
        key = self.tensors_key()
        if self._scale is None or self._scale[0] != key:
            self._scale = (key, functional.lora_scale(self.alpha.item(), self.rank))
        return self._scale[1]

    def tensors_key(self) -> tuple:
        """Changes whenever down, up or alpha does: set anew (the tensor epoch), moved (storage pointer) or written
        in place (version counter). Runs on every forward that rebuilds a layer's plan, so it reads the tensors from
        nn.Module's own tables rather than through its attribute lookup."""
        d, u, a = self._parameters["down"], self._parameters["up"], self._buffers["alpha"]
        try:
            return self._tensor_epoch, d.data_ptr(), d._version, u.data_ptr(), u._version, a.data_ptr(), a._version
        except RuntimeError:  # a tensor created under inference_mode keeps no version counter
            return self._tensor_epoch, tensor_key(d), tensor_key(u), tensor_key(a)

    def state_key(self) -> tuple:
        """Changes whenever this adapter's contribution can: an attribute set (weight, factor, enabled: the epoch)
        or any change of its tensors."""
        return self._epoch, self.tensors_key()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha.item():g}, weight={self.weight:g}, enabled={self.enabled}"


class LoraWrapper(nn.Module):
    """What both wrappers share: the adapter table, deltas, and the sum over active adapters."""

    base: nn.Module

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters = _Adapters()
        self.fused = False  # lora_kit.fuse: run the base op on a cached base + deltas weight
        self._caches: dict[str, tuple[tuple, object]] = {}  # kind -> (key, tensors): see _cached
        # The last inference forward as a ready function, kept while nothing it used changed: the generation (any
        # adapter's strength, flag or tensor set, adapters added or removed, fuse/unfuse, a move between devices or
        # dtypes, a new base module), the input dtype, autocast and its dtype, the storage and version of every
        # tensor it read, and, where it calls the base's op itself, the base's own weight and bias and its hooks
        # (see _unchanged).
        # Checking that costs a fraction of rebuilding the keys, which matters where a GPU waits on the CPU for
        # every layer.
        self._plan: tuple | None = None

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in ("fused", "base", "adapters"):
            _bump()

    def add_module(self, name, module) -> None:  # (register_module too: a new base or table without __setattr__)
        super().add_module(name, module)
        _bump()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        _bump()  # new storage, perhaps a new dtype: nothing cached stays valid
        return out

    def __getstate__(self):
        """A copy (copy.deepcopy, pickle, torch.save of the module) starts without the plan and caches: the plan's
        function holds the original's tensors, which the copy's checks cannot see."""
        state = dict(super().__getstate__())
        state["_plan"], state["_caches"] = None, {}
        return state

    # The subclass says how its adapter factors are shaped and applied, and how the base op runs on another weight.
    def _factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def _down(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _up(self, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _add_up(self, y: torch.Tensor, h: torch.Tensor, up: torch.Tensor, inplace: bool) -> torch.Tensor:
        """y + up(h) as one fused multiply-add where the layout allows (`inplace`: into y's own memory)."""
        return y.add_(self._up(h, up)) if inplace else y + self._up(h, up)

    def _base_with(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def max_rank(self) -> int:
        shape = quantize.shape(self.base)
        return min(shape[0], math.prod(shape[1:]))

    def add_adapter(
        self, name: str, rank: int, alpha: float | None = None, dropout: float = 0.0, init: str = "kaiming"
    ) -> LoraAdapter:
        self._check_name(name)
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} is not in 1..{self.max_rank} (min of in and out features) for this module")
        down_shape, up_shape = self._factor_shapes(rank)
        adapter = LoraAdapter(  # (beside the base weight; under sequential offload on its execution device)
            down_shape, up_shape, rank if alpha is None else alpha, dropout, init, device=offload.home(self.base)
        )
        self.adapters[name] = adapter
        return adapter

    def _check_name(self, name: str) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this module")
        if not name or "." in name or hasattr(self.adapters, name):  # ModuleDict keys cannot shadow its methods
            raise ValueError(f"adapter name {name!r} is not usable: no dots, and not a torch method name")

    def add_kind(self, name: str, parts: dict[str, torch.Tensor]) -> kinds.KindAdapter:
        """Add an adapter of another kind than the plain pair (LoHa, LoKr, IA3, full diff, DoRA, Tucker LoCon)
        from its tensors under their file names (kinds.py); the caller has checked they fit this layer."""
        self._check_name(name)
        if ("diff_b" in parts or "b_norm" in parts) and self.base.bias is None:
            raise ValueError("a bias diff given for a layer without a bias")
        adapter = kinds.KindAdapter(parts, device=offload.home(self.base))
        self.adapters[name] = adapter
        return adapter

    def delta_weight(self, name: str | None = None, *, with_weight: bool = True) -> torch.Tensor:
        """fp32 delta of one adapter (or, with name=None, the sum of the enabled ones), shaped like base.weight;
        with_weight applies what the forward applies: weight x factor. With a DoRA adapter among them, the delta
        of the whole rescaled weight (the order of kinds.apply)."""
        names = [name] if name is not None else [n for n, a in self.adapters.items() if a.enabled]
        chosen = [self.adapters[n] for n in names]
        if not all(a.plain for a in chosen):
            with torch.no_grad():
                given = [(_parts(a), a.effective_weight if with_weight else 1.0) for a in chosen]
                w = quantize.dense(self.base)
                return kinds.apply(w, given) - w.float()
        total = torch.zeros(quantize.shape(self.base), dtype=torch.float32, device=self.base.weight.device)
        for n in names:
            a = self.adapters[n]
            factor = a.scale * (a.effective_weight if with_weight else 1.0)
            total += functional.delta(a.up.detach(), a.down.detach(), factor)
        return total

    def bias_delta(self, name: str | None = None, *, with_weight: bool = True) -> torch.Tensor | None:
        """fp32 bias delta of one adapter (or the enabled ones): full diffs' `diff_b` (None when none has one)."""
        names = [name] if name is not None else [n for n, a in self.adapters.items() if a.enabled]
        chosen = [self.adapters[n] for n in names if not self.adapters[n].plain]
        with torch.no_grad():
            return kinds.bias_delta([(a.parts(), a.effective_weight if with_weight else 1.0) for a in chosen])

    def invalidate(self) -> None:
        """Drop the cached pair / fused weight (needed only after writing or assigning adapter tensors' `.data`)."""
        self._caches.clear()
        self._plan = None
        for adapter in self.adapters.values():
            adapter._scale = None  # (alpha written through .data, or in place under inference_mode)

    def _cacheable(self, active: list[LoraAdapter]) -> bool:
        """Cached tensors are constants: fine unless a gradient must reach the adapters or dropout draws masks."""
        if not (self.training or torch.is_grad_enabled()):
            return True
        if self.training and any(not isinstance(a.dropout, nn.Identity) for a in active):
            return False
        return not (torch.is_grad_enabled() and any(a.down.requires_grad or a.up.requires_grad for a in active))

    def _cached(self, kind: str, key: tuple, build):
        """build(), kept under `kind` until `key` changes."""
        hit = self._caches.get(kind)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = self._caches[kind] = (key, build())
        return hit[1]

    def _fused_weight(self, active: list[LoraAdapter]) -> torch.Tensor:
        w = self.base.weight
        if "parametrizations" in self.base._modules:  # (torch.nn.utils.parametrize: a new tensor at every read)
            with torch.no_grad():
                return self._composed(active, w)
        key = (*(a.state_key() for a in active), tensor_key(w), w.dtype)
        return self._cached("fused", key, lambda: self._composed(active, w))

    def _composed(self, active: list[LoraAdapter], w: torch.Tensor) -> torch.Tensor:
        """base + sum of the deltas (weight x factor x scale each) in fp32, as one GEMM over the stacked factors,
        in the base weight's dtype: what fused mode runs, and what delta_weight() added to the base gives. Never
        under autocast (it would round the sum to the autocast dtype, and the result is kept)."""
        exact = torch.promote_types(w.dtype, torch.float32)  # (fp32, or fp64 for a float64 model)
        up = torch.cat([a.up.detach() for a in active], dim=1).to(exact)
        down = torch.cat([a.down.detach() for a in active]).to(exact)
        with torch.autocast(w.device.type, enabled=False):
            return functional.compose(w.to(exact), self._weigh(active, up, torch.empty_like(up)), down).to(w.dtype)

    def set_factors(self, factors: dict[str, float]) -> None:
        """Set the step factor of the named adapters (names this wrapper lacks are skipped). Where the kept
        inference plan survives it (unfused, nothing else changed since it was kept, no factor going to or from 0,
        so the same adapters stay active), the weighted up the plan reads is rewritten in place and the plan kept:
        a step schedule then costs one small multiply per layer and step, not a rebuild of every layer's forward.
        Otherwise the factors are set plainly (and the next forward rebuilds)."""
        ads = self.adapters._modules
        changed = [(ads[n], f) for n, f in factors.items() if n in ads and ads[n].factor != f]
        if not changed:
            return
        plan, pair, stack = self._plan, self._caches.get("pair"), self._caches.get("stack")
        quiet = (
            plan is not None
            and plan[0] == _GENERATION[0]  # no strength, flag, adapter or mode changed since the plan was kept
            and pair is not None
            and stack is not None
            and not self.fused
            and all(a.factor != 0 and f != 0 and _shared(a) <= 1 for a, f in changed)
            and writable(pair[1][1])
        )  # (an adapter tensor written in place since: the next forward sees it in the plan's snapshot and rebuilds)
        if not quiet:
            for adapter, f in changed:
                adapter.factor = f
            return
        for adapter, f in changed:
            _set_factor_quietly(adapter, f)
        _QUIET[0] += 1
        active = [a for a in ads.values() if a.active]
        self._weigh(active, stack[1][1], pair[1][1], checked=False)

    @staticmethod
    def _weigh(active: list[LoraAdapter], up: torch.Tensor, out: torch.Tensor, checked: bool = True) -> torch.Tensor:
        """`out` = the fp32 stacked ups x each column's weight x factor x scale, in out's dtype: one kernel.
        `checked=False` takes each adapter's scale as last computed (set_factors: were alpha written in place since,
        the next forward sees it in the plan's snapshot and rebuilds the pair anyway)."""
        factors = tuple(
            (a.weight * a.factor * (a.scale if checked or a._scale is None else a._scale[1]), a.rank) for a in active
        )
        scales = column_scales(factors, up.device, up.dtype)
        return torch.mul(up, scales.view(-1, *[1] * (up.dim() - 2)), out=out)

    def _concatenated(self, active: list[LoraAdapter], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(downs stacked along the rank, ups side by side with each adapter's weight x factor x scale on its
        columns), in the compute dtype. The raw stack is kept apart from the weighting, so a step schedule that
        changes the factors at every step costs one small multiply per layer, not a rebuild."""
        key = (dtype, *[a.state_key() for a in active])  # one comparison per forward when nothing changed
        hit = self._caches.get("pair")
        if hit is not None and hit[0] == key:
            return hit[1]
        stack_key = (dtype, *[(a.serial, a.tensors_key()) for a in active])

        def stack():
            offload.reclaim(active)  # (factors offloaded by accelerate after the load: taken back, once)
            up = torch.cat([a.up for a in active], dim=1).to(torch.promote_types(dtype, torch.float32))
            return torch.cat([a.down for a in active]).to(dtype), up

        down, up = self._cached("stack", stack_key, stack)
        weighted = self._weigh(active, up, torch.empty_like(up, dtype=dtype))  # (the cached stack needs no grad)
        self._caches["pair"] = (key, (down, weighted))  # (out, R) or (out, R, 1, 1)
        return down, weighted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._traced(x)
        plan = self._plan
        if (
            plan is not None
            and plan[0] == _GENERATION[0]
            and not (torch.is_grad_enabled() or self.training)
            and x.dtype == plan[1]
            and (torch.get_autocast_dtype(plan[2]) if torch.is_autocast_enabled(plan[2]) else None) == plan[3]
            and _snapshot(*plan[4]) == plan[5]
            and (plan[7] is None or _unchanged(*plan[7]))
        ):
            return plan[6](self, x)
        self._plan = None
        active = [a for a in self.adapters.values() if a.active]
        if not active:
            return self.base(x)
        if not all(a.plain for a in active):
            return self._composed_forward(x, active)
        if self._cacheable(active):
            kind = x.device.type
            fused = self.fused and self._own_op(self.base)  # (else the unfused forward, through the base module)
            autocast = torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
            dtype = torch.get_autocast_dtype(kind) if autocast else x.dtype  # the compute dtype
            casting = dtype if autocast else None
            if fused:
                weight, base = self._fused_weight(active), self.base
                bias = base.bias
                run = lambda m, x: m._base_with(x, weight, bias)  # noqa: E731
                self._keep_plan(x, kind, casting, active, run, (base, base.weight, bias, True), base.weight)
                return run(self, x)
            # inference: whatever the number of adapters, one cached down/up pair in the compute dtype (no fp32
            # copies of the activations), the strengths folded into up, and up's product added to the base output
            # in the same kernel
            down, up = self._concatenated(active, dtype)
            if not torch.is_grad_enabled() and (x.dtype == dtype or autocast and x.dtype == torch.float32):
                # (under autocast the ops take an fp32 input to the compute dtype themselves)
                run, direct = self._inference(x, down, up)
                base = self.base
                held = (base, base.weight, base.bias, True) if direct else None
                self._keep_plan(x, kind, casting, active, run, held)
                return run(self, x)
            y = self.base(x)
            h = self._down(x if x.dtype == dtype else x.to(dtype), down)
            if y.dtype != dtype:  # autocast produced another dtype than asked: no fused add across dtypes
                return y + self._up(h, up).to(y.dtype)
            return self._add_up(y, h, up, inplace=not torch.is_grad_enabled() and self._own_op(self.base))
        return self._loop(x, active, [a.effective_weight * a.scale for a in active])

    def _composed_forward(self, x: torch.Tensor, active: list) -> torch.Tensor:
        """The route of a layer holding an adapter that is no plain pair: the base op on base + every active
        adapter applied (kinds.apply: additive deltas, then DoRA's rescale; full diffs' bias deltas on the bias),
        composed in fp32 at each call (with autograd when training), held only for the call, so no weight-sized
        memory is kept; fused (lora_kit.fuse) keeps it until something changes. A base module whose op cannot be
        called directly (hooks, offload, quantisation) runs as it is and the op adds the composed delta (a quantized
        weight read dequantized for the call)."""
        base = self.base
        w, b = quantize.dense(base), base.bias
        adapters = [(_parts(a), a.effective_weight) for a in active]

        def compose():
            weight, db = kinds.apply(w, adapters), kinds.bias_delta(adapters)
            return weight, db

        if self.fused and not torch.is_grad_enabled():
            key = (*(a.state_key() for a in active), tensor_key(w), None if b is None else tensor_key(b), w.dtype)
            weight, db = self._cached("composed", key, lambda: _cast(*compose(), w, b))
        else:
            weight, db = compose()
        if self._own_op(base) and not w.is_meta:
            bias = b if db is None else b.float() + db
            return self._base_with(x, weight.to(w.dtype), None if bias is None else bias.to(b.dtype))
        y = base(x)
        delta = (weight.float() - w.float()).to(y.dtype)
        return y + self._base_with(x.to(y.dtype), delta, None if db is None else db.to(y.dtype))

    def _loop(self, x: torch.Tensor, active: list[LoraAdapter], strengths: list) -> torch.Tensor:
        """Training: the formula adapter by adapter in fp32 (under autocast the ops run in the autocast dtype),
        dropout on each adapter's input; strengths = weight x factor x scale (floats, or tensors when traced)."""
        y = self.base(x)
        for a, s in zip(active, strengths, strict=True):
            h = self._down(a.dropout(x).to(a.down.dtype), a.down) * s
            y = y + self._up(h, a.up).to(y.dtype)
        return y

    def _traced(self, x: torch.Tensor) -> torch.Tensor:
        """The forward torch.compile traces, in one graph with the model around it: the same routes as the eager
        forward with nothing cached and no version counters read (the compiled graph takes the adapter tensors as
        inputs, so it sees them change; strengths and flags are guarded constants: changing one recompiles).
        Fused mode composes its weight inside the graph."""
        active = [a for a in self.adapters.values() if a.active]
        if not active:
            return self.base(x)
        if not all(a.plain for a in active):
            return self._composed_forward(x, active)
        strengths = [a.alpha * (a.effective_weight / a.rank) for a in active]  # scale as a tensor: no .item()
        if not self._cacheable(active):
            return self._loop(x, active, strengths)
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        down = torch.cat([a.down for a in active]).to(dtype)
        up = torch.cat([a.up * s for a, s in zip(active, strengths, strict=True)], dim=1).to(dtype)
        if self.fused and self._own_op(self.base) or self.composes(x):
            w = self.base.weight
            return self._base_with(x, functional.compose(w, up.to(w.dtype), down.to(w.dtype)), self.base.bias)
        y = self.base(x)
        return y + self._up(self._down(x.to(dtype), down), up).to(y.dtype)

    def _inference(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor):
        """The unfused inference forward as a function of (module, input), kept as the plan (it takes the module as
        an argument: no reference cycle through it), and whether it calls the base op directly. Per call it takes
        the cheaper of two exact routes to the same sum: the pair on the activations (base op, down, up added into
        the base output: 2 x positions x rank x (fan-in + out) FLOPs over the base) or, where the input has more
        positions than that, a transient base + up @ down weight through the base op (2 x out x fan-in x rank
        FLOPs, independent of the input, freed after the call: no weight-sized memory is kept).
        Where the base is a plain module (see _composable) its op runs on its weight and bias directly: a module
        call costs microseconds of Python per layer, which a GPU waiting on the CPU would otherwise spend idle."""
        if not self._composable(x):

            def hooked(m: LoraWrapper, x: torch.Tensor) -> torch.Tensor:
                y, h = m.base(x), m._down(x, down)
                if y.dtype != h.dtype:  # a base module that returns another dtype (under autocast, or its own)
                    return y + m._up(h, up).to(y.dtype)
                return m._add_up(y, h, up, False)  # (not into y: a hook may keep or return a tensor it holds)

            return hooked, False
        return self._direct(self.base.weight, self.base.bias, down, up, self._compose_above()), True

    def _direct(self, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor, up: torch.Tensor, above):
        """The plan's function for a plain base: its op on `weight`/`bias` (read at each call: the same objects
        while the plan holds) and the pair, or the composed weight for inputs above `above` elements. Written out
        per wrapper class with every shape fixed in advance: it runs once per wrapped layer and call."""
        raise NotImplementedError

    def _composable(self, x: torch.Tensor) -> bool:
        """Whether the base op may run on a transient weight instead of the base module: the weight in x's dtype
        and device and contiguous (not under autocast, not offloaded), and no hooks or patched forward on the base
        that calling the op directly would skip."""
        base, w = self.base, self.base.weight
        return self._own_op(base) and w.dtype == x.dtype and w.device == x.device and w.is_contiguous()

    def _own_op(self, base: nn.Module) -> bool:
        """Whether calling the base's op (F.linear, _conv_forward) on its weight is calling the base: no hooks or
        patched forward (see _plain), and a class whose forward is that op (not a subclass with its own forward:
        quantised or LoRA-compatible linears), nor a quantized weight in a plain class (torchao's)."""
        return type(base).forward is self._BASE.forward and _plain(base) and not quantize.is_quantized(base.weight)

    def _compose_above(self) -> int:
        """The input size (numel) above which composing the weight computes fewer FLOPs than the pair on the
        activations: out x fan-in < positions x (fan-in + out), positions = numel / in-channels."""
        w = self.base.weight
        out, fan_in = w.shape[0], math.prod(w.shape[1:])
        return w.shape[1] * out * fan_in // (fan_in + out)

    def composes(self, x: torch.Tensor) -> bool:
        """Whether an unfused inference forward on `x` runs through a transient composed weight (see _inference)."""
        return self._composable(x) and x.numel() > self._compose_above()

    def _keep_plan(self, x, kind: str, casting, active: list, run, direct: tuple | None, *watched) -> None:
        """Keep `run` as the fast path of later inference forwards (see _plan): for inputs of x's dtype on a `kind`
        device, under autocast to `casting` (None: autocast off). `direct`: (base module, its weight, its bias,
        whether it must stay plain) where `run` calls the base's op on those tensors itself: valid while the module
        holds the same ones (see _unchanged); it reads them at each call, so a write into them needs no rebuild.
        `watched`: base tensors that `run` holds something computed from (fused: the base weight)."""
        if torch.is_grad_enabled() or self.training:
            return
        every = (*watched, *(t for a in active for t in (a.down, a.up, a.alpha)))
        tensors = (tuple(t for t in every if not t.is_inference()), watched)  # (see tensor_key)
        snapshot = _snapshot(*tensors)
        self._plan = (_GENERATION[0], x.dtype, kind, casting, tensors, snapshot, run, direct)


class LoraInjectedLinear(LoraWrapper):
    """nn.Linear + named low-rank adapters: y = base(x) + sum weight * scale * up(down(dropout(x)))."""

    _BASE = nn.Linear  # (the class whose forward is the op _direct runs)

    def __init__(self, base: nn.Linear):
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoraInjectedLinear wraps nn.Linear, got {type(base).__name__}")
        super().__init__(base)

    def _factor_shapes(self, rank):
        return (rank, self.base.in_features), (self.base.out_features, rank)

    def _down(self, x, down):
        return F.linear(x, down)

    def _up(self, h, up):
        return F.linear(h, up)

    def _add_up(self, y, h, up, inplace):
        if inplace and y.is_contiguous():  # into y's own memory through a 2-D view of it
            y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up.t())
            return y
        y2, h2 = y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1])
        return (y2.addmm_(h2, up.t()) if inplace else torch.addmm(y2, h2, up.t())).view(y.shape)

    def _base_with(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _direct(self, weight, bias, down, up, above):
        up_t, out, rank = up.t(), up.shape[0], up.shape[1]  # (a view: sees set_factors' in-place rewrites of up)

        def run(m: LoraWrapper, x: torch.Tensor) -> torch.Tensor:
            if x.numel() > above:
                return F.linear(x, functional.compose(weight, up, down), bias)
            y = F.linear(x, weight, bias)
            if not y.is_contiguous():
                return m._add_up(y, F.linear(x, down), up, True)
            y.view(-1, out).addmm_(F.linear(x, down).reshape(-1, rank), up_t)
            return y

        return run


class LoraInjectedConv2d(LoraWrapper):
    """nn.Conv2d + named adapters: `down` is a conv with the base's kernel/stride/padding/dilation, `up` is 1x1."""

    _BASE = nn.Conv2d

    def __init__(self, base: nn.Conv2d):
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"LoraInjectedConv2d wraps nn.Conv2d, got {type(base).__name__}")
        if base.groups != 1:
            raise ValueError(f"grouped convolutions (groups={base.groups}) are not supported by LoRA")
        super().__init__(base)

    def _factor_shapes(self, rank):
        b = self.base
        return (rank, b.in_channels, *b.kernel_size), (b.out_channels, rank, 1, 1)

    def _down(self, x, down):
        # _conv_forward applies the base's padding mode, stride, padding and dilation to our weight.
        return self.base._conv_forward(x, down, None)

    def _up(self, h, up):
        return F.conv2d(h, up)

    def _add_up(self, y, h, up, inplace):
        if y.dim() != 4 or not (y.is_contiguous() and h.is_contiguous()):  # unbatched, channels_last: plain 1x1 conv
            return super()._add_up(y, h, up, inplace)
        n, c = y.shape[:2]
        y3, up3, h3 = y.view(n, c, -1), up.view(1, c, -1).expand(n, -1, -1), h.view(n, h.shape[1], -1)
        return (y3.baddbmm_(up3, h3) if inplace else torch.baddbmm(y3, up3, h3)).view(y.shape)

    def _base_with(self, x, weight, bias):
        return self.base._conv_forward(x, weight, bias)

    def _direct(self, weight, bias, down, up, above):
        conv, out = self.base._conv_forward, up.shape[0]
        up3 = up.view(1, out, -1)  # (a view: sees set_factors' in-place rewrites of up)

        def run(m: LoraWrapper, x: torch.Tensor) -> torch.Tensor:
            if x.numel() > above:
                return conv(x, functional.compose(weight, up, down), bias)
            y, h = conv(x, weight, bias), conv(x, down, None)
            if y.dim() != 4 or not (y.is_contiguous() and h.is_contiguous()):
                return m._add_up(y, h, up, True)
            n = y.shape[0]
            y.view(n, out, -1).baddbmm_(up3.expand(n, -1, -1), h.view(n, h.shape[1], -1))
            return y

        return run


def _parts(adapter) -> dict[str, torch.Tensor]:
    """An adapter's tensors under their file names, for kinds.apply."""
    if adapter.plain:
        return {"down": adapter.down, "up": adapter.up, "alpha": adapter.alpha}
    return adapter.parts()


def _cast(weight: torch.Tensor, db: torch.Tensor | None, w: torch.Tensor, b: torch.Tensor | None):
    """A composed (fp32 weight, bias delta) kept for fused mode: the weight in the base's dtype, the delta as is."""
    return weight.to(w.dtype), db


class LoraInjectedNorm(LoraWrapper):
    """An affine nn.LayerNorm / nn.GroupNorm + norm-layer diffs (LyCORIS's `w_norm`/`b_norm`, added to its weight and
    bias at the adapter's weight): they take the composed route, the norm's op on the changed weight and bias."""

    _NORMS = (nn.LayerNorm, nn.GroupNorm)

    def __init__(self, base: nn.Module):
        if not is_norm(base):
            raise TypeError(f"LoraInjectedNorm wraps an affine LayerNorm or GroupNorm, got {type(base).__name__}")
        super().__init__(base)

    def add_adapter(self, name: str, *args, **kwargs):
        raise ValueError(f"a {type(self.base).__name__} takes norm-layer diffs (w_norm, b_norm), not a LoRA pair")

    def _own_op(self, base: nn.Module) -> bool:
        return any(type(base).forward is cls.forward for cls in self._NORMS) and _plain(base)

    def _base_with(self, x, weight, bias):
        b = self.base
        if isinstance(b, nn.GroupNorm):
            return F.group_norm(x, b.num_groups, weight, bias, b.eps)
        return F.layer_norm(x, b.normalized_shape, weight, bias, b.eps)


def is_norm(module: nn.Module) -> bool:
    """An affine LayerNorm or GroupNorm: a layer LyCORIS's norm-layer diffs can adapt."""
    return isinstance(module, nn.LayerNorm | nn.GroupNorm) and module.weight is not None


WRAPPERS: dict[type[nn.Module], type[LoraWrapper]] = {
    nn.Linear: LoraInjectedLinear, nn.Conv2d: LoraInjectedConv2d, nn.LayerNorm: LoraInjectedNorm,
    nn.GroupNorm: LoraInjectedNorm,
}  # fmt: skip


def wrap(module: nn.Module) -> LoraWrapper:
    """The wrapper class for a Linear/Conv2d (by isinstance), around `module`."""
    for cls, wrapper in WRAPPERS.items():
        if isinstance(module, cls):
            return wrapper(module)
    raise TypeError(f"cannot put LoRA on {type(module).__name__}: only nn.Linear and nn.Conv2d are supported")
