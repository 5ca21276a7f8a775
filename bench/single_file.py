"""Benchmark: peak memory of opening and writing a single-file checkpoint, against the file's size.

An SD1.5-sized pipeline is built from lora_kit's shipped SD1.5 configs (random fp16 weights: 1.07 billion
parameters, a 2.1 GB file) and written as an A1111 checkpoint. Each measurement then runs in a fresh process and reads
its peak resident memory (VmHWM, reset after imports) above what it held after imports:

- open: `lora_kit.open_pipeline(file, dtype=fp16)` (diffusers' from_single_file with the shipped configs, realigned);
- diffusers: `StableDiffusionPipeline.from_single_file(file, config=<the same configs>)` alone, the peer (its weights
  stay on a memory map of the file, read from disk when first used; `diffusers-read` reads each once, as a first
  denoising step would);
- merge: `lora-merge file lora -o out.safetensors` (open, collapse a rank-16 UNet LoRA, stream the file back out);
- copy: `safetensors.torch.load_file` then a renamed dict of the tensors, as a naive converter does (for scale).

The target (issue 25): at most one copy of the weights plus one tensor in flight, i.e. a ratio near 1.0.

    python bench/single_file.py           # SD1.5-sized, ~4 minutes and 5 GB of disk on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _results  # noqa: E402

PROBE = """
import json, sys
import torch, diffusers, transformers, safetensors.torch
import lora_kit, lora_kit.models, lora_kit.tools

def hwm():  # peak resident set (KiB) since the last reset; ru_maxrss would carry the parent's over exec
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

open("/proc/self/clear_refs", "w").write("5")  # reset the peak to what is resident now
base = hwm()
what, path, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
if what == "open":
    pipe = lora_kit.models.open_pipeline(path, dtype=torch.float16)
elif what.startswith("diffusers"):
    pipe = diffusers.StableDiffusionPipeline.from_single_file(path, config=extra[0], torch_dtype=torch.float16,
                                                              local_files_only=True)
    if what == "diffusers-read":  # its weights stay on the file's memory map until read: read each once
        total = sum(float(p.float().sum()) for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
elif what == "merge":
    lora_kit.tools.collapse_into_model(path, extra[0], extra[1], single_file=True, force=True)
elif what == "copy":
    state = safetensors.torch.load_file(path)
    renamed = {k.replace("model.diffusion_model.", "unet."): v.clone() for k, v in state.items()}
peak = hwm()
print(json.dumps({"base_kib": base, "peak_kib": peak}))
"""


def build(model_type: str, folder: Path) -> Path:
    """The checkpoint to measure: an SD1.5-sized pipeline from the shipped configs with random fp16 weights; plus a
    rank-16 LoRA on its UNet."""
    import diffusers
    import torch
    import transformers

    import lora_kit
    from lora_kit.inject import inject_lora
    from lora_kit.single_file import reader
    from lora_kit.single_file.writer import write_single_file

    config = reader.ASSETS / model_type
    index = json.loads((config / "model_index.json").read_text())
    parts = {}
    for comp in ("unet", "vae", "text_encoder"):
        library, name = index[comp]
        cls = getattr(diffusers if library == "diffusers" else transformers, name)
        with torch.device("meta"):
            if library == "diffusers":
                model = cls.from_config(cls.load_config(config / comp))
            else:
                model = cls(cls.config_class.from_pretrained(config / comp))
        model = model.to_empty(device="cpu").to(torch.float16)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        parts[comp] = model
    tok = transformers.CLIPTokenizer.from_pretrained(_tokenizer(config, folder))
    pipe = diffusers.StableDiffusionPipeline(
        **parts, tokenizer=tok, scheduler=diffusers.PNDMScheduler.from_pretrained(config / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    path = write_single_file(pipe, folder / "model.safetensors")
    inject_lora(pipe.unet, "kohya", rank=16)
    lora_kit.save(pipe, folder / "lora.safetensors")
    return path


def _tokenizer(config: Path, folder: Path) -> Path:
    import shutil

    from lora_kit.single_file.tokenizers import add_vocabulary

    target = folder / "tokenizer"
    shutil.copytree(config / "tokenizer", target, dirs_exist_ok=True)
    add_vocabulary(target, "CLIPTokenizer")
    return target


def measure(what: str, path: Path, *extra: str) -> tuple[float, float]:
    """(peak MiB above the process's baseline after imports, the baseline MiB) of one measurement, in a fresh
    process."""
    out = subprocess.run([sys.executable, "-c", PROBE, what, str(path), *extra], capture_output=True, text=True,
                         check=True)  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return (got["peak_kib"] - got["base_kib"]) / 1024, got["base_kib"] / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(_results.ROOT / "bench" / "RESULTS.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=_results.ROOT / "bench") as tmp:
        folder = Path(tmp)
        path = build("v1", folder)
        size = path.stat().st_size / 2**20
        config = folder / "config"
        from lora_kit.single_file.reader import config_folder
        from lora_kit.single_file.sniff import sniff

        config.mkdir()
        config_folder(sniff(path), "sd1", config)
        rows = []
        for what, extra in (("open", ()), ("diffusers", (str(config),)), ("diffusers-read", (str(config),)),
                            ("merge", (str(folder / "lora.safetensors"), str(folder / "out.safetensors"))),
                            ("copy", ())):  # fmt: skip
            peak, base = measure(what, path, *extra)
            rows.append([what, f"{peak:.0f}", f"{peak / size:.2f}x"])
            print(f"{what:10s} peak {peak:8.0f} MiB above a {base:.0f} MiB baseline = {peak / size:.2f}x the file")
    lines = [
        "## Single-file checkpoints: peak memory", "",
        f"`python bench/single_file.py` at {_results.commit()} on {platform.processor() or platform.machine()}, "
        f"{datetime.date.today()}: a {size:.0f} MiB fp16 SD1.5-sized checkpoint; peak resident memory above the "
        "process after imports.", "", *_results.table(["what", "peak MiB", "peak / file size"], rows), "",
        "open: lora_kit.open_pipeline (each tensor read into its own aligned allocation, keys it does not model left "
        "on disk); diffusers: from_single_file leaves the weights on a memory map of the file until they are used, "
        "diffusers-read after reading each once; merge: lora-merge MODEL LORA -o x.safetensors (open, collapse with "
        "one fp32 delta in flight, write tensor by tensor); copy: a naive converter's dict of renamed copies.",
    ]  # fmt: skip
    _results.write_section(args.results, lines)


if __name__ == "__main__":
    main()
