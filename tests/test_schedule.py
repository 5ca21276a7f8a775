"""Several adapters at inference: per-adapter / per-component / per-block weights against diffusers' set_adapters,
step schedules read back from inside the UNet with a forward hook, LBW vectors against a hand-written table, the
concatenated and fused forwards against the per-adapter formula."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_close_scaled,
    assert_outputs_close,
    forward_text,
    main_model,
    pipeline_outputs,
    randomize_adapters,
)
from torch import nn

import lora_kit
from lora_kit import functional
from lora_kit.errors import LoraKitError
from lora_kit.inject import inject_lora, lora_modules
from lora_kit.layers import FactorBatch, LoraInjectedConv2d, LoraInjectedLinear
from lora_kit.state import lora_state_dict


def test_per_adapter_component_and_block_weights_equal_diffusers(make_pipe, two_loras):
    a, b = two_loras
    theirs, ours = make_pipe("sd1"), make_pipe("sd1")
    for path in (a, b):
        theirs.load_lora_weights(str(path), adapter_name=path.stem)
        lora_kit.load(ours, path)
    cases = [
        ({"a": 0.7, "b": -0.4}, [0.7, -0.4]),
        ({"a": {"unet": 0.8, "text_encoder": 0.3}, "b": 0.5}, [{"unet": 0.8, "text_encoder": 0.3}, 0.5]),
        # diffusers scales blocks in their attention layers: b (attention blocks only) is where both agree
        ({"a": 1.2, "b": {"down": 0.2, "mid": 1.5, "up": 0.6}}, [1.2, {"unet": {"down": 0.2, "mid": 1.5, "up": 0.6}}]),
    ]
    for ours_weights, their_weights in cases:
        theirs.set_adapters(["a", "b"], their_weights)
        lora_kit.set_weights(ours, ours_weights)
        assert_outputs_close(pipeline_outputs(ours), pipeline_outputs(theirs), ours)


@pytest.mark.parametrize("spec", [{"unet": 0.8, "down": 0.2}, {"down": 0.2, "unet": 0.8}])
def test_a_block_key_wins_over_the_unet_key_whatever_the_order(make_pipe, two_loras, spec):
    """{"unet": w, "down": v}: the down blocks take v, the rest of the UNet w, in either dict order (as diffusers'
    {"unet": {"down": v, "mid": w, "up": w}})."""
    _, b = two_loras
    theirs, ours = make_pipe("sd1"), make_pipe("sd1")
    theirs.load_lora_weights(str(b), adapter_name="b")
    theirs.set_adapters(["b"], [{"unet": {"down": 0.2, "mid": 0.8, "up": 0.8}}])
    lora_kit.load(ours, b)
    lora_kit.set_weights(ours, {"b": spec})
    assert_outputs_close(pipeline_outputs(ours), pipeline_outputs(theirs), ours)


def test_text_encoder_strength_acts_only_on_the_text_encoder(make_pipe, two_loras):
    a, _ = two_loras
    base = pipeline_outputs(make_pipe("sd1"))
    pipe = make_pipe("sd1")
    lora_kit.load(pipe, a)
    full = pipeline_outputs(pipe)
    assert not torch.allclose(full["text_encoder"], base["text_encoder"], atol=1e-4)
    lora_kit.set_weights(pipe, {"a": {"text_encoder": 0.0}})
    out = pipeline_outputs(pipe)
    assert torch.equal(out["text_encoder"], base["text_encoder"]) and torch.equal(out["main"], full["main"])
    lora_kit.set_weights(pipe, {"a": {"unet": 0.0, "text_encoder": 1.0}})
    out = pipeline_outputs(pipe)
    assert torch.equal(out["main"], base["main"]) and torch.equal(out["text_encoder"], full["text_encoder"])


# --- step schedules, through real pipeline calls --------------------------------------------------------------

CALL = {"sd1": {}, "sdxl": {}, "sd3": {"height": 32, "width": 32}, "flux": {"height": 32, "width": 32}}
PRESET = {"sd1": "locon", "sdxl": "kohya", "sd3": "dit", "flux": "dit"}


def _two_adapters(pipe, arch):
    inject_lora(main_model(pipe), PRESET[arch], rank=3, alpha=1.5, conv_rank=2, name="a")
    inject_lora(main_model(pipe), "attn" if arch in ("sd1", "sdxl") else "dit", rank=2, alpha=4.0, name="b")
    randomize_adapters(pipe, seed=7)


def _denoise(pipe, arch, steps=3):
    g = torch.Generator().manual_seed(0)
    return pipe("a photo of a dog", num_inference_steps=steps, generator=g, output_type="latent", **CALL[arch]).images


def _loop(pipe, steps):
    """The reduction behind _denoise's latents: the text encoder once, then the UNet at every step."""
    return (pipe.text_encoder,) + (pipe.unet,) * steps


