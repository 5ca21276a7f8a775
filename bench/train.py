"""Benchmark: one LoRA training step (UNet forward, backward, AdamW step) with lora_kit's adapters against the same
adapters as peft layers, the way diffusers' train_text_to_image_lora.py adds them (the peer), in one run.

Both put rank-r adapters (alpha = r) on the same layers of the same UNet (the `attn` preset: to_q, to_k, to_v,
to_out.0, what diffusers' example targets; `--targets kohya` for kohya's default), train them in fp32 on a frozen
base (fp32 on a CPU; on a GPU a bf16 base under bf16 autocast, as the diffusers example with --mixed_precision bf16),
on the same noisy latents, timesteps and text states, with the same epsilon MSE loss. Each configuration trains
its own copy of the UNet, and they take steps in turn, in alternating order; the ratio is the median of the pairs'
ratios (a VM whose speed drifts favours neither). Memory: what autograd saves for the backward pass during one
forward (every saved tensor's storage counted once: the activations a training step holds, the figure that grows
with batch and resolution), the trainable parameters with their gradients and AdamW state, and on a GPU how far a
step's allocated memory rises above what was resident before it.
`--gradient-checkpointing` runs both with the UNet's gradient checkpointing.

    python bench/train.py              # SD1.5-sized UNet from config (random weights), rank 16; latents 32x32,
                                       # batch 1 on a CPU; latents 64x64, batch 4 on a GPU
    python bench/train.py --quick      # the tiny SD1 UNet of the test suite (seconds)
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

CONFIGS = ["lora_kit", "diffusers+peft"]


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


def saved_bytes(unet, batch: dict, device, autocast: bool) -> int:
    """The bytes autograd keeps for the backward pass of one forward, every storage counted once."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(unet, batch, device, autocast)
    del loss
    return sum(storages.values())


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(unet, optimizer, batch: dict, device, autocast: bool) -> float:
    """One training step; its wall time."""
    sync(device)
    start = time.perf_counter()
    loss_of(unet, batch, device, autocast).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def step_peak(unet, optimizer, batch: dict, device, autocast: bool) -> int:
    """On a GPU, how far one training step's allocated memory rises above what was resident before it."""
    if device.type != "cuda":
        return 0
    sync(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    timed_step(unet, optimizer, batch, device, autocast)
    return torch.cuda.max_memory_allocated(device) - resident


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny SD1 UNet of the test suite (seconds)")
    parser.add_argument("--steps", type=int, default=None, help="timed pairs of steps, after a warm-up (6; quick 8)")
    parser.add_argument("--latent", type=int, default=None, help="latent size (64 on a GPU, 32 on a CPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (4 on a GPU, 1 on a CPU)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="attn", help="lora_kit target preset: attn (the default) or kohya")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default=None, help="cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    cut = argv.index("--results") if "--results" in argv else len(argv)
    args.shown = argv[:cut] + argv[cut + 2 :]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    args.steps = args.steps or (8 if args.quick else 6)
    args.batch = args.batch or (4 if gpu else 1)
    dtype = torch.bfloat16 if gpu else torch.float32  # the frozen base; the adapters train in fp32 either way
    unet = build_unet(args, device, dtype)
    args.latent_size = unet.config.sample_size if args.quick else (args.latent or (64 if gpu else 32))
    rank = 4 if args.quick else args.rank
    paths = find_targets(unet, args.targets)
    unets = {"lora_kit": unet, "diffusers+peft": copy.deepcopy(unet)}  # each configuration on its own copy
    batch = inputs(unet, args, device, dtype, args.seed)
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    with contextlib.ExitStack() as stack:
        params = {c: stack.enter_context(adapted(unets[c], c, paths, rank)) for c in CONFIGS}
        optimizers = {c: torch.optim.AdamW(params[c], lr=1e-4) for c in CONFIGS}
        memory = {}
        for c in CONFIGS:  # (the first step, a warm-up, also gives the GPU's figure)
            state = sum(p.numel() * p.element_size() for p in params[c]) * 4  # weights, gradients, AdamW's two
            peak = step_peak(unets[c], optimizers[c], batch, device, gpu)
            memory[c] = {"saved": saved_bytes(unets[c], batch, device, gpu), "state": state, "peak": peak}
        for i in range(args.steps):  # step by step in turn, in alternating order: the machine's drift cancels
            for c in CONFIGS if i % 2 == 0 else CONFIGS[::-1]:
                times[c].append(timed_step(unets[c], optimizers[c], batch, device, gpu))
            print(f"pair {i + 1}/{args.steps}: " + ", ".join(f"{c} {times[c][-1]:.3f} s" for c in CONFIGS), flush=True)
    median = {c: statistics.median(ts) for c, ts in times.items()}
    ratio = statistics.median(a / b for a, b in zip(times["lora_kit"], times["diffusers+peft"], strict=True))
    for c in CONFIGS:
        m = memory[c]
        peak = f"; step peak {m['peak'] / 2**20:.0f} MiB" if gpu else ""
        print(f"{c:>14}: {median[c] * 1000:9.1f} ms/step; saved for backward {m['saved'] / 2**20:.1f} MiB; "
              f"adapter state {m['state'] / 2**20:.1f} MiB{peak}")  # fmt: skip
    print(f"lora_kit / diffusers+peft: {ratio:.3f}x per training step")
    write_results(args, device, dtype, rank, len(paths), median, ratio, memory)
    return 0


def write_results(args, device, dtype, rank, layers, median, ratio, memory) -> None:
    gpu = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if gpu else f"{platform.machine()}, {torch.get_num_threads()} threads"
    model = "tiny SD1 UNet (tests/conftest.py)" if args.quick else "SD1.5-sized UNet (random weights)"
    mib = 2**20
    lines = [
        f"## bench/train.py ({'quick' if args.quick else device.type}"
        + (", gradient checkpointing)" if args.gradient_checkpointing else ")"),
        "",
        f"`{' '.join(['python bench/train.py', *args.shown])}` — {datetime.date.today()}, commit "
        f"{_results.commit()}, {where}, torch {torch.__version__}, seed {args.seed}",
        "",
        f"{model}, base {str(dtype).removeprefix('torch.')}"
        + (" under bf16 autocast" if gpu else "")
        + f", latents {args.latent_size}x{args.latent_size}, batch {args.batch}; rank-{rank} adapters (alpha = rank) "
        f"on the {layers} layers of the `{args.targets}` preset, trained in fp32 with AdamW; each configuration on "
        f"its own copy of the UNet, {args.steps} steps each after a warm-up step, taken in turn in alternating order. "
        "Saved for backward: what autograd keeps from one forward (each storage once); adapter state: "
        "weights, gradients and AdamW's two moments"
        + ("; step peak: how far a step's allocated memory rises above what was resident before it." if gpu else "."),
        "",
        *_results.table(
            ["configuration", "ms / step", "saved for backward (MiB)", "adapter state (MiB)"]
            + (["step peak (MiB)"] if gpu else []),
            [
                [c, f"{median[c] * 1000:.1f}", f"{memory[c]['saved'] / mib:.1f}", f"{memory[c]['state'] / mib:.1f}"]
                + ([f"{memory[c]['peak'] / mib:.0f}"] if gpu else [])
                for c in CONFIGS
            ],
        ),
        "",
        f"lora_kit / diffusers+peft: **{ratio:.3f}x** per training step (the median of the pairs' "
        f"ratios); saved for backward **{memory['lora_kit']['saved'] / memory['diffusers+peft']['saved']:.3f}x**.",
        "",
    ]
    _results.write_section(args.results, lines)


if __name__ == "__main__":
    sys.exit(main())
