"""Benchmark: the cost of LoRA adapters per denoising step, in one run: the base UNet, one and two unfused adapters
(two run as one concatenated down/up pair per layer, or as a transient composed weight where that computes less),
the same two adapters as peft layers switched on with diffusers' set_adapters (the peer), two adapters through the
per-adapter loop (the training path, kept for comparison), fused, and two step-scheduled adapters.

Each configuration runs the same denoising loop (classifier-free guidance: batch 2, DDIM) and the script reports the
median time per step and its ratio to the base step; `scheduled / 2 unfused` is the overhead of step schedules. The
configurations take turns, round by round in alternating order, and a ratio is the median over rounds of that
round's ratio: a machine whose speed drifts by a few percent over minutes (a shared VM) favours none of them. The
first step of every loop is timed apart: it builds the caches (the concatenated pairs, the fused weights). Beside
each time stands what the configuration must compute over the base (FLOPs: the adapters' GEMMs counted per layer),
the floor on compute-bound hardware. Then, layer by layer on each wrapped layer's own input, what the unfused forward
adds by route (the one each layer picks, the pair alone, the composed weight alone, the faster of the two measured):
where the picked route lags the faster one, the rule that picks it wants tuning on that hardware.
Targets (issue 6): two unfused adapters <= 1.05x the base step on a GPU, scheduling overhead <= 1%.

    python bench/inference.py            # SD1.5-sized UNet from config (random weights), kohya-preset adapters of
                                         # rank 32 and 16; latents 64x64 on a GPU, 32x32 on a CPU (--latent)
    python bench/inference.py --quick    # the tiny SD1 pipeline of the test suite (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import lora_kit  # noqa: E402
from bench import _results  # noqa: E402
from lora_kit import layers  # noqa: E402
from lora_kit.inject import enable_lora, inject_lora, lora_modules, remove_lora  # noqa: E402
from lora_kit.layers import LoraWrapper  # noqa: E402
from lora_kit.state import load_lora_state_dict, lora_state_dict  # noqa: E402

CONFIGS = ["base", "1 adapter", "2 adapters", "2 adapters, loop", "2 fused", "2 scheduled", "2 diffusers+peft"]
COMPILED = ["base", "2 adapters", "2 fused", "2 scheduled", "2 diffusers+peft"]  # --compile: each one compiles
SCHEDULES = {"a": "0:1,1:0.2", "b": "0:0.3,1:1"}  # change at every step: the worst case for the caches


class Pipe:
    """The two pipeline parts a denoising loop needs (lora_kit.schedule reads `scheduler`)."""

    def __init__(self, unet, scheduler):
        self.unet, self.scheduler = unet, scheduler
        self.ranks: dict[str, int] = {}


def build(args, device, dtype) -> tuple[Pipe, int, int]:
    """(pipe, latent size, cross-attention width); adapters a (rank r) and b (rank r/2) with random factors."""
    import diffusers

    torch.manual_seed(args.seed)
    if args.quick:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import build_pipeline

        with tempfile.TemporaryDirectory() as folder:
            unet = build_pipeline("sd1", folder).unet
        latent, rank = unet.config.sample_size, 4
    else:
        cfg = json.loads((ROOT / "lora_kit" / "assets" / "configs" / "sd1.json").read_text())["unet"]
        cfg.pop("class")
        unet = diffusers.UNet2DConditionModel(**cfg)
        latent, rank = args.latent or (64 if device.type == "cuda" else 32), args.rank
    unet = (unet.to(device) if dtype == torch.float32 else unet.to(device, dtype)).eval().requires_grad_(False)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(args.seed)
    pipe = Pipe(unet, scheduler)
    pipe.ranks = {"a": rank, "b": max(1, rank // 2)}
    for name, r in pipe.ranks.items():
        inject_lora(unet, "kohya", rank=r, name=name)
        for _, wrapper in lora_modules(unet):
            ad = wrapper.adapters[name]
            with torch.no_grad():
                ad.up.copy_(torch.randn(ad.up.shape, generator=g) * 0.01)
    return pipe, latent, unet.config.cross_attention_dim


@contextlib.contextmanager
def configured(pipe: Pipe, config: str):
    """Put the pipeline in one configuration for the duration of the block, then back to two unfused adapters."""
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)  # (--compile: the module torch.compile wraps)
    if config == "base":  # no wrappers at all
        states = {n: lora_state_dict(pipe, n) for n in ("a", "b")}
        remove_lora(unet)
        yield
        for name, state in states.items():
            load_lora_state_dict(pipe, state, name=name)
    elif config == "1 adapter":
        enable_lora(unet, "b", False)
        yield
        enable_lora(unet, "b", True)
    elif config == "2 adapters, loop":
        original = LoraWrapper._cacheable
        LoraWrapper._cacheable = lambda self, active: False  # the per-adapter loop, as training runs it
        layers._bump()  # and no kept plan of another configuration
        yield
        LoraWrapper._cacheable = original
    elif config == "2 fused":
        lora_kit.fuse(pipe)
        yield
        lora_kit.unfuse(pipe)
    elif config == "2 diffusers+peft":  # the peer: the same layers and ranks as peft adapters, set_adapters
        from peft import LoraConfig

        states = {n: lora_state_dict(pipe, n) for n in ("a", "b")}
        paths = [path for path, _ in lora_modules(unet)]
        remove_lora(unet)
        for name, r in pipe.ranks.items():
            unet.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=paths), adapter_name=name)
        unet.set_adapters(list(pipe.ranks), [1.0, 0.7])
        yield
        unet.unload_lora()
        for name, state in states.items():
            load_lora_state_dict(pipe, state, name=name)
    elif config == "2 scheduled":
        lora_kit.schedule(pipe, SCHEDULES)
        yield
        lora_kit.unschedule(pipe)
    else:
        yield


def denoise(pipe: Pipe, latent: int, width: int, steps: int, seed: int, device, dtype) -> list[float]:
    """A classifier-free-guidance loop; returns the wall time of every step (UNet forward + scheduler step)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, latent, latent, generator=g).to(device, dtype)
    context = torch.randn(2, 77, width, generator=g).to(device, dtype)
    pipe.scheduler.set_timesteps(steps)
    times = []
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            start = time.perf_counter()
            noise = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample
            uncond, cond = noise.chunk(2)
            latents = pipe.scheduler.step(uncond + 7.5 * (cond - uncond), t, latents).prev_sample
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return times


