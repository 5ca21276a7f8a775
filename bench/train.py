"""Benchmark: one LoRA training step (UNet forward, backward, optimizer step) with lora_kit's adapters against the same
adapters as peft layers, the way diffusers' train_text_to_image_lora.py adds them (the peer), in one run; beside them
the frozen floor and lora_kit's compiled, quantized-base and offloaded steps.

Both put rank-r adapters (alpha = r) on the same layers of the same UNet (the `attn` preset: to_q, to_k, to_v,
to_out.0, what diffusers' example targets; `--targets kohya` for kohya's default), train them in fp32 on a frozen
base (fp32 on a CPU; on a GPU a bf16 base under bf16 autocast, as the diffusers example with --mixed_precision bf16),
on the same noisy latents, timesteps and text states, with the same epsilon MSE loss; lora_kit with the optimizer
lora-train makes (torch's fused AdamW where every tensor allows it: loop._fusable), the peer with the example's
torch.optim.AdamW. Rows:

- frozen floor: the UNet's forward and a backward from the loss to the input of the first layer the preset adapts
  (in module order), with no adapters and no optimizer: the least a training step of these adapters can cost (each
  adapter needs the gradient of its output, so the backward runs through every layer after the first adapted one);
- lora_kit, diffusers+peft: the pair the ratio compares;
- lora_kit --compile: lora-train --compile's regional compilation (Backbone.compile_blocks; inductor, also on the
  CPU); its compile (the first step's time beyond a step) is reported apart from its step time;
- lora_kit int8 base: lora-train --quantize-base int8 (quantize.quantize_base on the UNet's linear layers, then the
  adapters);
- lora_kit offloaded: lora-train --offload-blocks N (offload_blocks.BlockOffload: N repeated blocks streamed in for
  their forward and backward); a GPU row (on a CPU there is no device memory to save).

A row whose lora_kit feature is missing from this checkout is left out with a printed note. Each row trains its own
copy of the UNet (copies share the frozen weights), and they take steps in turn, in alternating order; each ratio is
the median of the pairs' ratios against diffusers+peft's step at the same turn (a VM whose speed drifts favours
neither). Memory: what autograd saves for the backward pass during one forward (every saved tensor's storage counted
once: the activations a training step holds, the figure that grows with batch and resolution), the trainable
parameters with their gradients and optimizer state, and on a GPU how far a step's allocated memory rises above what
was resident before it and the step's whole peak allocation. `--gradient-checkpointing` runs every row with the
UNet's gradient checkpointing.

    python bench/train.py              # SD1.5-sized UNet from config (random weights), rank 16; latents 32x32,
                                       # batch 1 on a CPU; latents 64x64, batch 4 on a GPU
    python bench/train.py --quick      # the tiny SD1 UNet of the test suite (seconds)
    python bench/train.py --rows lora_kit,diffusers+peft,compile   # some rows only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
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
from bench import _results  # noqa: E402
from lora_kit.inject import find_targets, inject_lora, lora_parameters, remove_lora  # noqa: E402
from lora_kit.train import backbone  # noqa: E402

CONFIGS = ["lora_kit", "diffusers+peft"]  # the pair every ratio refers to
ROWS = {  # --rows name -> the row's label
    "floor": "frozen floor",
    "lora_kit": "lora_kit",
    "diffusers+peft": "diffusers+peft",
    "compile": "lora_kit --compile",
    "int8": "lora_kit int8 base",
    "offload": "lora_kit offloaded",
}


def build_unet(args, device, dtype):
    import diffusers

    torch.manual_seed(args.seed)
    if args.quick:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import build_pipeline

        with tempfile.TemporaryDirectory() as folder:
            unet = build_pipeline("sd1", folder).unet
    else:
        cfg = json.loads((ROOT / "lora_kit" / "assets" / "configs" / "sd1.json").read_text())["unet"]
        cfg.pop("class")
        unet = diffusers.UNet2DConditionModel(**cfg)
    unet = (unet.to(device) if dtype == torch.float32 else unet.to(device, dtype)).requires_grad_(False).train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def sharing_copy(unet):
    """A copy of the module tree that shares the frozen parameters and buffers (wrapping or compiling the copy's
    modules leaves the original alone, and a row costs no second copy of the weights)."""
    memo = {id(t): t for t in [*unet.parameters(), *unet.buffers()]}
    return copy.deepcopy(unet, memo)


def make_optimizer(params):
    """The optimizer lora-train makes for its adapters (AdamW, fused where every tensor allows: loop._fusable)."""
    from lora_kit.train.loop import _fusable

    return torch.optim.AdamW(params, lr=1e-4, fused=_fusable(params))


@contextlib.contextmanager
def adapted(unet, config: str, paths: list[str], rank: int):
    """The UNet with fresh rank-`rank` adapters on `paths` for the block; yields their parameters (fp32)."""
    if config == "lora_kit":
        inject_lora(unet, paths=paths, rank=rank, alpha=rank)
        yield list(lora_parameters(unet))
        remove_lora(unet)
    else:  # what diffusers' train_text_to_image_lora.py does: unet.add_adapter, then the LoRA parameters in fp32
        from peft import LoraConfig

        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=paths)
        unet.add_adapter(config)
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        yield params
        unet.unload_lora()


class UNetBlocks(backbone.Backbone):
    """Backbone's block methods (compile_blocks, repeated_blocks: they read only `main`) over a bare UNet."""

    def __init__(self, unet):  # (no pipeline: the rest of Backbone is not used here)
        self.main = unet


