"""Benchmark: lora-extract's SVD against the classic algorithm (a full SVD per module), on SD1.5-sized weights.

The classic algorithm (kohya extract_lora_from_models, cloneofsimo cli_svd) is written here from its formula:
U, S, Vh = svd(W_tuned - W_base); up = U[:, :r] diag(S[:r]); down = Vh[:r]. lora_kit uses a randomized range
finder (functional.factorize_fast). Both run on the same matrices in one process; the script prints per-shape and
total times, the speed ratio and the error ratio, and writes the table to bench/RESULTS.md.

    python bench/extract.py            # SD1.5 layer shapes, rank 32
    python bench/extract.py --quick    # small shapes, seconds (what the test suite runs)
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _results  # noqa: E402
from lora_kit import functional  # noqa: E402

# (out, in, kernel, how many such layers SD1.5's UNet has): attention, cross-attention k/v, GEGLU ff, 3x3 resnet convs
SD15_SHAPES = [
    (320, 320, 1, 10), (640, 640, 1, 10), (1280, 1280, 1, 12), (320, 768, 1, 4), (1280, 768, 1, 6),
    (2560, 320, 1, 5), (320, 1280, 1, 5), (10240, 1280, 1, 5), (1280, 5120, 1, 5),
    (320, 320, 3, 8), (640, 640, 3, 8), (1280, 1280, 3, 10),
]  # fmt: skip
QUICK_SHAPES = [(64, 64, 1, 2), (128, 96, 1, 2), (32, 32, 3, 2)]


def decaying_delta(out: int, inp: int, k: int, seed: int, decay: float = 0.04) -> torch.Tensor:
    """A fine-tuning-like weight difference: singular values decaying exponentially from 1, plus a noise floor."""
    g = torch.Generator().manual_seed(seed)
    cols = inp * k * k
    n = min(out, cols)
    u, _ = torch.linalg.qr(torch.randn(out, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, n, generator=g))
    s = torch.exp(-decay * torch.arange(n, dtype=torch.float32)) + 1e-3
    d = (u * s) @ v.T
    return d.reshape(out, inp, k, k) if k > 1 else d


def classic(delta: torch.Tensor, rank: int):
    m = delta.reshape(delta.shape[0], -1).float()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def relative_error(delta: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    m = delta.reshape(delta.shape[0], -1).float()
    return float((m - up.reshape(m.shape[0], -1) @ down.reshape(up.shape[1], -1)).norm() / m.norm())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    shapes = QUICK_SHAPES if args.quick else SD15_SHAPES
    rank = min(args.rank, 8) if args.quick else args.rank
    rows = []
    t_classic = t_ours = e_classic = e_ours = 0.0
    for i, (out, inp, k, count) in enumerate(shapes):
        d = decaying_delta(out, inp, k, args.seed + i)
        t0 = time.perf_counter()
        up_c, down_c = classic(d, rank)
        t1 = time.perf_counter()
        up_o, down_o = functional.factorize_fast(d, rank)
        t2 = time.perf_counter()
        ec, eo = relative_error(d, up_c, down_c), relative_error(d, up_o, down_o)
        # weight each shape by how many layers of it the UNet has
        t_classic, t_ours = t_classic + (t1 - t0) * count, t_ours + (t2 - t1) * count
        e_classic, e_ours = e_classic + ec * count, e_ours + eo * count
        rows.append((f"{out}x{inp}" + (f"x{k}x{k}" if k > 1 else ""), count, t1 - t0, t2 - t1, ec, eo))
        print(f"{rows[-1][0]:>16} x{count:<3} full SVD {t1 - t0:7.3f}s  lora_kit {t2 - t1:7.3f}s  "
              f"error {ec:.5f} vs {eo:.5f}", flush=True)  # fmt: skip
    speed, err_ratio = t_classic / t_ours, e_ours / e_classic
    print(f"total (per-layer counts): full SVD {t_classic:.1f}s, lora_kit {t_ours:.1f}s -> {speed:.1f}x faster, "
          f"error ratio {err_ratio:.4f}")  # fmt: skip
    write_results(args, rank, rows, speed, err_ratio, t_classic, t_ours)
    return 0


def write_results(args, rank, rows, speed, err_ratio, t_classic, t_ours) -> None:
    commit = _results.commit()
    lines = [
        "## bench/extract.py" + (" (quick)" if args.quick else ""),
        "",
        f"`python bench/extract.py{' --quick' if args.quick else ''} --rank {args.rank} --seed {args.seed}` — "
        f"{datetime.date.today()}, commit {commit}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "",
        *_results.table(
            ["shape", "layers", "full SVD (s)", "lora_kit (s)", "error full", "error lora_kit"],
            [[s, str(c), f"{a:.3f}", f"{b:.3f}", f"{e1:.5f}", f"{e2:.5f}"] for s, c, a, b, e1, e2 in rows],
        ),
        "",
        f"Rank {rank}. Whole UNet (layer counts applied): full SVD {t_classic:.1f} s, lora_kit {t_ours:.1f} s: "
        f"**{speed:.1f}x faster**, error ratio **{err_ratio:.4f}** (target: >= 5x at <= 1.01x).",
        "",
    ]
    _results.write_section(args.results, lines)


if __name__ == "__main__":
    sys.exit(main())