@pytest.mark.parametrize("how", ["torch.compile fullgraph", "Module.compile"])
def test_a_compiled_unet_follows_weights_schedules_and_fuse(make_pipe, how):
    """torch.compile traces the adapted UNet (with fullgraph: no graph break in any wrapper) and the compiled
    pipeline gives the eager latents under per-adapter weights, a step schedule and fuse; a schedule's new factor at
    every step does not recompile at every step (it would hit dynamo's recompile limit of 8 and fall back to eager).
    A counting backend runs dynamo's graphs as traced: what is tested is the trace and its guards."""
    compiles = []

    def backend(gm, inputs):
        compiles.append(gm)
        return gm.forward

    eager, compiled = make_pipe("sd1"), make_pipe("sd1")
    for pipe in (eager, compiled):
        _two_adapters(pipe, "sd1")
        lora_kit.set_weights(pipe, {"a": 0.5, "b": 2.0})
    if how == "Module.compile":
        compiled.unet.compile(backend=backend)
    else:
        compiled.unet = torch.compile(compiled.unet, backend=backend, fullgraph=True)
    for pipe in (eager, compiled):
        lora_kit.schedule(pipe, {"a": "0:1.0,0.4:0.6,1:0.0", "b": "0:0.2,1:1"})
    # a compiled UNet stands for its module: the same keys out (and so the same files in)
    assert lora_state_dict(compiled, "a").keys() == lora_state_dict(eager, "a").keys()
    for _ in range(2):
        expected = _denoise(eager, "sd1", steps=6)
        assert_close_scaled(_denoise(compiled, "sd1", steps=6), expected, reduction=_loop(eager, 6))
    assert 1 <= len(compiles) <= 4, len(compiles)
    for pipe in (eager, compiled):
        lora_kit.unschedule(pipe)
        lora_kit.fuse(pipe)
    expected = _denoise(eager, "sd1", steps=2)
    assert_close_scaled(_denoise(compiled, "sd1", steps=2), expected, reduction=_loop(eager, 2))


class SeenWeights:
    """A forward hook on one adapted layer that solves, from the layer's input and output only, for the weights
    the two adapters were applied with: y - base(x) = w_a * u_a + w_b * u_b, u = scale * up(down(x))."""

    def __init__(self, wrapper):
        self.wrapper, self.seen = wrapper, []
        self.handle = wrapper.register_forward_hook(self)

    def __call__(self, module, args, y):
        x = args[0]
        with torch.no_grad():
            r = (y - module.base(x)).double().flatten()
            units = []
            for name in ("a", "b"):
                ad = module.adapters[name]
                unit = F.linear(F.linear(x, ad.down), ad.up) * (ad.alpha.item() / ad.down.shape[0])
                units.append(unit.double().flatten())
            u = torch.stack(units, 1)
            self.seen.append(torch.linalg.lstsq(u, r[:, None]).solution.flatten().tolist())


def test_a_schedule_after_a_call_under_inference_mode(make_pipe):
    """A pipeline called under torch.inference_mode leaves caches that may not be written outside it: a later call
    without it (pipelines run under no_grad) rebuilds them instead of failing, and both calls give the same output."""
    pipe = make_pipe("sd1")
    _two_adapters(pipe, "sd1")
    lora_kit.schedule(pipe, {"a": "0:1,1:0.2", "b": "0:0.3,1:1"})
    with torch.inference_mode():
        first = _denoise(pipe, "sd1", steps=4)
    again = _denoise(pipe, "sd1", steps=4)
    with torch.inference_mode():
        third = _denoise(pipe, "sd1", steps=4)
    assert torch.equal(first, again) and torch.equal(first, third)


@pytest.mark.parametrize("arch", ["sd1", "sdxl", "sd3", "flux"])
def test_the_model_sees_the_schedule_at_every_step(make_pipe, arch, monkeypatch):
    applied, apply = [], FactorBatch.apply
    monkeypatch.setattr(FactorBatch, "apply", lambda self, f: applied.append(apply(self, f)) or applied[-1])
    pipe = make_pipe(arch)
    _two_adapters(pipe, arch)
    lora_kit.set_weights(pipe, {"a": 0.5, "b": 2.0})
    calls = []

    def fn(progress, step, timestep):
        calls.append((progress, step, timestep))
        return 1.0 - 0.75 * progress

    steps = 4
    lora_kit.schedule(pipe, {"a": "0:1.0,0.4:0.6,1:0.0", "b": fn})
    path, wrapper = next((p, w) for p, w in lora_modules(main_model(pipe)) if {"a", "b"} <= set(w.adapters))
    hook = SeenWeights(wrapper)
    _denoise(pipe, arch, steps)
    hook.handle.remove()
    assert applied == [True, True, False]  # steps 2-3 in one batch; the last sets a to 0 (a rebuild, per layer)
    assert len(hook.seen) == steps, path  # one model call per step: guidance doubles the batch, not the calls
    progress = np.arange(steps) / (steps - 1)
    expected_a = 0.5 * np.interp(progress, [0, 0.4, 1], [1.0, 0.6, 0.0])
    expected_b = 2.0 * (1.0 - 0.75 * progress)
    # (a few fp32 products, no sums: a few ulps off; a neighbouring step's strengths differ by 0.08 or more)
    np.testing.assert_allclose(np.array(hook.seen), np.stack([expected_a, expected_b], 1), atol=1e-4)
    timesteps = pipe.scheduler.timesteps.tolist()
    assert [c[1] for c in calls] == list(range(steps)) and [c[2] for c in calls] == pytest.approx(timesteps)
    # unscheduled, the layer sees the static weights again
    lora_kit.unschedule(pipe)
    hook = SeenWeights(wrapper)
    _denoise(pipe, arch, 2)
    np.testing.assert_allclose(np.array(hook.seen), [[0.5, 2.0]] * 2, atol=1e-4)