class Row:
    """One configuration: its UNet, trainable tensors and optimizer (None for the frozen floor), and what it noted."""

    def __init__(self, name: str, unet, params: list, optimizer, note: str = ""):
        self.name, self.unet, self.params, self.optimizer, self.note = name, unet, params, optimizer, note
        self.times: list[float] = []
        self.first = 0.0  # the first step's time (compilation included)
        self.memory: dict[str, int | None] = {}


def build_rows(args, unet, paths, rank, device, stack: contextlib.ExitStack) -> tuple[dict[str, Row], list[str]]:
    """The rows asked for that this checkout can run, and a note for each left out."""
    rows, notes = {}, []
    for key in args.rows:
        name = ROWS[key]
        if key == "floor":  # the first adapted layer's input requires grad, so the backward stops there
            floor = sharing_copy(unet)
            hook = lambda _, args: (args[0].detach().requires_grad_(), *args[1:])  # noqa: E731
            floor.get_submodule(paths[0]).register_forward_pre_hook(hook)
            rows[name] = Row(name, floor, [], None)
            continue
        if key == "offload" and device.type != "cuda":
            notes.append(f"{name}: left out on the CPU (offloading moves blocks off a GPU; nothing to save here)")
            continue
        copy_ = sharing_copy(unet)
        note = ""
        if key == "int8":
            try:
                from lora_kit.quantize import quantize_base
            except ImportError as e:
                notes.append(f"{name}: left out, lora_kit.quantize is missing from this checkout ({e})")
                continue
            note = f"{quantize_base(copy_, 'int8')} linear layers int8"
        params = stack.enter_context(adapted(copy_, "diffusers+peft" if key == "diffusers+peft" else "lora_kit",
                                             paths, rank))  # fmt: skip
        optimizer = torch.optim.AdamW(params, lr=1e-4) if key == "diffusers+peft" else make_optimizer(params)
        if key == "compile":
            options = backbone.COMPILE_OPTIONS
            backbone.COMPILE_OPTIONS = {**options, "backend": args.compile_backend}
            try:
                note = f"{len(UNetBlocks(copy_).compile_blocks())} blocks compiled ({args.compile_backend})"
            finally:
                backbone.COMPILE_OPTIONS = options
        if key == "offload":
            try:
                from lora_kit.train import offload_blocks
            except ImportError as e:
                notes.append(f"{name}: left out, lora_kit.train.offload_blocks is missing from this checkout ({e})")
                continue
            blocks = offload_blocks.offloadable(UNetBlocks(copy_))
            n = args.offload_blocks or len(blocks) // 2
            offload = offload_blocks.BlockOffload(offload_blocks.choose(blocks, n), device)
            stack.callback(offload.close)
            note = f"{n} of {len(blocks)} repeated blocks streamed"
        rows[name] = Row(name, copy_, params, optimizer, note)
    return rows, notes


