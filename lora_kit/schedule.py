"""Per-adapter strength over the denoising steps (step schedules) and over the UNet's blocks (kohya "LBW" vectors).

A schedule multiplies an adapter's weight by s(progress, step, timestep) at every denoising step, in the UNet or
transformer only (text encoders run once per prompt and keep their static weight). It is applied by a forward
pre-hook on the UNet/transformer that reads the pipeline's scheduler, so nothing about the pipeline call changes:
users keep their own step callbacks, and every diffusers pipeline that calls its scheduler the usual way works
(SD1.x/SD2.x, SDXL, SD3 and FLUX were tested).

    step      index of the current timestep in scheduler.timesteps (the scheduler's own step counter when it keeps
              one: step_index, or PNDM's count of step() calls, whose list repeats timesteps; else the timestep the
              model is called with, matched to the scheduler's list)
    steps     len(scheduler.timesteps);  progress = step / (steps - 1), from 0 to 1
    timestep  scheduler.timesteps[step], in the scheduler's units (0..1000 for SD and flow-matching alike)

A spec string "0:1.0,0.4:0.6,1:0.0" is piecewise linear over progress (constant before the first and after the
last point). Classifier-free guidance doubles the batch, not the calls, and a pipeline that calls the model twice
per step (guidance variants) sees the same step twice: both read the same scheduler state.
"""

from __future__ import annotations

import bisect
import math
import re
import weakref
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ._callable import callable_module
from .errors import LoraKitError, finite
from .formats import kohya
from .inject import lora_modules
from .layers import LoraAdapter, LoraWrapper
from .plans import FactorBatch

HOOK = "_lora_kit_schedule"  # attribute of the UNet/transformer holding its Scheduled hook