def test_a_pipeline_sharing_the_unet_runs_the_schedule_on_its_own_scheduler(make_pipe):
    """schedule() on a from_pipe pipeline makes the hook read that pipeline's scheduler (it read the first one's
    stale DDIM timesteps); once the pipeline it follows is gone, a call is an error, not factors frozen at their
    last value, and schedule() on the live pipeline binds it."""
    import gc

    import diffusers

    spec = "0:1,1:-1"

    def adapted(scheduler_class):
        pipe = make_pipe("sd1")
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
        inject_lora(pipe.unet, "attn", rank=2, name="a")
        randomize_adapters(pipe, seed=3)
        lora_kit.schedule(pipe, {"a": spec})
        return pipe

    expected = _denoise(adapted(diffusers.EulerDiscreteScheduler), "sd1", steps=4)
    pipe = adapted(diffusers.DDIMScheduler)
    _denoise(pipe, "sd1", steps=2)
    euler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    other = diffusers.StableDiffusionPipeline.from_pipe(pipe, scheduler=euler)
    other.set_progress_bar_config(disable=True)
    lora_kit.schedule(other, {"a": spec})
    assert torch.equal(_denoise(other, "sd1", steps=4), expected)

    pipe = adapted(diffusers.EulerDiscreteScheduler)
    other = diffusers.StableDiffusionPipeline.from_pipe(pipe)  # the same scheduler object
    other.set_progress_bar_config(disable=True)
    del pipe
    gc.collect()
    with pytest.raises(LoraKitError, match="pipeline is gone: call lora_kit.schedule"):
        _denoise(other, "sd1", steps=4)
    lora_kit.schedule(other, {"a": spec})
    assert torch.equal(_denoise(other, "sd1", steps=4), expected)


@pytest.mark.parametrize(
    "scheduler, kwargs, img2img",
    [
        ("PNDMScheduler", {"skip_prk_steps": True}, None),  # SD1.5's: [751, 501, 501, 251, 1]
        ("PNDMScheduler", {"skip_prk_steps": False}, None),  # PRK warm-up: every other timestep repeats
        ("PNDMScheduler", {"skip_prk_steps": True}, 0.75),  # img2img from the first of the repeated pair
        ("PNDMScheduler", {"skip_prk_steps": True}, 0.5),  # ... and from the second
        ("HeunDiscreteScheduler", {}, None),  # two model calls per step
    ],
)
def test_the_schedule_sees_the_pipelines_own_step(make_pipe, scheduler, kwargs, img2img):
    """step = the index in scheduler.timesteps of the timestep the pipeline's loop is at (its callback says it),
    also where the list repeats timesteps (PNDM: steps 0,1,1,3,4 were seen instead of 0..4)."""
    import diffusers

    pipe = make_pipe("sd1")
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **kwargs)
    inject_lora(pipe.unet, "attn", rank=2, name="a")
    seen, loop = [], []
    lora_kit.schedule(pipe, {"a": lambda p, s, t: seen.append((p, s, t)) or 1.0})
    call = {}
    if img2img is not None:
        pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(pipe)
        pipe.set_progress_bar_config(disable=True)
        lora_kit.schedule(pipe, {"a": lambda p, s, t: seen.append((p, s, t)) or 1.0})
        call = {"image": torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), "strength": img2img}
    pipe("x", num_inference_steps=4, output_type="latent", **call,
         callback_on_step_end=lambda p, i, t, k: loop.append((i, float(t))) or k)  # fmt: skip
    timesteps = pipe.scheduler.timesteps.tolist()
    start = len(timesteps) - len(loop)
    assert (start > 0) == (img2img is not None) and len(seen) == len(loop)
    assert [s for _, s, _ in seen] == [start + i for i, _ in loop]
    assert [p for p, _, _ in seen] == pytest.approx([(start + i) / (len(timesteps) - 1) for i, _ in loop])
    assert [t for _, _, t in seen] == [timesteps[start + i] for i, _ in loop] == [t for _, t in loop]


def test_zero_schedule_is_the_base_and_constant_schedule_the_static_weight(make_pipe):
    base = _denoise(make_pipe("sd1"), "sd1")
    pipe = make_pipe("sd1")
    _two_adapters(pipe, "sd1")
    lora_kit.schedule(pipe, {"a": "0:0,1:0", "b": lambda p, s, t: 0.0})
    assert torch.equal(_denoise(pipe, "sd1"), base)
    lora_kit.unschedule(pipe)
    lora_kit.set_weights(pipe, {"a": 0.3, "b": 0.8})
    static = _denoise(pipe, "sd1")
    assert not torch.allclose(static, base, atol=1e-3)
    lora_kit.set_weights(pipe, {"a": 0.5, "b": 1.0})
    lora_kit.schedule(pipe, {"a": "0:0.6", "b": lambda p, s, t: 0.8})  # 0.5 x 0.6 and 1 x 0.8
    assert_close_scaled(_denoise(pipe, "sd1"), static, reduction=_loop(pipe, 3))


