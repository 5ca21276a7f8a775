"""The README's first command, `make quickstart`, on the shipped toy model (fewer steps): it writes the LoRA and a
before/after grid, and refuses to run over an existing output folder."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lora_kit

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_quickstart_writes_the_lora_and_a_before_after_grid(tmp_path):
    out = tmp_path / "qs"
    cmd = ["make", "-s", "-C", str(ROOT), "quickstart", f"QUICK={out}", "STEPS=4", "SAMPLE_STEPS=2"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (out / "sks.safetensors").is_file() and len(list((out / "data").glob("*.png"))) == 5
    report = lora_kit.inspect(out / "sks.safetensors")
    assert report["architecture"] == "sd1"
    compare = np.asarray(Image.open(out / "samples" / "compare.png"))
    assert compare.shape[:2] == (128, 256)  # 4 seeds of 64x64: before on top, after below
    assert not np.array_equal(compare[:64], compare[64:])

    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode != 0 and "already exists" in again.stdout + again.stderr
