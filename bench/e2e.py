"""Benchmark: whole training runs, `lora-train` against a peer written the way diffusers' train_dreambooth_lora.py
trains (bench/peer_dreambooth.py: VAE and text encoder every step, peft adapters, no cache), in one run.

Each run is its own process, timed from start to exit: imports, model loading, data, VAE and text encoders (lora_kit:
its latent and text caches), the steps, the optimizer, writing the file. Both train rank-r adapters (alpha = r,
gaussian initial factors) on the UNet's attention projections (lora-train `--targets attn`, the script's to_q/to_k/
to_v/to_out.0) on the same images and captions, at the same resolution, batch, steps, learning rate, weight decay
(0.01) and clipping (1.0), with AdamW (lora_kit: its fused AdamW; the peer: torch.optim.AdamW, as the script).
Runs go in pairs in alternating order; the ratio is the median of the pairs' ratios. Images per second: steps x batch
over the whole process's wall time. Peak memory: the process's peak resident set (CPU), or its peak CUDA allocation.

    python bench/e2e.py                # the toy-world base (lora_kit/assets/toyworld/model), 64 px, batch 4, rank 8,
                                       # 300 steps (CPU); on a GPU an SD1.5-sized pipeline from config (random
                                       # weights), 512 px, batch 4, bf16 mixed precision, 150 steps
    python bench/e2e.py --quick        # the toy base, 4 steps of batch 2 (seconds)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import _results  # noqa: E402

CONFIGS = ["lora_kit", "diffusers example"]
TOY = ROOT / "lora_kit" / "assets" / "toyworld" / "model"


def instance_data(folder: Path, count: int, resolution: int) -> Path:
    """`count` captioned toy-world pictures of the held-out subject, scaled to the resolution (the same files for both
    trainers)."""
    sys.path.insert(0, str(ROOT / "datasets" / "toyworld"))
    import generate
    from PIL import Image

    generate.write(folder, "subject", count, seed=7)
    (folder / "labels.jsonl").unlink()
    if resolution != generate.SIZE:
        for path in folder.glob("*.png"):
            Image.open(path).resize((resolution, resolution), Image.NEAREST).save(path)
    return folder


def sd15_pipeline(folder: Path) -> Path:
    """An SD1.5-sized pipeline from config, random weights (lora_kit's sd1.json UNet and text encoder, SD's VAE), the
    toy base's tokenizer (CLIP's vocabulary) at 77 tokens, saved as a diffusers folder."""
    import diffusers
    import torch
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    configs = json.loads((ROOT / "lora_kit" / "assets" / "configs" / "sd1.json").read_text())
    unet_cfg, te_cfg = ({k: v for k, v in configs[c].items() if k != "class"} for c in ("unet", "text_encoder"))
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(TOY, subfolder="tokenizer", model_max_length=77)
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                    down_block_types=("DownEncoderBlock2D",) * 4,
                                    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512),
        text_encoder=CLIPTextModel(CLIPTextConfig(**te_cfg)), tokenizer=tokenizer,
        unet=diffusers.UNet2DConditionModel(**unet_cfg),
        scheduler=diffusers.DDPMScheduler.from_pretrained(TOY, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def commands(args, model: Path, data: Path, work: Path, run: int) -> dict[str, list[str]]:
    """Each configuration's command line for run number `run` (its own output)."""
    common = ["--resolution", str(args.resolution), "--batch-size", str(args.batch), "--steps", str(args.steps),
              "--rank", str(args.rank), "--lr", str(args.lr), "--seed", str(args.seed)]  # fmt: skip
    precision = ["--mixed-precision", args.mixed_precision]
    lora_kit = ["lora-train", "--model", str(model), "--data", str(data), "--mode", "lora", "--targets", "attn",
                "--init", "gaussian", "--no-buckets", "-o", str(work / f"lora_kit-{run}.safetensors"), "--force",
                *common, *precision, *shlex.split(args.lora_kit_flags)]  # fmt: skip
    peer = ["peer", "--model", str(model), "--data", str(data), "--output", str(work / f"peer-{run}"), *common,
            *precision]  # fmt: skip
    return {"lora_kit": lora_kit, "diffusers example": peer}


def timed(command: list[str], work: Path, threads: int = 0) -> dict:
    """Run one training process (this file in --child mode, on `threads` CPU threads: 0 = torch's default); its wall
    time, CPU time (user + system, all its threads), peak RSS and peak CUDA allocation."""
    peak_file = work / "peak.json"
    peak_file.unlink(missing_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))  # fmt: skip
    if threads:  # (torch reads OMP_NUM_THREADS for its intra-op pool)
        env["OMP_NUM_THREADS"] = str(threads)
    log = work / "run.log"
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, __file__, "--child", str(peak_file), *command], stdout=out,
                                   stderr=subprocess.STDOUT, env=env)  # fmt: skip
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:  # (interrupted: the run does not outlive the benchmark)
            process.kill()
            process.wait()
            raise
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{command[0]} failed (rc {process.returncode}):\n{log.read_text()[-3000:]}")
    cuda = json.loads(peak_file.read_text())["cuda"] if peak_file.exists() else 0
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss * 1024, "cuda": cuda}