def test_schedule_follows_loads_and_unloads_and_refuses_bad_input(make_pipe, two_loras):
    a, b = two_loras
    pipe = make_pipe("sd1")
    lora_kit.load(pipe, a)
    with pytest.raises(LoraKitError, match="no adapter named 'b'"):
        lora_kit.schedule(pipe, {"b": "0:1"})
    for spec, message in [
        ("0:1,x", "not PROGRESS:VALUE"),
        ("0.5:1,0.2:0", "increase"),
        ("0:1,1.5:0", "in \\[0, 1\\]"),
    ]:
        with pytest.raises(LoraKitError, match=message):
            lora_kit.schedule(pipe, {"a": spec})
    with pytest.raises(LoraKitError, match="diffusers pipeline"):
        lora_kit.schedule(pipe.unet, {"a": "0:1"})
    lora_kit.schedule(pipe, {"a": "0:0"})
    with pytest.raises(LoraKitError, match="unschedule first"):
        lora_kit.collapse(pipe)
    lora_kit.load(pipe, b)
    lora_kit.schedule(pipe, {"b": "0:0"})
    _denoise(pipe, "sd1", 2)
    factors = {n: {w.adapters[n].factor for _, w in lora_modules(pipe.unet) if n in w.adapters} for n in "ab"}
    assert factors == {"a": {0.0}, "b": {0.0}}  # every module of both adapters
    lora_kit.unload(pipe, "a")
    assert lora_kit.schedule.scheduled_names(pipe) == ["b"]
    lora_kit.unload(pipe, "b")
    assert not hasattr(pipe.unet, lora_kit.schedule.HOOK) and not pipe.unet._forward_pre_hooks
    assert str(lora_kit.schedule.parse("0:1.0, 0.4:0.6 ,1:0")) == "0:1,0.4:0.6,1:0"


def test_a_replaced_adapter_keeps_its_schedule(make_pipe, two_loras):
    """load(replace=True) keeps the name's step schedule: the new adapter runs scheduled, as if it had been loaded
    and scheduled fresh."""
    a, b = two_loras
    spec = "0:1,1:-1"
    fresh = make_pipe("sd1")
    lora_kit.load(fresh, b, name="x", weight=0.7)
    lora_kit.schedule(fresh, {"x": spec})
    expected = _denoise(fresh, "sd1", steps=4)
    pipe = make_pipe("sd1")
    lora_kit.load(pipe, a, name="x")
    lora_kit.schedule(pipe, {"x": spec})
    _denoise(pipe, "sd1", steps=2)
    lora_kit.load(pipe, b, name="x", weight=0.7, replace=True)
    assert lora_kit.schedule.scheduled_names(pipe) == ["x"]
    assert torch.equal(_denoise(pipe, "sd1", steps=4), expected)


# --- fused mode ----------------------------------------------------------------------------------------------


def test_fused_equals_unfused_recomposes_on_change_and_restores_the_base_exactly(make_pipe, two_loras, monkeypatch):
    a, b = two_loras
    pipe = make_pipe("sd1")
    base_out = pipeline_outputs(pipe)
    base_weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    lora_kit.load(pipe, a, weight=0.7)
    lora_kit.load(pipe, b, weight=-0.5)
    unfused = pipeline_outputs(pipe)
    lora_kit.fuse(pipe)
    assert_outputs_close(pipeline_outputs(pipe), unfused, pipe)
    composed = []
    real_compose = functional.compose
    monkeypatch.setattr(functional, "compose", lambda *args: composed.append(1) or real_compose(*args))
    pipeline_outputs(pipe)
    assert not composed  # unchanged weights: the cached composition is reused
    lora_kit.set_weights(pipe, {"b": 0.9})
    fused = pipeline_outputs(pipe)
    assert composed  # ... and recomposed after a weight change
    lora_kit.unfuse(pipe)
    assert_outputs_close(fused, pipeline_outputs(pipe), pipe)
    assert all(torch.equal(w.base.weight, base_weights[f"{p}.weight"]) for p, w in lora_modules(pipe.unet))
    lora_kit.fuse(pipe)
    lora_kit.unload(pipe, "a")
    lora_kit.unload(pipe, "b")
    assert_outputs_close(pipeline_outputs(pipe), base_out, exact=True)
    assert pipe.unet.state_dict().keys() == base_weights.keys()
    assert all(torch.equal(v, base_weights[k]) for k, v in pipe.unet.state_dict().items())


# --- the forward paths of one layer --------------------------------------------------------------------------


