"""Benchmark: the peak GPU memory of LoRA training steps on the large architectures, with what lora-train offers to
fit them: an SDXL UNet at 1024 px and a FLUX.1-sized transformer at 1024 px, batch 1, bf16, from config with random
weights (lora_kit/assets/configs), lora_kit's adapters, gradient checkpointing, a quantized base (--quantize-base:
quantize.quantize_base before the adapters) and blocks streamed from the CPU (--offload-blocks:
offload_blocks.BlockOffload over the repeated blocks holding the most bytes).

Peak: the most CUDA memory allocated from the first training step to the last (the model built, quantized and its
offloaded blocks parked before it; lora-train quantizes on the CPU before the move, so the full-precision weights
never reach the GPU there); resident: what was allocated before the first step. Step: the median wall time of the
steps after the first.

    python bench/memory.py --arch sdxl                                  # SDXL UNet, 1024 px (target <= 8 GiB)
    python bench/memory.py --arch flux --quantize int8 --offload-blocks 32   # FLUX.1-sized (target <= 10 GiB)
    python bench/memory.py --quick --arch flux --quantize int8 --offload-blocks 1   # tiny, on the CPU (seconds)
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
from bench import _results  # noqa: E402
from bench.train import UNetBlocks, make_optimizer, sync  # noqa: E402
from lora_kit.inject import find_targets, inject_lora, lora_parameters  # noqa: E402

MAIN = {"sdxl": "unet", "flux": "transformer"}
TARGETS = {"sdxl": "attn", "flux": "dit"}  # (the diffusers examples' attention projections; FLUX: lora-train's dit)
TARGET_GIB = {"sdxl": 8, "flux": 10}  # issue 27's targets at 1024 px, batch 1


def build(args, device: torch.device, dtype: torch.dtype):
    """The UNet or transformer: the test suite's tiny one (--quick), else the real architecture from config with random
    weights, built straight on the device in `dtype` (no fp32 copy first)."""
    import diffusers

    torch.manual_seed(args.seed)
    if args.quick:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import build_pipeline

        with tempfile.TemporaryDirectory() as folder:
            model = getattr(build_pipeline(args.arch, folder), MAIN[args.arch])
        return model.to(device, dtype)
    cfg = json.loads((ROOT / "lora_kit" / "assets" / "configs" / f"{args.arch}.json").read_text())[MAIN[args.arch]]
    cls = getattr(diffusers, cfg.pop("class"))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(**cfg)
    finally:
        torch.set_default_dtype(default)


def inputs(model, args, device, dtype) -> dict:
    """One batch of the model's inputs at the resolution (random latents and text states of the right shapes)."""
    g = torch.Generator().manual_seed(args.seed)
    cfg = model.config

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    side = args.resolution // 8  # the VAE's latent side
    if args.arch == "sdxl":
        time_dim = cfg.addition_time_embed_dim  # (six size/crop ids, each embedded at this width)
        return {
            "sample": randn(args.batch, cfg.in_channels, side, side),
            "timestep": torch.randint(0, 1000, (args.batch,), generator=g).to(device),
            "encoder_hidden_states": randn(args.batch, 77, cfg.cross_attention_dim),
            "added_cond_kwargs": {
                "text_embeds": randn(args.batch, cfg.projection_class_embeddings_input_dim - 6 * time_dim),
                "time_ids": torch.tensor([[args.resolution, args.resolution, 0, 0, args.resolution, args.resolution]] *
                                         args.batch, device=device, dtype=dtype),
            },
        }  # fmt: skip
    tokens, text = (side // 2) ** 2, 512 if not args.quick else 8  # FLUX: 2x2 latent patches; T5's 512 tokens
    ids = torch.zeros(side // 2, side // 2, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side // 2)[:, None], torch.arange(side // 2)[None, :]
    return {
        "hidden_states": randn(args.batch, tokens, cfg.in_channels),
        "encoder_hidden_states": randn(args.batch, text, cfg.joint_attention_dim),
        "pooled_projections": randn(args.batch, cfg.pooled_projection_dim),
        "timestep": torch.rand(args.batch, generator=g).to(device, dtype),
        "img_ids": ids.reshape(tokens, 3).to(device, dtype),
        "txt_ids": torch.zeros(text, 3, device=device, dtype=dtype),
        **({"guidance": torch.full((args.batch,), 3.5, device=device, dtype=dtype)} if cfg.guidance_embeds else {}),
    }


def step(model, optimizer, batch: dict, device) -> float:
    sync(device)
    start = time.perf_counter()
    out = model(**batch).sample
    main_input = batch["sample" if "sample" in batch else "hidden_states"]
    torch.nn.functional.mse_loss(out.float(), main_input.float()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=tuple(MAIN), required=True)
    parser.add_argument("--quick", action="store_true", help="the tiny model of the test suite (seconds)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (1024; quick 32)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="steps after the first")
    parser.add_argument("--quantize", default="none", help="none | fp8 | int8 | nf4 (lora-train --quantize-base)")
    parser.add_argument("--offload-blocks", type=int, default=0, help="blocks streamed (lora-train --offload-blocks)")
    parser.add_argument("--no-gradient-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--device", default=None, help="cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = _results.parse(parser, argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if not gpu and not args.quick:
        parser.error("the full-size models are for a GPU; on the CPU use --quick")
    args.resolution = args.resolution or (32 if args.quick else 1024)
    dtype = torch.bfloat16 if gpu else torch.float32
    notes = []
    model = build(args, device, dtype).requires_grad_(False).train()
    if args.quantize != "none":
        from lora_kit.quantize import quantize_base

        notes.append(f"{quantize_base(model, args.quantize)} linear layers {args.quantize}")
    paths = find_targets(model, TARGETS[args.arch])
    inject_lora(model, paths=paths, rank=args.rank, alpha=args.rank)
    params = list(lora_parameters(model))
    for p in params:
        p.data = p.data.float()  # (the adapters train in fp32 over the bf16 base)
    notes.append(f"rank-{args.rank} adapters on {len(paths)} layers of `{TARGETS[args.arch]}`")
    if args.checkpointing:
        model.enable_gradient_checkpointing()
        notes.append("gradient checkpointing")
    with contextlib.ExitStack() as stack:
        if args.offload_blocks:
            from lora_kit.train import offload_blocks

            blocks = offload_blocks.offloadable(UNetBlocks(model))
            offload = offload_blocks.BlockOffload(offload_blocks.choose(blocks, args.offload_blocks), device)
            stack.callback(offload.close)
            notes.append(f"{args.offload_blocks} of {len(blocks)} repeated blocks streamed")
        optimizer = make_optimizer(params)
        batch = inputs(model, args, device, dtype)
        resident = torch.cuda.memory_allocated(device) if gpu else 0
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        first = step(model, optimizer, batch, device)
        times = [step(model, optimizer, batch, device) for _ in range(args.steps)]
        peak = torch.cuda.max_memory_allocated(device) if gpu else 0
    median = statistics.median(times) if times else first
    gib = 2**30
    where = torch.cuda.get_device_name(device) if gpu else f"{platform.machine()}, {torch.get_num_threads()} threads"
    figure = f"peak {peak / gib:.2f} GiB (resident before {resident / gib:.2f} GiB)" if gpu else "peak - (CPU)"
    print(f"{args.arch} {args.resolution} px, batch {args.batch}: {figure}; step {median:.2f} s, first {first:.2f} s; "
          + "; ".join(notes))  # fmt: skip
    model_name = "tiny test-suite" if args.quick else f"{args.arch.upper()}-sized (config, random weights)"
    lines = [
        f"## bench/memory.py ({args.arch}{', quick' if args.quick else ''}, {device.type}"
        + (f", {args.quantize}" if args.quantize != "none" else "")
        + (f", {args.offload_blocks} blocks offloaded)" if args.offload_blocks else ")"),
        "",
        f"`{' '.join(['python bench/memory.py', *args.shown])}` — {datetime.date.today()}, commit "
        f"{_results.commit()}, {where}, torch {torch.__version__}",
        "",
        f"{model_name} {MAIN[args.arch]}, base {str(dtype).removeprefix('torch.')}, {args.resolution} px, batch "
        f"{args.batch}; " + "; ".join(notes) + f"; {args.steps} steps after the first.",
        "",
        *_results.table(
            ["peak (GiB)", "resident before (GiB)", "step (s)", "first step (s)", "target"],
            [
                [
                    f"{peak / gib:.2f}" if gpu else "-",
                    f"{resident / gib:.2f}" if gpu else "-",
                    f"{median:.2f}",
                    f"{first:.2f}",
                    f"<= {TARGET_GIB[args.arch]} GiB at 1024 px",
                ]
            ],
        ),  # fmt: skip
        "",
    ]
    _results.write_section(args.results, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