def child(argv: list[str]) -> int:
    """Inside the timed process: run lora-train or the peer, then record the peak CUDA allocation."""
    import atexit

    import torch

    peak_file, which, rest = Path(argv[0]), argv[1], argv[2:]

    def record() -> None:
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else 0
        peak_file.write_text(json.dumps({"cuda": peak}))

    atexit.register(record)
    if which == "peer":
        sys.path.insert(0, str(ROOT / "bench"))
        import peer_dreambooth

        return peer_dreambooth.main(rest)
    try:
        from lora_kit.cli.train import main
    except ImportError:  # a checkout on the path, not installed: lora_kit.cli is the cli/ folder (pyproject)
        import importlib.util

        spec = importlib.util.spec_from_file_location("lora_kit.cli", ROOT / "cli" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "cli")])  # fmt: skip
        sys.modules["lora_kit.cli"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["lora_kit.cli"])
        from lora_kit.cli.train import main
    main(rest, standalone_mode=False)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the toy base, 4 steps of batch 2 (seconds)")
    parser.add_argument("--model", default=None, help="a diffusers SD 1.x folder (toy on a CPU; SD1.5-sized on a GPU)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (300 on a CPU, 150 on a GPU; quick 4)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (4; quick 2)")
    parser.add_argument("--resolution", type=int, default=None, help="64 with the toy base, else 512")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--images", type=int, default=10, help="training images")
    parser.add_argument("--pairs", type=int, default=None, help="pairs of runs, in alternating order (2; quick 1)")
    parser.add_argument("--mixed-precision", default=None, help="no | bf16 (bf16 on a GPU, no on a CPU)")
    parser.add_argument("--lora-kit-flags", default="", help="more lora-train flags (e.g. --compile), its row only")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of each run (0: torch's default)")
    parser.add_argument("--device", default=None, help="cuda when available, else cpu (for the defaults)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default=None, help="keep data, outputs and logs here")
    args = _results.parse(parser, argv)
    import torch

    gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    toy = args.quick or not gpu or args.model == "toy"
    args.steps = args.steps or (4 if args.quick else 150 if gpu else 300)
    args.batch = args.batch or (2 if args.quick else 4)
    args.resolution = args.resolution or (64 if toy else 512)
    args.pairs = args.pairs or (1 if args.quick else 2)
    args.mixed_precision = args.mixed_precision or ("bf16" if gpu else "no")
    rows: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.model and args.model != "toy":
            model, args.model_name = Path(args.model), args.model
        elif toy:
            model, args.model_name = TOY, "the toy-world base (lora_kit/assets/toyworld/model)"
        else:
            model = sd15_pipeline(work / "sd15")
            args.model_name = "an SD1.5-sized pipeline from config (random weights)"
        data = instance_data(work / "data", args.images, args.resolution)
        for i in range(args.pairs):
            for c in CONFIGS if i % 2 == 0 else CONFIGS[::-1]:
                rows[c].append(timed(commands(args, model, data, work, i)[c], work, args.threads))
                r = rows[c][-1]
                cuda = f", peak CUDA {r['cuda'] / 2**20:.0f} MiB" if gpu else ""
                print(f"run {i + 1}/{args.pairs} {c}: {r['wall']:.1f} s (CPU {r['cpu']:.1f} s), "
                      f"{args.steps * args.batch / r['wall']:.2f} images/s, peak RSS {r['rss'] / 2**20:.0f} MiB{cuda}",
                      flush=True)  # fmt: skip
    speed, cpu = (statistics.median(b[k] / a[k] for a, b in zip(*rows.values(), strict=True)) for k in ("wall", "cpu"))
    print(f"lora_kit / diffusers example: {speed:.2f}x the images per second, whole runs ({cpu:.2f}x by CPU time)")
    write_results(args, gpu, rows, speed, cpu)
    return 0


def write_results(args, gpu: bool, rows: dict, speed: float, cpu: float) -> None:
    import torch

    where = torch.cuda.get_device_name() if gpu else platform.machine()
    images = args.steps * args.batch
    mib = 2**20
    median = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in rows.items()}
    threads = f"{args.threads} CPU thread(s) per run" if args.threads else "torch's default CPU threads"
    extra = f" plus `{args.lora_kit_flags}`" if args.lora_kit_flags else ""
    lines = [
        f"## bench/e2e.py ({'quick' if args.quick else 'cuda' if gpu else 'cpu'})",
        "",
        f"`{' '.join(['python bench/e2e.py', *args.shown])}` — {datetime.date.today()}, commit {_results.commit()}, "
        f"{where}, torch {torch.__version__}, seed {args.seed}",
        "",
        f"Whole `lora-train` runs{extra} against bench/peer_dreambooth.py (the way diffusers' "
        "train_dreambooth_lora.py trains: VAE and text encoder every step, peft adapters, no cache) on "
        f"{args.model_name}: {args.images} images at {args.resolution} px, batch {args.batch}, {args.steps} "
        f"steps, rank {args.rank} on the attention projections, lr {args.lr}, mixed precision "
        f"{args.mixed_precision}, {threads}; {args.pairs} pair(s) of runs in alternating order, each a process "
        "timed from start to exit; the median run of each. CPU time: user + system of the process's threads (on a "
        "shared machine the steadier figure: time spent waiting for a core is not in it).",
        "",
        *_results.table(
            ["configuration", "whole run (s)", "images / s", "CPU time (s)", "peak RSS (MiB)"]
            + (["peak CUDA (MiB)"] if gpu else []),
            [
                [c, f"{m['wall']:.1f}", f"{images / m['wall']:.2f}", f"{m['cpu']:.1f}", f"{m['rss'] / mib:.0f}"]
                + ([f"{m['cuda'] / mib:.0f}"] if gpu else [])
                for c, m in median.items()
            ],
        ),
        "",
        f"lora_kit / diffusers example: **{speed:.2f}x** the images per second (the median of the pairs' ratios; "
        f"target {'>= 3x on a GPU' if gpu else '>= 1.5x on a CPU'}); by CPU time **{cpu:.2f}x**.",
        "",
    ]
    _results.write_section(args.results, lines)


if __name__ == "__main__":
    sys.exit(main())