def _layer(kind, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(12, 10) if kind == "linear" else nn.Conv2d(6, 8, 3, padding=1)
    wrapper = (LoraInjectedLinear if kind == "linear" else LoraInjectedConv2d)(base)
    for i, (name, rank, alpha, weight) in enumerate([("a", 3, 1.5, 0.7), ("b", 2, 4.0, -1.3), ("c", 4, 2.0, 0.4)]):
        ad = wrapper.add_adapter(name, rank=rank, alpha=alpha)
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            ad.down.copy_(torch.randn(ad.down.shape, generator=g))
            ad.up.copy_(torch.randn(ad.up.shape, generator=g))
        ad.weight = weight
    x = torch.randn(2, 5, 12) if kind == "linear" else torch.randn(2, 6, 7, 7)
    return wrapper, x


def _formula(wrapper, x):
    """base(x) + sum weight * factor * alpha/rank * up(down(x)), one adapter at a time, written out."""
    y = wrapper.base(x)
    for ad in wrapper.adapters.values():
        if ad.enabled:
            if isinstance(wrapper, LoraInjectedLinear):
                h = x @ ad.down.T @ ad.up.T
            else:
                b = wrapper.base
                h = F.conv2d(F.conv2d(x, ad.down, padding=b.padding), ad.up)
            y = y + h * (ad.weight * ad.factor * ad.alpha.item() / ad.down.shape[0])
    return y


def _close(wrapper, actual, expected):
    """fp32 outputs of one layer: the longest chain of sums is the down (the base's fan-in), then the up (the ranks
    of every adapter, concatenated or one by one)."""
    rank = sum(a.rank for a in wrapper.adapters.values())
    assert_close_scaled(actual, expected, reduction=wrapper.base.weight[0].numel() + rank)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_concatenated_forward_equals_the_per_adapter_loop_and_follows_changes(kind):
    wrapper, x = _layer(kind)
    with torch.no_grad():
        expected = _formula(wrapper, x)
    loop = wrapper(x)  # gradients wanted: the per-adapter loop
    assert loop.requires_grad
    with torch.no_grad():
        _close(wrapper, loop, expected)
        _close(wrapper, wrapper(x), loop)  # concatenated ranks
        # every kind of change reaches the cached pair
        wrapper.adapters["b"].weight = 0.25
        wrapper.adapters["c"].factor = 0.5
        wrapper.adapters["a"].up.mul_(-2.0)
        wrapper.adapters["b"].alpha.fill_(1.0)
        _close(wrapper, wrapper(x), _formula(wrapper, x))
        wrapper.adapters["c"].enabled = False
        _close(wrapper, wrapper(x), _formula(wrapper, x))
        wrapper.fused = True
        _close(wrapper, wrapper(x), _formula(wrapper, x))
        wrapper.adapters["a"].weight = 0.0
        _close(wrapper, wrapper(x), _formula(wrapper, x))
    # training in fused mode still reaches the adapters
    wrapper(x).square().sum().backward()
    assert wrapper.adapters["b"].up.grad is not None


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("adapters", [1, 3])
def test_inference_path_equals_the_training_path(kind, adapters):
    """No gradient: the cached pair in the compute dtype with the sum fused into one GEMM, written into the base
    output in place; with gradients the plain per-adapter formula. Both agree, in fp32 and under bf16 autocast."""
    wrapper, x = _layer(kind)
    for name in list(wrapper.adapters)[adapters:]:
        del wrapper.adapters[name]
    training = wrapper(x)
    with torch.no_grad():
        _close(wrapper, wrapper(x), training)
        _close(wrapper, training, _formula(wrapper, x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        training = wrapper(x)
        with torch.no_grad():
            inference = wrapper(x)
    assert inference.dtype == training.dtype == torch.bfloat16
    scale = training.float().abs().max().item()  # bf16 rounds each sum differently: a few ulps of the largest value
    torch.testing.assert_close(inference.float(), training.float(), atol=0.02 * scale, rtol=0.02)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("mode", ["unfused", "fused", "hooked base"])
def test_a_plan_under_autocast_follows_its_dtype(kind, mode):
    """An fp32 layer under autocast keeps a plan for its fp32 inputs (the ops cast them; before, every call rebuilt
    its forward: about twice the time of the plan on this CPU) and gives the formula to the autocast dtype's
    precision; a change of autocast dtype (bf16, then fp16) is a new plan, not the old pair in another dtype."""
    wrapper, x = _layer(kind)
    wrapper.eval().fused = mode == "fused"
    if mode == "hooked base":
        wrapper.base.register_forward_hook(lambda module, args, out: None)
    large = torch.randn(4, 9, 12) if kind == "linear" else torch.randn(2, 6, 9, 9)  # (the composing route too)
    for dtype in (torch.bfloat16, torch.float16, torch.bfloat16):
        for t in (x, large):
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
                fresh = wrapper(t)
                assert wrapper._plan is not None and wrapper._plan[3] == dtype
                again = wrapper(t)
            assert fresh.dtype == again.dtype == dtype
            torch.testing.assert_close(again, fresh)
            scale = fresh.float().abs().max().item()
            torch.testing.assert_close(again.float(), _formula(wrapper, t).detach(), atol=0.02 * scale, rtol=0.02)


def test_inference_path_on_unbatched_and_channels_last_convolutions():
    wrapper, x = _layer("conv")
    wrapper.eval()  # the kept plan too: each layout through the plan kept by the one before
    with torch.no_grad():
        expected = _formula(wrapper, x)
        for _ in range(2):
            _close(wrapper, wrapper(x.contiguous(memory_format=torch.channels_last)), expected)
            _close(wrapper, wrapper(x[0]), expected[0])
            _close(wrapper, wrapper(x), expected)
    assert wrapper._plan is not None


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_unfused_routes_equal_the_formula(kind, dtype):
    """Few positions: the pair on the activations; many: a transient composed weight. Each call takes its own route
    (the kept plan included) and both give the formula; nothing weight-sized stays cached."""
    wrapper, x = _layer(kind)
    small, large = (x[:1, :2], torch.randn(4, 9, 12)) if kind == "linear" else (x[:, :, :1, :1], x)
    assert not wrapper.composes(small) and wrapper.composes(large)
    wrapper.eval()
    with torch.no_grad():
        expected = {n: _formula(wrapper.float(), t) for n, t in (("small", small), ("large", large))}
        wrapper.to(dtype)
        for name in ["small", "large", "large", "small", "large"]:
            y = wrapper((small if name == "small" else large).to(dtype))
            assert y.dtype == dtype
            if dtype == torch.float32:
                _close(wrapper, y, expected[name])
            else:  # bf16 weights and inputs (2^-8 relative each), fp32 sums: a stated precision bound
                torch.testing.assert_close(y.float(), expected[name], atol=0.15, rtol=0.03)
    assert wrapper._plan is not None
    cached = [t for _, tensors in wrapper._caches.values() for t in tensors]
    assert cached and all(t.shape != wrapper.base.weight.shape for t in cached)  # the down/up pair only


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_step_factors_reweight_the_kept_plan_in_place(kind):
    """set_factors (what the schedule hook calls at every step) keeps the inference plan where it can and gives the
    formula at every step: new factors, a factor through 0 and back, an up written in place, a disabled adapter."""
    wrapper, x = _layer(kind)
    wrapper.eval()
    with torch.no_grad():
        wrapper(x)
        plan = wrapper._plan
        for step, factors in enumerate([{"a": 0.5}, {"a": 0.25, "c": 2.0}, {"b": -1.0}, {"a": 0.0}, {"a": 0.7}]):
            wrapper.set_factors(factors)
            _close(wrapper, wrapper(x), _formula(wrapper, x))
            assert (wrapper._plan is plan) == (step < 3)  # to or from 0: other adapters active, a new plan
            plan = wrapper._plan
        wrapper.adapters["b"].up.mul_(3.0)
        wrapper.set_factors({"c": 0.5})  # re-weighted from the old up: the next forward must not use it
        _close(wrapper, wrapper(x), _formula(wrapper, x))
        wrapper.adapters["c"].enabled = False
        wrapper.set_factors({"a": 1.5, "c": 3.0})
        _close(wrapper, wrapper(x), _formula(wrapper, x))
    assert [a.factor for a in wrapper.adapters.values()] == [1.5, -1.0, 3.0]


def test_factor_batch_sets_every_layer_as_set_factors_does():
    """FactorBatch (what the schedule hook uses once every layer keeps its plan): each layer gives the formula with
    the new factors and keeps its plan; any other change since the build makes it refuse, never serve stale tensors.
    Layers with the same columns share a buffer: linear and conv here, while a third layer without "b" has its own."""
    layers = [_layer("linear"), _layer("conv", seed=1), _layer("linear", seed=2)]
    wrappers = [w.eval() for w, _ in layers]
    wrappers[2].adapters["b"].enabled = False

    def check():
        for w, x in layers:
            _close(w, w(x), _formula(w, x))

    with torch.no_grad():
        check()
        plans = [w._plan for w in wrappers]
        batch = FactorBatch(wrappers, ["a", "b"])
        assert len(batch.groups) == 2
        for factors in ({"a": 0.5, "b": 2.0}, {"a": -1.0, "b": 0.25}):
            assert batch.apply(factors)
            assert all(w.adapters[n].factor == f for w in wrappers for n, f in factors.items())
            check()
            assert [w._plan for w in wrappers] == plans  # (the same objects: no rebuild)
        wrappers[0].set_factors({"c": 3.0})  # a factor the batch holds fixed, set layer by layer: refused after
        check()
        assert not batch.apply({"a": 0.3, "b": 1.0})
        check()
        batch = FactorBatch(wrappers, ["a", "b"])
        wrappers[0].adapters["b"].up.mul_(2.0)  # an in-place write: the next forward rebuilds that layer's plan
        check()
        assert not batch.apply({"a": 0.3, "b": 1.0})
        batch = FactorBatch(wrappers, ["a", "b"])
        assert not batch.apply({"a": 0.0, "b": 1.0})  # a factor of 0 takes an adapter out of the layers' sums
        check()
        only_a, only_b = FactorBatch(wrappers, ["a"]), FactorBatch(wrappers, ["b"])
        assert only_b.apply({"b": 0.9})
        assert not only_a.apply({"a": 0.4})  # it holds b's factor fixed, and another batch has set b since
        wrappers[1].adapters["c"].weight = 0.1  # any other setting: refused
        assert not batch.apply({"a": 0.3, "b": 1.0})
        check()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_hooked_base_keeps_its_hooks(kind):
    """A base module with hooks (offloading, quantisation wrappers) is always called as a module, also when the hook
    comes after the wrapper kept a plan that calls the base op directly (and global module hooks count too)."""
    wrapper, x = _layer(kind)
    wrapper.eval()
    calls = []
    with torch.no_grad():
        wrapper(x), wrapper(x)  # the plan, calling the plain base's op directly
        assert wrapper._plan[7][0] is wrapper.base
        handle = wrapper.base.register_forward_pre_hook(lambda module, args: calls.append(1))
        assert not wrapper.composes(x)
        _close(wrapper, wrapper(x), _formula(wrapper, x))
        wrapper(x)
        assert len(calls) == 3  # the formula once, then two forwards each calling the base module
        handle.remove()
        wrapper(x), wrapper(x)
        handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: calls.append(2))
        try:
            wrapper(x)
        finally:
            handle.remove()
        assert calls.count(2) == 2  # the wrapper and its base


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_kept_plan_sees_a_new_base_weight(kind):
    """The plan reads the base's weight and bias directly: replacing either (a new Parameter, `.data`, a new base
    module) reaches the next forward."""
    wrapper, x = _layer(kind)
    wrapper.eval()
    base = wrapper.base
    with torch.no_grad():
        for change in (
            lambda: setattr(base, "weight", nn.Parameter(base.weight * 2)),
            lambda: setattr(base.bias, "data", base.bias + 1),
            lambda: setattr(wrapper, "base", type(base)(*base.weight.shape[1::-1], *base.weight.shape[2:3])),
        ):
            wrapper(x), wrapper(x)
            change()
            _close(wrapper, wrapper(x), _formula(wrapper, x))


def test_inference_in_half_precision_needs_no_fp32_copies():
    """A bf16 base with fp32 adapters: the forward runs in bf16 (cached bf16 factors) and matches the fp32 formula."""
    wrapper, x = _layer("linear")
    with torch.no_grad():
        expected = _formula(wrapper, x)
        wrapper.base.to(torch.bfloat16)
        y = wrapper(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in wrapper._caches["pair"][1])
    torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.02)  # bf16: a stated precision bound


# --- kohya LBW block vectors ---------------------------------------------------------------------------------

# SD1.5's UNet, block by block, in SGM numbering (input_blocks / middle_block / output_blocks) as A1111 and kohya's
# svd_merge_lora number them: written out by hand from the original checkpoint layout.
SD15_BLOCKS = {
    "conv_in": "IN00",
    "down_blocks.0.resnets.0": "IN01", "down_blocks.0.attentions.0": "IN01",
    "down_blocks.0.resnets.1": "IN02", "down_blocks.0.attentions.1": "IN02", "down_blocks.0.downsamplers": "IN03",
    "down_blocks.1.resnets.0": "IN04", "down_blocks.1.attentions.0": "IN04",
    "down_blocks.1.resnets.1": "IN05", "down_blocks.1.attentions.1": "IN05", "down_blocks.1.downsamplers": "IN06",
    "down_blocks.2.resnets.0": "IN07", "down_blocks.2.attentions.0": "IN07",
    "down_blocks.2.resnets.1": "IN08", "down_blocks.2.attentions.1": "IN08", "down_blocks.2.downsamplers": "IN09",
    "down_blocks.3.resnets.0": "IN10", "down_blocks.3.resnets.1": "IN11",
    "mid_block": "M00",
    "up_blocks.0.resnets.0": "OUT00", "up_blocks.0.resnets.1": "OUT01", "up_blocks.0.resnets.2": "OUT02",
    "up_blocks.0.upsamplers": "OUT02",
    "up_blocks.1.resnets.0": "OUT03", "up_blocks.1.attentions.0": "OUT03",
    "up_blocks.1.resnets.1": "OUT04", "up_blocks.1.attentions.1": "OUT04",
    "up_blocks.1.resnets.2": "OUT05", "up_blocks.1.attentions.2": "OUT05", "up_blocks.1.upsamplers": "OUT05",
    "up_blocks.2.resnets.0": "OUT06", "up_blocks.2.attentions.0": "OUT06",
    "up_blocks.2.resnets.1": "OUT07", "up_blocks.2.attentions.1": "OUT07",
    "up_blocks.2.resnets.2": "OUT08", "up_blocks.2.attentions.2": "OUT08", "up_blocks.2.upsamplers": "OUT08",
    "up_blocks.3.resnets.0": "OUT09", "up_blocks.3.attentions.0": "OUT09",
    "up_blocks.3.resnets.1": "OUT10", "up_blocks.3.attentions.1": "OUT10",
    "up_blocks.3.resnets.2": "OUT11", "up_blocks.3.attentions.2": "OUT11",
}  # fmt: skip
# SDXL: three blocks of two layers; attention in down_blocks 1-2 and up_blocks 0-1
SDXL_ATTENTION_BLOCKS = {
    "down_blocks.1.attentions.0": "IN04", "down_blocks.1.attentions.1": "IN05",
    "down_blocks.2.attentions.0": "IN07", "down_blocks.2.attentions.1": "IN08", "mid_block.attentions.0": "M00",
    "up_blocks.0.attentions.0": "OUT00", "up_blocks.0.attentions.1": "OUT01", "up_blocks.0.attentions.2": "OUT02",
    "up_blocks.1.attentions.0": "OUT03", "up_blocks.1.attentions.1": "OUT04", "up_blocks.1.attentions.2": "OUT05",
}  # fmt: skip
SD15_IDS = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]
SD15_SHORT = "BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08 OUT09 OUT10 OUT11".split()
SDXL_SHORT = "BASE IN04 IN05 IN07 IN08 M00 OUT00 OUT01 OUT02 OUT03 OUT04 OUT05".split()