def flop_ratios(pipe: Pipe, latent: int, width: int, device, dtype) -> dict[str, float]:
    """What each configuration must compute, over the base: one guided UNet forward counted by torch's FlopCounterMode
    without adapters, plus per wrapped layer and adapter 2 x positions x rank x (fan-in + out) for the pair on the
    activations (a convolution's down counts its kernel) or, where lora_kit's unfused forward composes the weight
    for the call instead (LoraWrapper.composes), 2 x out x fan-in x rank. The peer and the training loop always run
    the pair. The floor each can reach on hardware that is compute-bound."""
    import math

    from torch.utils.flop_counter import FlopCounterMode

    from lora_kit.layers import LoraInjectedLinear

    x = torch.zeros(2, 4, latent, latent, device=device, dtype=dtype)
    context = torch.zeros(2, 77, width, device=device, dtype=dtype)
    pair = dict.fromkeys(pipe.ranks, 0)  # the adapters' GEMMs on the activations
    ours = dict.fromkeys(pipe.ranks, 0)  # lora_kit's unfused inference: per layer the route it takes

    def count(module, args, out):
        base = module.base
        if isinstance(module, LoraInjectedLinear):
            positions, fan_in, fan_out = math.prod(args[0].shape[:-1]), base.in_features, base.out_features
        else:
            positions = out.shape[0] * out.shape[2] * out.shape[3]
            fan_in, fan_out = base.in_channels * math.prod(base.kernel_size), base.out_channels
        composes = module.composes(args[0])
        for name, adapter in module.adapters.items():
            pair[name] += 2 * positions * adapter.rank * (fan_in + fan_out)
            ours[name] += 2 * adapter.rank * (fan_out * fan_in if composes else positions * (fan_in + fan_out))

    hooks = [m.register_forward_hook(count) for m in pipe.unet.modules() if isinstance(m, LoraWrapper)]
    with torch.no_grad():
        pipe.unet(x, 500, encoder_hidden_states=context)
        for hook in hooks:
            hook.remove()
        with configured(pipe, "base"), FlopCounterMode(display=False) as counter:
            pipe.unet(x, 500, encoder_hidden_states=context)
    base = counter.get_total_flops()
    ratios = {"base": 1.0, "2 fused": 1.0, "1 adapter": 1 + ours["a"] / base}
    ratios.update(dict.fromkeys(["2 adapters", "2 scheduled"], 1 + sum(ours.values()) / base))
    ratios.update(dict.fromkeys(["2 adapters, loop", "2 diffusers+peft"], 1 + sum(pair.values()) / base))
    return {c: ratios[c] for c in CONFIGS}