class Piecewise:
    """s(progress) piecewise linear through (progress, value) points; str() gives the spec back."""

    def __init__(self, points: Sequence[tuple[float, float]]):
        self.xs = [float(p) for p, _ in points]
        self.ys = [float(v) for _, v in points]

    def __call__(self, progress: float, step: int | None = None, timestep: float | None = None) -> float:
        xs, ys = self.xs, self.ys
        if progress <= xs[0]:
            return ys[0]
        if progress >= xs[-1]:
            return ys[-1]
        i = bisect.bisect_right(xs, progress)
        t = (progress - xs[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + t * (ys[i] - ys[i - 1])

    def __str__(self) -> str:
        return ",".join(f"{x:g}:{y:g}" for x, y in zip(self.xs, self.ys, strict=True))

    def __repr__(self) -> str:
        return f"Piecewise({str(self)!r})"


def parse(spec: str) -> Piecewise:
    """'0:1.0,0.4:0.6,1:0.0' -> Piecewise. Progress values lie in [0, 1] and increase strictly."""
    points = []
    for item in spec.split(","):
        p, sep, v = item.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            points.append((float(p), float(v)))
        except ValueError:
            raise LoraKitError(
                f"schedule {spec!r}: {item.strip()!r} is not PROGRESS:VALUE (e.g. '0:1.0,0.4:0.6,1:0.0')"
            ) from None
    xs = [p for p, _ in points]
    if not all(math.isfinite(v) for _, v in points):
        raise LoraKitError(f"schedule {spec!r}: values must be finite numbers")
    if any(not 0.0 <= p <= 1.0 for p in xs) or any(b <= a for a, b in zip(xs, xs[1:], strict=False)):
        raise LoraKitError(f"schedule {spec!r}: progress values must lie in [0, 1] and increase, got {xs}")
    return Piecewise(points)


def as_schedule(s: Callable | str) -> Callable:
    if isinstance(s, str):
        return parse(s)
    if not callable(s):
        raise LoraKitError(f"a schedule is a callable s(progress, step, timestep) or a spec string, got {s!r}")
    return s


def current_step(timesteps: Sequence[float], step_index: int | None, begin_index: int | None, timestep) -> int:
    """Index in `timesteps` (the scheduler's list) of the denoising step in progress.

    Schedulers that count steps (Euler, DPM-Solver, flow matching, ...) say it through step_index, which they
    start on their first step() (or scale_model_input) call: before it the step is begin_index when a pipeline
    set one, else found from the model's timestep argument; a counter past the end is left over from a finished
    run. DDIM/DDPM keep no counter and are always matched (PNDM counts in its own way: Scheduled.step). Matching
    allows for pipelines that pass timestep / 1000 (FLUX)."""
    if step_index is not None and 0 <= step_index < len(timesteps):
        return step_index
    if step_index is None and begin_index is not None:
        return begin_index
    if timestep is None:
        return 0
    t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
    by_value = min(range(len(timesteps)), key=lambda i: abs(timesteps[i] - t))
    by_thousandth = min(range(len(timesteps)), key=lambda i: abs(timesteps[i] - 1000.0 * t))
    near = abs(timesteps[by_value] - t) <= abs(timesteps[by_thousandth] - 1000.0 * t)
    return by_value if near else by_thousandth


class Scheduled:
    """The forward pre-hook: works out the step from the pipeline's scheduler and sets each scheduled adapter's
    factor on every adapted module of the model. Holds the pipeline schedule() was last called on, weakly (no
    reference cycle through the UNet); once that pipeline is gone a call is an error, not a frozen factor."""

    def __init__(self, pipe, model: nn.Module):
        self.bind(pipe)
        self.model = model
        self.fns: dict[str, Callable] = {}
        self.adapters: dict[str, list[LoraAdapter]] = {}
        self.wrappers: list[LoraWrapper] = []  # the modules holding them, which set their factors in one call
        self.batch: FactorBatch | None = None  # all their factors in a few ops, while it stays valid
        self.last: dict[str, float] = {}  # the factor each name has now, so an unchanged step touches nothing
        self.timesteps: tuple[object, list[float]] = (None, [])  # the scheduler's tensor and its values
        self.counts = False  # the scheduler is a PNDM (see step)
        self.offset: int | None = None  # PNDM: index of its first step in this run (img2img starts later)
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)
        self.after = model.register_forward_hook(self.built)  # the batch built after a call, not within a step

    def bind(self, pipe) -> None:
        """Read this pipeline's scheduler from now on (pipelines sharing the model: from_pipe, **pipe.components)."""
        try:
            self.pipe = weakref.ref(pipe)
        except TypeError:  # an object without weak references (a SimpleNamespace standing in for a pipeline)
            self.pipe = lambda: pipe

    def refresh(self) -> None:
        """Re-collect the scheduled adapters (after loads and unloads) with factor 1 until the next step."""
        found: dict[str, list[LoraAdapter]] = {name: [] for name in self.fns}
        wrappers = []
        for _, wrapper in lora_modules(self.model):
            for name, adapter in wrapper.adapters.items():
                if name in found:
                    found[name].append(adapter)
                    adapter.factor = 1.0
            if any(name in found for name in wrapper.adapters):
                wrappers.append(wrapper)
        self.adapters, self.wrappers, self.last, self.batch = found, wrappers, {}, None

    def drop(self, name: str) -> None:
        self.batch = None
        self.fns.pop(name, None)
        self.last.pop(name, None)
        for adapter in self.adapters.pop(name, []):
            adapter.factor = 1.0

    @torch.compiler.disable  # Python bookkeeping on the scheduler: eager even where the UNet's call is compiled
    def __call__(self, module, args, kwargs):
        pipe = self.pipe()
        if pipe is None:
            raise LoraKitError(
                f"the schedules {list(self.fns)} follow the scheduler of the pipeline lora_kit.schedule was called "
                f"on, and that pipeline is gone: call lora_kit.schedule(pipe, ...) on the pipeline that runs this "
                f"{type(self.model).__name__} (or lora_kit.unschedule on it)"
            )
        scheduler = pipe.scheduler
        if scheduler.timesteps is None or len(scheduler.timesteps) == 0:
            return None  # called outside a denoising loop
        if self.timesteps[0] is not scheduler.timesteps:  # read a (GPU) tensor once per set_timesteps, not per step
            self.timesteps = (scheduler.timesteps, [float(t) for t in scheduler.timesteps.tolist()])
            self.counts, self.offset = _is_pndm(scheduler), None
        timesteps = self.timesteps[1]
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        step = self.step(pipe, timesteps, timestep)
        steps, t = len(timesteps), timesteps[step]
        progress = step / (steps - 1) if steps > 1 else 0.0
        factors = {name: finite(fn(progress, step, t), f"the schedule of {name!r} at step {step}: it gave")
                   for name, fn in self.fns.items()}  # fmt: skip
        changed = {name: s for name, s in factors.items() if self.last.get(name) != s}
        if changed:
            if self.batch is None:
                self.batch = self._batch()
            if self.batch is None or not self.batch.apply(factors):  # layer by layer (LoraWrapper.set_factors)
                self.batch = None
                for wrapper in self.wrappers:
                    wrapper.set_factors(changed)
            self.last.update(changed)
        return None

    def step(self, pipe, timesteps: list[float], timestep) -> int:
        """current_step, but for PNDM (SD1.x/SD2.x's default), whose list repeats timesteps ([751, 501, 501, 251, 1])
        and which keeps no step_index: it counts its step() calls in `counter`, one per timestep of the run, so the
        step is counter + the index of the run's first timestep (0, or where img2img starts: found by value, and
        where that value repeats, from the pipeline's count of the timesteps it runs)."""
        scheduler = pipe.scheduler
        counter = scheduler.counter if self.counts else None
        if counter is None or not 0 <= counter < len(timesteps):
            step_index, begin_index = getattr(scheduler, "step_index", None), getattr(scheduler, "begin_index", None)
            return current_step(timesteps, step_index, begin_index, timestep)
        if counter == 0 or self.offset is None:
            first = current_step(timesteps, None, None, timestep)
            same = [i for i in range(first, len(timesteps)) if timesteps[i] == timesteps[first]]
            start = len(timesteps) - getattr(pipe, "_num_timesteps", -1)  # the pipeline runs timesteps[start:]
            self.offset = max(0, (start if len(same) > 1 and start in same else first) - counter)
        return min(counter + self.offset, len(timesteps) - 1)

    def _batch(self) -> FactorBatch | None:
        """Every layer's factors in a few ops from now on, once every layer keeps its plan (see FactorBatch)."""
        try:
            return FactorBatch(self.wrappers, list(self.fns))
        except ValueError:
            return None

    @torch.compiler.disable
    def built(self, module, args, output) -> None:
        """After a call (which keeps each layer's plan): build the batch there rather than within the next step."""
        if self.batch is None and self.fns:
            self.batch = self._batch()


def _is_pndm(scheduler) -> bool:
    from diffusers import PNDMScheduler  # loaded already: a pipeline is running

    return isinstance(scheduler, PNDMScheduler)


def _hook(target) -> tuple[nn.Module | None, Scheduled | None]:
    if isinstance(target, nn.Module):
        return target, getattr(target, HOOK, None)
    for name in ("unet", "transformer"):
        model = getattr(target, name, None)
        if isinstance(model, nn.Module):
            return model, getattr(model, HOOK, None)
    return None, None


def schedule(pipe, schedules: Mapping[str, Callable | str]) -> None:
    """Give adapters a strength that changes over the denoising steps: {name: s}, s a callable
    s(progress, step, timestep) -> float or a spec string "0:1.0,0.4:0.6,1:0.0" (piecewise linear over progress).
    The effective weight in the UNet/transformer is weight x s; text encoders keep the static weight. Calling it
    again adds or replaces schedules; `unschedule` removes them.

    The schedules live on the model and read the scheduler of the pipeline this was last called on: pipelines that
    share the model (`from_pipe`, `Img2Img(**pipe.components)`) call it again on the one they run."""
    model, hook = _hook(pipe)
    if isinstance(pipe, nn.Module) or model is None or not hasattr(pipe, "scheduler"):
        raise LoraKitError("schedule needs a diffusers pipeline (a unet or transformer, and its scheduler)")
    present = {n for _, w in lora_modules(model) for n in w.adapters}
    fns = {}
    for name, s in schedules.items():
        if name not in present:
            raise LoraKitError(f"no adapter named {name!r} in the {type(model).__name__}; it has {sorted(present)}")
        fns[name] = as_schedule(s)
    if hook is None:
        hook = Scheduled(pipe, model)
        setattr(model, HOOK, hook)
    hook.bind(pipe)  # a pipeline sharing the model (from_pipe) runs with its own scheduler
    hook.fns.update(fns)
    hook.refresh()


def unschedule(pipe, name: str | None = None) -> None:
    """Remove the schedule of adapter `name` (every schedule when None): its factor is 1 again."""
    model, hook = _hook(pipe)
    if name is not None and name not in (hook.fns if hook is not None else {}):
        raise LoraKitError(f"no schedule for an adapter named {name!r}; scheduled: {scheduled_names(pipe)}")
    if hook is None:
        return
    for n in list(hook.fns) if name is None else [name]:
        hook.drop(n)
    if not hook.fns:
        hook.handle.remove()
        hook.after.remove()
        delattr(model, HOOK)


def refresh(target) -> None:
    """After adapters were loaded or unloaded: the schedules follow (a name no longer in the model loses its own)."""
    model, hook = _hook(target)
    if hook is None:
        return
    present = {n for _, w in lora_modules(model) for n in w.adapters}
    for name in [n for n in hook.fns if n not in present]:
        hook.drop(name)
    if hook.fns:
        hook.refresh()
    else:
        unschedule(target)


def scheduled_names(target) -> list[str]:
    _, hook = _hook(target)
    return list(hook.fns) if hook is not None else []


# kohya / sd-webui-lora-block-weight ("LBW") block vectors name the UNet's blocks in SGM numbering (the
# input_blocks / middle_block / output_blocks of the original checkpoints, as A1111 and kohya's svd_merge_lora map
# diffusers names): BASE (the text encoders), IN00 .. INnn, M00, OUT00 .. OUTnn. conv_in is IN00, each down layer
# (resnet + attention) and each downsampler one IN block, each up layer one OUT block with its upsampler; 26
# entries for SD1/SD2, 20 for SDXL. The short layouts name only the blocks that hold attention (all a LoRA without
# convs touches); the blocks they leave out get 1, as in the webui extension.
LBW_SHORT = {
    (17, 26): "BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08 OUT09 OUT10 OUT11".split(),
    (12, 20): "BASE IN04 IN05 IN07 IN08 M00 OUT00 OUT01 OUT02 OUT03 OUT04 OUT05".split(),
}
SGM_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks)\.(\d+)")