def inputs(unet, args, device, dtype, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    size, width = args.latent_size, unet.config.cross_attention_dim
    return {
        "latents": torch.randn(args.batch, 4, size, size, generator=g).to(device, dtype),
        "noise": torch.randn(args.batch, 4, size, size, generator=g).to(device, dtype),
        "timesteps": torch.randint(0, 1000, (args.batch,), generator=g).to(device),
        "context": torch.randn(args.batch, 77, width, generator=g).to(device, dtype),
    }


def loss_of(unet, batch: dict, device, autocast: bool) -> torch.Tensor:
    noisy = batch["latents"] + batch["noise"]  # (the schedule's mixing does not change the step's cost)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        pred = unet(noisy, batch["timesteps"], batch["context"]).sample
    return torch.nn.functional.mse_loss(pred.float(), batch["noise"].float())


def saved_bytes(row: Row, batch: dict, device, autocast: bool) -> int:
    """The bytes autograd keeps for the backward pass of one forward, every storage counted once."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(row.unet, batch, device, autocast)
    del loss
    return sum(storages.values())


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # --clock: cpu, the process's CPU time (all threads)


def timed_step(row: Row, batch: dict, device, autocast: bool, clock=time.perf_counter) -> float:
    """One training step (the floor: forward and backward only); its time by `clock`."""
    sync(device)
    start = clock()
    loss_of(row.unet, batch, device, autocast).backward()
    if row.optimizer is not None:
        row.optimizer.step()
        row.optimizer.zero_grad(set_to_none=True)
    sync(device)
    return clock() - start


def first_step(row: Row, batch: dict, device, autocast: bool, clock=time.perf_counter) -> dict[str, int | None]:
    """The warm-up step (compilation, for the compiled row); on a GPU, how far its allocated memory rises above what
    was resident before it (step) and its whole peak allocation (peak)."""
    gpu = device.type == "cuda"
    if gpu:
        sync(device)
        resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    row.first = timed_step(row, batch, device, autocast, clock)
    if not gpu:
        return {"step": None, "peak": None}
    peak = torch.cuda.max_memory_allocated(device)
    return {"step": peak - resident, "peak": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny SD1 UNet of the test suite (seconds)")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds of steps, after a warm-up (6; quick 8)")
    parser.add_argument("--latent", type=int, default=None, help="latent size (64 on a GPU, 32 on a CPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (4 on a GPU, 1 on a CPU)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="attn", help="lora_kit target preset: attn (the default) or kohya")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"rows to run, of {', '.join(ROWS)} (all)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled row")
    parser.add_argument("--offload-blocks", type=int, default=0, help="blocks the offloaded row streams (half)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--tag", default="", help="a word for the results heading (a section of its own)")
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall, or cpu: the process's CPU time, steadier on a shared machine (use --threads 1)",
    )
    parser.add_argument("--device", default=None, help="cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = _results.parse(parser, argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown or not set(CONFIGS) <= set(args.rows):
        parser.error(f"--rows: {', '.join(unknown) or 'lora_kit and diffusers+peft are needed'} (of {list(ROWS)})")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    args.steps = args.steps or (8 if args.quick else 6)
    args.batch = args.batch or (4 if gpu else 1)
    dtype = torch.bfloat16 if gpu else torch.float32  # the frozen base; the adapters train in fp32 either way
    unet = build_unet(args, device, dtype)
    args.latent_size = unet.config.sample_size if args.quick else (args.latent or (64 if gpu else 32))
    rank = 4 if args.quick else args.rank
    paths = find_targets(unet, args.targets)
    batch = inputs(unet, args, device, dtype, args.seed)
    with contextlib.ExitStack() as stack:
        rows, notes = build_rows(args, unet, paths, rank, device, stack)
        for note in notes:
            print(note, flush=True)
        order = list(rows.values())
        for row in order:  # (the first step, a warm-up, also gives the GPU's figures and the compile time)
            state = sum(p.numel() * p.element_size() for p in row.params) * 4  # weights, gradients, two moments
            row.memory = {**first_step(row, batch, device, gpu, clock), "state": state}
            compiled = row.name == ROWS["compile"] or row.name == ROWS["offload"]  # (their saved tensors: not hooked)
            row.memory["saved"] = None if compiled else saved_bytes(row, batch, device, gpu)
        for i in range(args.steps):  # step by step in turn, in alternating order: the machine's drift cancels
            for row in order if i % 2 == 0 else order[::-1]:
                row.times.append(timed_step(row, batch, device, gpu, clock))
            print(f"round {i + 1}/{args.steps}: " + ", ".join(f"{r.name} {r.times[-1]:.3f} s" for r in order),
                  flush=True)  # fmt: skip
    peer = rows["diffusers+peft"].times
    ratio = {r.name: statistics.median(a / b for a, b in zip(r.times, peer, strict=True)) for r in order}
    median = {r.name: statistics.median(r.times) for r in order}
    for r in order:
        m, mib = r.memory, 2**20
        saved = "-" if m["saved"] is None else f"{m['saved'] / mib:.1f} MiB"
        peak = f"; step peak {m['step'] / mib:.0f} MiB, peak {m['peak'] / mib:.0f} MiB" if gpu else ""
        extra = f"; first step {r.first:.2f} s" + (f" ({r.note})" if r.note else "")
        print(f"{r.name:>20}: {median[r.name] * 1000:9.1f} ms/step, {ratio[r.name]:.3f}x diffusers+peft; saved for "
              f"backward {saved}; adapter state {m['state'] / mib:.1f} MiB{peak}{extra}")  # fmt: skip
    print(f"lora_kit / diffusers+peft: {ratio['lora_kit']:.3f}x per training step")
    write_results(args, device, dtype, rank, len(paths), order, median, ratio, notes)
    return 0


def write_results(args, device, dtype, rank, layers, rows, median, ratio, notes) -> None:
    gpu = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if gpu else f"{platform.machine()}, {torch.get_num_threads()} threads"
    model = "tiny SD1 UNet (tests/conftest.py)" if args.quick else "SD1.5-sized UNet (random weights)"
    mib = 2**20

    def cells(r) -> list[str]:
        m = r.memory
        compile_s = r.first - median[r.name] if r.name == ROWS["compile"] else None
        return [
            r.name, f"{median[r.name] * 1000:.1f}", f"{ratio[r.name]:.3f}",
            "-" if m["saved"] is None else f"{m['saved'] / mib:.1f}", f"{m['state'] / mib:.1f}",
        ] + ([f"{m['step'] / mib:.0f}", f"{m['peak'] / mib:.0f}"] if gpu else []) + [
            "-" if compile_s is None else f"{compile_s:.1f}", r.note or "-",
        ]  # fmt: skip

    saved = {c: ROWS[c] for c in CONFIGS}
    lines = [
        f"## bench/train.py ({'quick' if args.quick else device.type}"
        + (", gradient checkpointing" if args.gradient_checkpointing else "")
        + (f", {args.tag})" if args.tag else ")"),
        "",
        f"`{' '.join(['python bench/train.py', *args.shown])}` — {datetime.date.today()}, commit "
        f"{_results.commit()}, {where}, torch {torch.__version__}, seed {args.seed}",
        "",
        f"{model}, base {str(dtype).removeprefix('torch.')}"
        + (" under bf16 autocast" if gpu else "")
        + f", latents {args.latent_size}x{args.latent_size}, batch {args.batch}; rank-{rank} adapters (alpha = rank) "
        f"on the {layers} layers of the `{args.targets}` preset, trained in fp32 (lora_kit: lora-train's fused AdamW; "
        "the peer: torch.optim.AdamW); each row on its own copy of the UNet, "
        f"{args.steps} steps each after a warm-up step, taken in turn in alternating order, timed by "
        + ("wall clock" if args.clock == "wall" else "the process's CPU time (time waiting for a core left out)")
        + "; x peer: the median of the "
        "rounds' ratios to diffusers+peft's step. Saved for backward: what autograd keeps from one forward (each "
        "storage once; - where compiled or streamed blocks hide it); adapter state: weights, gradients and two "
        "optimizer moments"
        + (
            "; step peak: how far a step's allocated memory rises above what was resident before it; peak: the step's "
            "whole allocation"
            if gpu
            else ""
        )
        + "; compile: the first step's time beyond a step (s).",
        "",
        *_results.table(
            ["configuration", "ms / step", "x peer", "saved for backward (MiB)", "adapter state (MiB)"]
            + (["step peak (MiB)", "peak (MiB)"] if gpu else [])
            + ["compile (s)", "note"],
            [cells(r) for r in rows],
        ),
        "",
        *[f"Left out: {note}." for note in notes],
        *([""] if notes else []),
        f"lora_kit / diffusers+peft: **{ratio['lora_kit']:.3f}x** per training step (the median of the pairs' "
        f"ratios); saved for backward **"
        f"{rows_memory(rows, saved['lora_kit']) / rows_memory(rows, saved['diffusers+peft']):.3f}x**"
        + "".join(f"; {r.name}: **{ratio[r.name]:.3f}x**" for r in rows if r.name not in saved.values())
        + ".",
        "",
    ]
    _results.write_section(args.results, lines)


def rows_memory(rows, name: str) -> int:
    return next(r.memory["saved"] for r in rows if r.name == name)


if __name__ == "__main__":
    sys.exit(main())
