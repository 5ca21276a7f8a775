"""lora-generate: PNGs and a grid whose metadata names the prompt, seed, adapters, weights and schedules, and whose
pixels are what the Python API gives for the same settings; bad inputs exit 2 with one line and write nothing."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import randomize_adapters
from lora_kit.cli import generate
from PIL import Image

import lora_kit
from lora_kit.generate import LoraSpec, parse_lora, parse_size
from lora_kit.inject import inject_lora


@pytest.fixture(scope="module")
def model_and_loras(tmp_path_factory):
    from conftest import build_pipeline

    folder = tmp_path_factory.mktemp("generate")
    pipe = build_pipeline("sd1", str(folder / "tok"))
    pipe.save_pretrained(folder / "model")
    files = []
    for name, preset in [("subject", "locon"), ("style", "attn")]:
        inject_lora(pipe.unet, preset, rank=2, name=name, conv_rank=2)
        files.append(folder / f"{name}.safetensors")
    inject_lora(pipe.text_encoder, "clip-attn", rank=2, name="subject")
    randomize_adapters(pipe, seed=3)
    for path in files:
        lora_kit.save(pipe, path, name=path.stem)
    return folder / "model", files


def test_writes_pngs_with_metadata_and_a_grid_equal_to_the_python_api(model_and_loras, tmp_path):
    model, (subject, style) = model_and_loras
    out = tmp_path / "out"
    args = ["--model", model, "--lora", f"{subject}:0.8", "--lora", f"{style}:0.6@0:1,0.5:0.2", "--prompt",
            "a photo of a dog", "--negative-prompt", "a cat", "--steps", "3", "--guidance", "5", "--seed", "7",
            "--size", "32", "-n", "3", "-o", out]  # fmt: skip
    result = CliRunner().invoke(generate.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000-seed7.png", "001-seed8.png", "002-seed9.png", "grid.png"]
    first = Image.open(out / "001-seed8.png")
    meta = first.text
    assert meta["prompt"] == "a photo of a dog" and meta["negative_prompt"] == "a cat" and meta["seed"] == "8"
    assert json.loads(meta["steps"]) == 3 and json.loads(meta["guidance"]) == 5.0 and meta["size"] == "32x32"
    loras = json.loads(meta["loras"])
    assert [(d["name"], d["weight"], d["schedule"]) for d in loras] == [
        ("subject", 0.8, None),
        ("style", 0.6, "0:1,0.5:0.2"),
    ]
    assert json.loads(meta["lora_kit"])["loras"] == loras
    assert "<lora:subject:0.8> <lora:style:0.6>" in meta["parameters"] and "Seed: 8" in meta["parameters"]
    assert Image.open(out / "grid.png").size == (64, 64)  # 3 images: 2 columns, 2 rows of 32x32

    # the same image from Python: load at the weights, schedule, same seed
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    lora_kit.load(pipe, subject, weight=0.8)
    lora_kit.load(pipe, style, weight=0.6)
    lora_kit.schedule(pipe, {"style": "0:1,0.5:0.2"})
    image = pipe("a photo of a dog", negative_prompt="a cat", num_inference_steps=3, guidance_scale=5.0,
                 width=32, height=32, generator=torch.Generator().manual_seed(8)).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(image), np.asarray(first.convert("RGB")))


def test_compare_puts_the_base_above_the_lora_for_the_same_seeds(model_and_loras, tmp_path):
    model, (subject, _) = model_and_loras
    out, base_out = tmp_path / "out", tmp_path / "base"
    common = [
        "--model",
        model,
        "--prompt",
        "a photo of a dog",
        "--steps",
        "2",
        "--seed",
        "3",
        "--size",
        "32",
        "-n",
        "2",
    ]
    result = CliRunner().invoke(generate.main, [str(a) for a in [*common, "--lora", subject, "--compare", "-o", out]])
    assert result.exit_code == 0, result.output
    assert (out / "compare.png").exists() and "compare.png" in result.output
    base = CliRunner().invoke(generate.main, [str(a) for a in [*common, "-o", base_out]])
    assert base.exit_code == 0, base.output
    compare = np.asarray(Image.open(out / "compare.png").convert("RGB"))
    assert compare.shape == (64, 64, 3)  # 2 seeds: before on the top row, after below
    for i in range(2):
        before = np.asarray(Image.open(base_out / f"00{i}-seed{3 + i}.png").convert("RGB"))
        after = np.asarray(Image.open(out / f"00{i}-seed{3 + i}.png").convert("RGB"))
        assert np.array_equal(compare[:32, 32 * i : 32 * (i + 1)], before)
        assert np.array_equal(compare[32:, 32 * i : 32 * (i + 1)], after)
        assert not np.array_equal(before, after)


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(model_and_loras, tmp_path):
    model, (subject, _) = model_and_loras
    xl = tmp_path / "xl.safetensors"
    from conftest import build_pipeline

    other = build_pipeline("sdxl", str(tmp_path / "tok"))
    inject_lora(other.unet, "attn", rank=2)
    lora_kit.save(other, xl)
    out = tmp_path / "out"
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    cases = [
        (["--lora", tmp_path / "missing.safetensors"], "no such file"),
        (["--lora", f"{subject}:0.5@0:1,x"], "not PROGRESS:VALUE"),
        (["--lora", f"{subject}@0.5:1,0.2:0"], "increase"),
        (["--size", "30x32"], "multiples of 8"),
        (["--size", "big"], "WIDTHxHEIGHT"),
        (["--model", tmp_path / "nowhere"], "no such folder"),
        (["--lora", xl], "name no layer"),
        (["-o", full], "not empty"),
    ]
    for extra, message in cases:
        args = ["--model", model, "--prompt", "a dog", "--steps", "1", "-o", out, *extra]
        result = CliRunner().invoke(generate.main, [str(a) for a in args])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output and result.output.strip().count("\n") == 0, (extra, result.output)
        assert not out.exists()
    assert sorted(p.name for p in full.iterdir()) == ["keep.txt"]


def test_lora_argument_and_size_parsing(tmp_path):
    f = tmp_path / "my@style:v2.safetensors"
    f.write_bytes(b"")
    g = tmp_path / "x.safetensors"
    g.write_bytes(b"")
    assert parse_lora(str(g)) == LoraSpec(str(g), 1.0, None)
    assert parse_lora(f"{g}:0.5") == LoraSpec(str(g), 0.5, None)
    assert parse_lora(f"{g}:-1@0:1,1:0") == LoraSpec(str(g), -1.0, "0:1,1:0")
    assert parse_lora(f"{g}@0:0.3") == LoraSpec(str(g), 1.0, "0:0.3")
    assert parse_lora(str(f)) == LoraSpec(str(f), 1.0, None)  # an existing file is taken whole
    assert parse_lora(f"{f}:0.7@0:1") == LoraSpec(str(f), 0.7, "0:1")
    assert parse_size("512") == (512, 512) and parse_size("768x512") == (768, 512)