def block_id(path: str, table: Mapping[str, str]) -> str | None:
    """LBW block of a UNet module path (None outside the blocks: time embedding, conv_out), through the SGM name
    that lora_kit's kohya writer uses."""
    sgm = kohya.to_sgm(path, table)
    m = SGM_BLOCK.match(sgm or "")
    if m is None:
        return None
    kind, index = m.groups()
    return "M00" if kind == "middle_block" else f"{'IN' if kind == 'input_blocks' else 'OUT'}{int(index):02d}"


def block_ids(unet: nn.Module) -> list[str]:
    """The full LBW layout of this UNet, in vector order."""
    table = kohya.sgm_blocks(unet.config)
    found = {block_id(path, table) for path in table} - {None}
    ins = sorted(b for b in found if b.startswith("IN"))
    outs = sorted(b for b in found if b.startswith("OUT"))
    return ["BASE", *ins, "M00", *outs]


def block_vector(comps: Mapping[str, nn.Module], vector: Sequence[float] | str) -> dict[str, dict[str, float]]:
    """{component: {module path: weight}} for every adapted module that an LBW vector assigns: text encoders take
    BASE, UNet modules their block's entry; blocks a short vector leaves out, and modules outside every block
    (time embedding, conv_out), take 1."""
    if "unet" not in comps:
        raise LoraKitError("block-weight vectors are defined for UNets (SD1/SD2/SDXL); use {name: w} on transformers")
    if isinstance(vector, str):
        try:
            vector = [float(v) for v in vector.split(",")]
        except ValueError:
            raise LoraKitError(f"block-weight vector {vector!r}: expected comma-separated numbers") from None
    unet = comps["unet"]
    full = block_ids(unet)
    ids = full if len(vector) == len(full) else LBW_SHORT.get((len(vector), len(full)))
    if ids is None:
        short = [n for n, f in LBW_SHORT if f == len(full)]
        raise LoraKitError(
            f"a block-weight vector for this UNet has {len(full)} entries ({', '.join(full)})"
            + (f" or the short {short[0]}" if short else "") + f", got {len(vector)}"
        )  # fmt: skip
    by_id = dict.fromkeys(full, 1.0) | {i: finite(v, f"block weight {i}") for i, v in zip(ids, vector, strict=True)}
    table = kohya.sgm_blocks(unet.config)
    out: dict[str, dict[str, float]] = {}
    for component, module in comps.items():
        paths = [p for p, _ in lora_modules(module)]
        if component != "unet":
            out[component] = dict.fromkeys(paths, by_id["BASE"])
            continue
        out[component] = {}
        for path in paths:
            block = block_id(path, table)
            out[component][path] = 1.0 if block is None else by_id[block]
    return out


callable_module(__name__, "schedule")  # lora_kit.schedule(pipe, {...}): see _callable