def _unet(layout):
    import diffusers

    common = dict(sample_size=8, layers_per_block=2, norm_num_groups=8, attention_head_dim=8)
    if layout == "sd1":
        return diffusers.UNet2DConditionModel(
            **common, block_out_channels=(8, 8, 16, 16), cross_attention_dim=16,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )  # fmt: skip
    return diffusers.UNet2DConditionModel(
        **common, block_out_channels=(8, 16, 16), cross_attention_dim=16, transformer_layers_per_block=(1, 1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip


def _weights_by_path(unet, name="x"):
    return {p: w.adapters[name].weight for p, w in lora_modules(unet)}


def _expected(path, table, values):
    block = next((b for prefix, b in table.items() if (path + ".").startswith(prefix + ".")), None)
    return values.get(block, 1.0)


def test_lbw_vectors_set_the_documented_blocks():
    from types import SimpleNamespace

    from transformers import CLIPTextConfig, CLIPTextModel

    te = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=8))  # fmt: skip
    unet = _unet("sd1")
    every = [p for p, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]  # conv_in, conv_out too
    inject_lora(unet, rank=2, name="x", paths=every)
    inject_lora(te, "clip-attn", rank=2, name="x")
    pipe = SimpleNamespace(unet=unet, text_encoder=te)
    adapted = _weights_by_path(unet)
    assert {p.split(".")[0] for p in adapted} >= {"conv_in", "down_blocks", "mid_block", "up_blocks", "conv_out"}
    # the full 26-entry layout: entry i is 0.01 * (i + 1), every value distinct
    values = {b: 0.01 * (i + 1) for i, b in enumerate(SD15_IDS)}
    lora_kit.set_weights(pipe, {"x": [values[b] for b in SD15_IDS]})
    assert _weights_by_path(unet) == {p: _expected(p, SD15_BLOCKS, values) for p in adapted}
    assert {w.adapters["x"].weight for _, w in lora_modules(te)} == {values["BASE"]}
    assert _weights_by_path(unet)["time_embedding.linear_1"] == 1.0 and _weights_by_path(unet)["conv_out"] == 1.0
    # the short 17-entry layout (attention blocks), as the comma string A1111 users write
    short = {b: 0.5 + 0.01 * i for i, b in enumerate(SD15_SHORT)}
    lora_kit.set_weights(pipe, {"x": ",".join(str(short[b]) for b in SD15_SHORT)})
    assert _weights_by_path(unet) == {p: _expected(p, SD15_BLOCKS, short) for p in adapted}
    with pytest.raises(LoraKitError, match="26 entries .* or the short 17, got 5"):
        lora_kit.set_weights(pipe, {"x": [1.0] * 5})

    xl = _unet("sdxl")
    inject_lora(xl, "kohya", rank=2, name="x")
    values = {b: 0.1 * (i + 1) for i, b in enumerate(SDXL_SHORT)}
    lora_kit.set_weights(SimpleNamespace(unet=xl), {"x": [values[b] for b in SDXL_SHORT]})
    weights = _weights_by_path(xl)
    assert weights and weights == {p: _expected(p, SDXL_ATTENTION_BLOCKS, values) for p in weights}
    assert len(lora_kit.schedule.block_ids(xl)) == 20