def layer_inputs(pipe: Pipe, latent: int, width: int, device, dtype) -> list[tuple[LoraWrapper, torch.Tensor]]:
    """Every wrapped layer with the input it sees in one guided UNet call (the call keeps each layer's plan)."""
    x = torch.randn(2, 4, latent, latent, device=device, dtype=dtype)
    context = torch.randn(2, 77, width, device=device, dtype=dtype)
    inputs = {}
    wrappers = [w for _, w in lora_modules(pipe.unet)]
    hooks = [w.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0])) for w in wrappers]
    with torch.no_grad():
        pipe.unet(x, 500, encoder_hidden_states=context)
    for hook in hooks:
        hook.remove()
    return [(w, inputs[w]) for w in wrappers]


def _timed(fn, arg, device, calls: int = 1) -> float:
    """Seconds per call of `calls` calls back to back (on a GPU: until the last one's kernels are done, so a layer
    costs the longer of its launches and its kernels)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn(arg)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def layer_cost(pipe: Pipe, latent: int, width: int, device, dtype, repeats: int = 9) -> float:
    """Seconds two unfused adapters add to one guided UNet call, measured layer by layer: every wrapped layer's own
    input (recorded in one call), timed through the base layer alone and through the wrapper, alternating call by
    call; the sum over layers of the median differences. A machine whose speed drifts over seconds or minutes shifts
    both sides of each pair alike, which whole-step timings of one configuration after another cannot offer."""
    extra = 0.0
    with torch.no_grad():
        for wrapper, arg in layer_inputs(pipe, latent, width, device, dtype):
            pairs = [(_timed(wrapper.base, arg, device), _timed(wrapper, arg, device)) for _ in range(repeats)]
            extra += statistics.median(w - b for b, w in pairs)
    return extra


ROUTES = ("lora_kit's choice", "pair only", "composed only", "the faster of the two")


def route_costs(pipe: Pipe, latent: int, width: int, device, dtype, repeats: int = 5, calls: int = 4) -> dict:
    """Seconds two unfused adapters add to one guided UNet call, layer by layer, by the route each layer's unfused
    forward takes: its own choice (LoraWrapper.composes: the route computing fewer FLOPs), always the pair on the
    activations, always a transient composed weight, or the faster of those two as measured. Each layer runs every
    route and the base layer in turn, `calls` calls back to back per timing, median of `repeats`. Where the last
    row is well below the first, the choice is what to tune on this hardware."""
    extra = dict.fromkeys(ROUTES, 0.0)
    with torch.no_grad():
        for wrapper, arg in layer_inputs(pipe, latent, width, device, dtype):
            down, up = wrapper._caches["pair"][1]  # the concatenated pair the plan kept
            base, w = wrapper.base, wrapper.base.weight
            runs = {  # the kept plan's function with the threshold set to force one route
                "pair only": wrapper._direct(w, base.bias, down, up, arg.numel()),
                "composed only": wrapper._direct(w, base.bias, down, up, -1),
            }
            times = {name: [] for name in (*runs, "base")}
            for _ in range(repeats):
                times["base"].append(_timed(base, arg, device, calls))
                for name, run in runs.items():
                    times[name].append(_timed(lambda x, run=run, w=wrapper: run(w, x), arg, device, calls))
            cost = {name: statistics.median(t) - statistics.median(times["base"]) for name, t in times.items()}
            extra["pair only"] += cost["pair only"]
            extra["composed only"] += cost["composed only"]
            extra["lora_kit's choice"] += cost["composed only" if wrapper.composes(arg) else "pair only"]
            extra["the faster of the two"] += min(cost["pair only"], cost["composed only"])
    return extra


def _call(pipe: Pipe, x, context, wrappers: list, i: int) -> None:
    for wrapper in wrappers:  # a factor that differs from the last call's, set as the step hook sets it
        wrapper.set_factors({"a": 0.5 + i % 7 / 10})
    pipe.unet(x, 500, encoder_hidden_states=context)


def kernel_times(pipe: Pipe, latent: int, width: int, device, dtype, configs, calls: int = 5) -> dict[str, float]:
    """GPU time of one guided UNet call per configuration: the sum of its kernels' device time (torch.profiler), what
    a step costs once nothing waits on the CPU (CUDA graphs, torch.compile's reduce-overhead). A scheduled step
    runs the same kernels as an unscheduled one plus, per layer, the re-weighting that a new factor needs: measured
    with a new factor before every call."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(2, 4, latent, latent, device=device, dtype=dtype)
    context = torch.randn(2, 77, width, device=device, dtype=dtype)
    out = {}
    for config in configs:
        scheduled = config == "2 scheduled"  # as the step hook does between steps: a new factor on every layer
        with configured(pipe, "2 adapters" if scheduled else config), torch.no_grad():
            wrappers = [w for _, w in lora_modules(pipe.unet)] if scheduled else []
            _call(pipe, x, context, wrappers, 0)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for i in range(calls):
                    _call(pipe, x, context, wrappers, i + 1)
                torch.cuda.synchronize()
        out[config] = sum(e.self_device_time_total for e in prof.key_averages()) / calls / 1e6
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny SD1 pipeline of the tests (seconds)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per loop, after the first (3; quick 4)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds over all configurations (2; quick 3)")
    parser.add_argument("--latent", type=int, default=None, help="latent size (64 on a GPU, 32 on a CPU)")
    parser.add_argument("--rank", type=int, default=32, help="rank of adapter a; b has half")
    parser.add_argument("--device", default=None, help="cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (quick: 1, else torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    compile_help = ("torch.compile the UNet in every configuration (mode: default, reduce-overhead = CUDA graphs, "
                    "max-autotune-no-cudagraphs); runs base, 2 adapters, fused, scheduled and the peer")  # fmt: skip
    modes = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
    parser.add_argument("--compile", nargs="?", const="default", choices=modes, metavar="MODE", help=compile_help)
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    cut = argv.index("--results") if "--results" in argv else len(argv)
    args.shown = argv[:cut] + argv[cut + 2 :]  # the command that reproduces the result, wherever it was written
    steps = args.steps or (4 if args.quick else 3)
    rounds = args.rounds or (3 if args.quick else 2)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads or args.quick:
        # tiny layers gain nothing from more threads, and on a busy machine their barriers cost whole time slices
        torch.set_num_threads(args.threads or 1)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe, latent, width = build(args, device, dtype)
    flops = flop_ratios(pipe, latent, width, device, dtype)
    configs = CONFIGS
    if args.compile:  # every configuration's first step compiles (or recompiles) the graph: keep them all
        from torch._dynamo import config as dynamo

        dynamo.recompile_limit = dynamo.accumulated_recompile_limit = 1024
        pipe.unet, configs = torch.compile(pipe.unet, mode=args.compile), COMPILED
    times: dict[str, list[float]] = {c: [] for c in configs}
    firsts: dict[str, list[float]] = {c: [] for c in configs}
    per_round: dict[str, list[float]] = {c: [] for c in configs}
    for r in range(rounds):  # interleaved, in turn forwards and backwards: a slow spell favours no configuration
        for config in configs if r % 2 == 0 else configs[::-1]:
            with configured(pipe, config):
                warm, *rest = denoise(pipe, latent, width, steps + 1, args.seed + r, device, dtype)
            firsts[config].append(warm)
            times[config] += rest
            per_round[config].append(statistics.median(rest))
            print(f"round {r + 1}/{rounds} {config:>17}: first step {warm:.3f} s, then "
                  f"{', '.join(f'{t:.3f}' for t in rest)} s", flush=True)  # fmt: skip
    median = {c: statistics.median(ts) for c, ts in times.items()}
    first = {c: statistics.median(ts) for c, ts in firsts.items()}

    def paired(a: str, b: str) -> float:  # the median of the rounds' own ratios: the machine's drift cancels
        return statistics.median(x / y for x, y in zip(per_round[a], per_round[b], strict=True))

    ratios = {c: paired(c, "base") for c in configs}
    overhead = paired("2 scheduled", "2 adapters")
    gpu = kernel_times(pipe, latent, width, device, dtype, configs) if device.type == "cuda" else {}
    layers = None if device.type == "cuda" or args.compile else layer_cost(pipe, latent, width, device, dtype)
    routes = None if args.compile else route_costs(pipe, latent, width, device, dtype)
    for c in configs:
        print(
            f"{c:>17}: {median[c] * 1000:9.1f} ms/step  {ratios[c]:.3f}x base  (FLOPs {flops[c]:.3f}x; first step "
            f"{first[c] * 1000:.1f} ms" + (f"; GPU kernels {gpu[c] * 1000:.2f} ms" if gpu else "") + ")"
        )
    print(f"scheduling overhead (2 scheduled / 2 adapters): {overhead:.3f}x")
    peer = paired("2 adapters", "2 diffusers+peft")
    print(f"lora_kit / diffusers+peft, two adapters: {peer:.3f}x")
    if layers is not None:
        print(f"layer by layer: two unfused adapters add {layers * 1000:.1f} ms: {1 + layers / median['base']:.3f}x")
    for route, cost in (routes or {}).items():
        print(f"routes: {route:>22} adds {cost * 1000:.2f} ms per UNet call: {1 + cost / median['base']:.3f}x")
    figures = dict(median=median, ratios=ratios, overhead=overhead, peer=peer, first=first, flops=flops, gpu=gpu)
    figures["routes"] = routes
    write_results(args, steps, rounds, latent, device, dtype, figures, layers)
    return 0


def write_results(args, steps, rounds, latent, device, dtype, figures: dict, layers: float | None) -> None:
    median, ratios, overhead, peer = figures["median"], figures["ratios"], figures["overhead"], figures["peer"]
    first, flops, gpu = figures["first"], figures["flops"], figures["gpu"]
    commit = _results.commit()
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    model = "tiny SD1 UNet (tests/conftest.py)" if args.quick else "SD1.5-sized UNet (random weights)"
    command = " ".join(["python bench/inference.py", *args.shown])
    lines = [
        "## bench/inference.py"
        + (" (quick" if args.quick else f" ({device.type}, latents {latent}")
        + (f", torch.compile {args.compile})" if args.compile else ")"),
        "",
        f"`{command}` — {datetime.date.today()}, commit {commit}, {where}, torch {torch.__version__}, "
        f"seed {args.seed}",
        "",
        f"{model}, {str(dtype).removeprefix('torch.')}, latents {latent}x{latent}, CFG batch 2, DDIM; kohya-preset "
        f"adapters a (rank {4 if args.quick else args.rank}) and b (half); {steps} steps x {rounds} round(s) per "
        f"configuration after each loop's first step, rounds interleaved in alternating order; ms / step: the median "
        f"step, x base: the median over rounds of the round's ratio."
        + (
            f" The UNet compiled (torch.compile, mode {args.compile}) in every configuration; first step: with the "
            "compilation."
            if args.compile
            else ""
        ),  # fmt: skip
        "",
        *_results.table(
            ["configuration", "ms / step", "x base", "FLOPs x base", "first step (ms)"]
            + (["GPU kernels (ms)", "x base"] if gpu else []),
            [
                [c, f"{median[c] * 1000:.1f}", f"{ratios[c]:.3f}", f"{flops[c]:.3f}", f"{first[c] * 1000:.1f}"]
                + ([f"{gpu[c] * 1000:.2f}", f"{gpu[c] / gpu['base']:.3f}"] if gpu else [])
                for c in ratios
            ],
        ),
        "",
        f"Two unfused adapters: **{ratios['2 adapters']:.3f}x** the base step (target on a GPU: <= 1.05x); "
        f"scheduling overhead (2 scheduled / 2 unfused): **{overhead:.3f}x** (target <= 1.01x); two unfused "
        f"adapters / the same two in diffusers+peft: **{peer:.3f}x**.",
        "",
    ]
    if layers is not None:
        lines += [
            "Layer by layer (every wrapped layer on its own input, through the base layer and through the wrapper "
            "alternately, call by call: the machine's drift cancels), two unfused adapters add "
            f"**{layers * 1000:.1f} ms** to the {median['base'] * 1000:.1f} ms base step: "
            f"**{1 + layers / median['base']:.3f}x**.",
            "",
        ]
    if gpu:
        lines += [
            "GPU kernels: the device time of one guided UNet call's kernels (torch.profiler), what a step costs once "
            "nothing waits on the CPU; the scheduled row puts a new factor on every layer before each call. By that "
            f"measure two unfused adapters cost **{gpu['2 adapters'] / gpu['base']:.3f}x** the base and scheduling "
            f"**{gpu['2 scheduled'] / gpu['2 adapters']:.3f}x** two unfused adapters.",
            "",
        ]
    if figures["routes"]:
        lines += [
            "Routes of the unfused forward, layer by layer (every wrapped layer on its own input; each route and the "
            "base layer in turn, 4 calls back to back per timing"
            + (", until their kernels are done" if device.type == "cuda" else "")
            + "; the extra time summed over layers, per UNet call, and over the base step):",
            "",
            *_results.table(
                ["route", "adds (ms)", "x base step"],
                [[r, f"{c * 1000:.2f}", f"{1 + c / median['base']:.3f}"] for r, c in figures["routes"].items()],
            ),
            "",
        ]
    _results.write_section(args.results, lines)


if __name__ == "__main__":
    sys.exit(main())