def test_lbw_vector_on_a_transformer_is_refused(make_pipe):
    pipe = make_pipe("sd3")
    inject_lora(pipe.transformer, "dit", rank=2, name="x")
    with pytest.raises(LoraKitError, match="defined for UNets"):
        lora_kit.set_weights(pipe, {"x": [1.0] * 12})


def test_text_encoder_adapters_are_never_scheduled(make_pipe):
    pipe = make_pipe("sd1")
    inject_lora(pipe.unet, "attn", rank=2, name="x")
    inject_lora(pipe.text_encoder, "clip-attn", rank=2, name="x")
    randomize_adapters(pipe)
    te_static = forward_text(pipe.text_encoder)
    lora_kit.schedule(pipe, {"x": "0:0"})
    _denoise(pipe, "sd1", 2)
    assert torch.equal(forward_text(pipe.text_encoder), te_static)
    assert {w.adapters["x"].factor for _, w in lora_modules(pipe.text_encoder)} == {1.0}


def test_an_adapter_object_in_two_layers_gets_its_factor_in_both():
    """One LoraAdapter object added to two layers (tied weights): a factor set through one layer, or by a batch over
    that layer alone, must reach the other's kept plan too (both rebuild rather than keep a stale pair)."""
    (first, x), (second, _) = _layer("linear"), _layer("linear", seed=1)
    second.adapters["a"] = first.adapters["a"]
    for w in (first, second):
        w.eval()
    with torch.no_grad():
        for w in (first, second):
            w(x), w(x)  # both keep a plan
        first.set_factors({"a": 0.5})
        _close(second, second(x), _formula(second, x))
        first(x)
        with pytest.raises(ValueError, match="outside the batch"):
            FactorBatch([first], ["a"])
        batch = FactorBatch([first, second], ["a"])
        assert batch.apply({"a": 2.0})
        for w in (first, second):
            _close(w, w(x), _formula(w, x))
        del second.adapters["a"]  # held by one table again: a factor set keeps the plan
        second(x), first(x)
        plan = first._plan
        first.set_factors({"a": 0.25})
        assert first._plan is plan
        _close(first, first(x), _formula(first, x))
