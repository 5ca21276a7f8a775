"""lora-generate: PNGs and a grid whose metadata names the prompt, seed, adapters, weights and schedules, and whose
pixels are what the Python API gives for the same settings; bad inputs exit 2 with one line and write nothing."""

import builtins
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import randomize_adapters
from lora_kit.cli import generate
from PIL import Image
from safetensors.torch import load_file, save_file

import lora_kit
import lora_kit.generate as gen
from lora_kit.errors import LoraKitError
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


@pytest.fixture(scope="module")
def xl_lora(tmp_path_factory):
    """A LoRA for another architecture: it names no layer of the sd1 model."""
    from conftest import build_pipeline

    folder = tmp_path_factory.mktemp("xl")
    other = build_pipeline("sdxl", str(folder / "tok"))
    inject_lora(other.unet, "attn", rank=2)
    lora_kit.save(other, folder / "xl.safetensors")
    return folder / "xl.safetensors"


@pytest.fixture
def no_model(monkeypatch):
    """The checks under test must come before the model is opened."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was opened")

    monkeypatch.setattr("lora_kit.models.open_pipeline", refuse)


def invoke(model, out, *extra):
    args = ["--model", model, "--prompt", "a dog", "--steps", "1", "--size", "32", "-o", out, *extra]
    return CliRunner().invoke(generate.main, [str(a) for a in args])


def assert_one_error_line(result, message):
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and result.stdout == "", result.output


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


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(model_and_loras, xl_lora, tmp_path):
    model, (subject, _) = model_and_loras
    xl = xl_lora
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
        (["--lora", xl], "is a LoRA for SDXL, but the model"),  # its header says so: before the model opens
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


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--guidance", "nan"], "--guidance nan: the guidance scale must be a finite number >= 0"),
        (["--guidance", "inf"], "--guidance inf: the guidance scale must be a finite number >= 0"),
        (["--guidance", "-5"], "--guidance -5.0: the guidance scale must be a finite number >= 0"),
        (["--device", "bogus"], "--device 'bogus': not a device torch knows"),
        (["--device", "cuda"], "--device 'cuda': this machine or this torch build cannot compute on it"),
        (["--device", "cuda:1"], "--device 'cuda:1': this machine or this torch build cannot compute on it"),
        (["--device", "mps"], "--device 'mps': this machine or this torch build cannot compute on it"),
        (["--device", "meta"], "--device 'meta': this machine or this torch build cannot compute on it"),
        (["--device", "vulkan"], "--device 'vulkan': this machine or this torch build cannot compute on it"),
        (["--lora", "{subject}@garbage"], "--lora '{subject}@garbage': schedule 'garbage': 'garbage' is not"),
        (["--lora", "{subject}@0:1,0:0"], "--lora '{subject}@0:1,0:0': schedule '0:1,0:0': progress values"),
        (["--lora", "{subject}", "--lora", "{subject}:0.5"], "--lora '{subject}:0.5': {subject} is given twice"),
        (["--lora", ""], "--lora '': no file given"),  # Path('') is '.': it said '.: is a folder'
        (["--lora", "@0:1"], "--lora '@0:1': no file given"),
        (["--seed", "99999999999999999999999"], "'--seed': 99999999999999999999999 is not in the range 0<=x<="),
        (["--seed", str(2**63)], "'--seed'"),
        (["--seed", "-1"], "'--seed'"),
        (["--negative-prompt", "a cat", "--guidance", "1"], "--negative-prompt has no effect at --guidance 1: "),
        (["--negative-prompt", "a cat", "--guidance", "0.5"], "--negative-prompt has no effect at --guidance 0.5: "),
    ],
)
def test_bad_options_fail_in_one_line_before_the_model_opens(
    model_and_loras, tmp_path, monkeypatch, no_model, extra, message
):
    model, (subject, _) = model_and_loras
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    out = tmp_path / "out"
    result = invoke(model, out, *[a.format(subject=subject) for a in extra])
    assert_one_error_line(result, message.format(subject=subject))
    assert not out.exists()


def read_only(monkeypatch, folder: Path) -> None:
    """Creating a file or a folder under `folder` fails as on a read-only filesystem (EROFS)."""

    def guard(real, creates):
        def call(path, *args, **kwargs):
            under = isinstance(path, str | os.PathLike) and Path(path).absolute().is_relative_to(folder)
            if under and creates(*args, **kwargs):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(
        os, "open", guard(os.open, lambda flags, *_, **__: flags & (os.O_CREAT | os.O_RDWR | os.O_WRONLY))
    )
    monkeypatch.setattr(builtins, "open", guard(builtins.open, lambda mode="r", *_, **__: set(mode) & set("wax+")))
    monkeypatch.setattr(os, "mkdir", guard(os.mkdir, lambda *_, **__: True))


@pytest.mark.parametrize("sub", ["", "new/folder"])
def test_an_unwritable_output_folder_fails_before_the_model_opens(
    model_and_loras, tmp_path, monkeypatch, no_model, sub
):
    model, _ = model_and_loras
    folder = tmp_path / "ro"
    folder.mkdir()
    read_only(monkeypatch, folder)
    out = folder / sub
    assert_one_error_line(invoke(model, out), f"{out}: cannot write into this folder (Read-only file system)")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("failing, existing", [(2, True), (4, False)])  # the second image; compare.png, the last
def test_a_full_disk_writes_nothing_and_keeps_what_was_there(
    model_and_loras, tmp_path, monkeypatch, failing, existing
):
    model, (subject, _) = model_and_loras
    out = tmp_path / "out"
    before = {"keep.txt": b"x", "000-seed0.png": b"an earlier run"} if existing else {}
    if existing:
        out.mkdir()
        for name, data in before.items():
            (out / name).write_bytes(data)
    save, calls = Image.Image.save, []

    def save_on_a_full_disk(image, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == failing:
            Path(fp).write_bytes(b"")  # the file is created, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_on_a_full_disk)
    result = invoke(model, out, "--lora", subject, "-n", "2", "--compare", "--force")
    assert_one_error_line(result, f"{out}: cannot write the images, none written (No space left on device)")
    assert len(calls) == failing
    if existing:  # what was there before survives untouched, and nothing else is left
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:  # the folder this run made is gone again
        assert not out.exists()


def test_files_with_the_same_stem_get_distinct_adapter_names(model_and_loras, tmp_path):
    model, (subject, style) = model_and_loras
    first, second = tmp_path / "a" / "style.safetensors", tmp_path / "b" / "style.safetensors"
    for source, copy in [(subject, first), (style, second)]:
        copy.parent.mkdir()
        shutil.copy(source, copy)
    out = tmp_path / "out"
    result = invoke(model, out, "--lora", f"{first}:0.5", "--lora", second)
    assert result.exit_code == 0, result.output
    loras = json.loads(Image.open(out / "000-seed0.png").text["loras"])
    assert [(d["name"], d["path"], d["weight"]) for d in loras] == [
        ("style", str(first), 0.5),
        ("style_2", str(second), 1),
    ]


def test_a_bad_lora_fails_before_any_denoising_even_with_compare(model_and_loras, xl_lora, tmp_path, monkeypatch):
    model, (subject, _) = model_and_loras
    calls, real = [], gen.generate
    monkeypatch.setattr(gen, "generate", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    out = tmp_path / "out"
    unlabelled = tmp_path / "xl.safetensors"  # no metadata: only the model can tell that its keys name no layer
    save_file(load_file(xl_lora), unlabelled)
    assert_one_error_line(invoke(model, out, "--compare", "--lora", subject, "--lora", unlabelled), "name no layer")
    assert calls == [] and not out.exists()


def test_an_error_while_denoising_is_the_only_output(model_and_loras, tmp_path, monkeypatch):
    model, (subject, _) = model_and_loras

    def fail_after_a_step(pipe, settings, loras, on_step=None):
        on_step()
        raise LoraKitError("the pipeline failed")

    monkeypatch.setattr(gen, "generate", fail_after_a_step)
    result = invoke(model, tmp_path / "out", "--lora", subject)
    assert result.exit_code == 2 and result.stderr == "error: the pipeline failed\n", result.stderr


def test_adapter_names_come_from_the_file_stems_and_stay_distinct(tmp_path):
    from lora_kit.generate import parse_loras

    files = [tmp_path / "x.safetensors", tmp_path / "a" / "x.safetensors", tmp_path / "b" / "x.safetensors",
             tmp_path / "c" / "x_2.safetensors", tmp_path / "my.style.safetensors"]  # fmt: skip
    for f in files:
        f.parent.mkdir(exist_ok=True)
        save_file({}, f)  # a valid header: parse_loras checks each file's (what the loader reads comes later)
    specs = parse_loras([f"{files[0]}:0.5", *map(str, files[1:])])
    assert [(s.name, s.weight) for s in specs] == [("x", 0.5), ("x_2", 1), ("x_3", 1), ("x_2_2", 1), ("my_style", 1)]
    with pytest.raises(LoraKitError, match="given twice"):
        parse_loras([str(files[0]), str(tmp_path / "a" / ".." / "x.safetensors@0:1")])


def test_lora_files_are_checked_before_the_model_opens(model_and_loras, tmp_path, no_model):
    _, (subject, _) = model_and_loras
    garbage, pt, out = tmp_path / "garbage.safetensors", tmp_path / "subject.pt", tmp_path / "out"
    garbage.write_bytes(b"hello")
    torch.save(load_file(subject), pt)
    for lora, message in [(garbage, "not a safetensors file"), (pt, "(--allow-pickle)"), (tmp_path, "is a folder")]:
        assert_one_error_line(invoke("toy", out, "--lora", lora), str(lora))
        assert_one_error_line(invoke("toy", out, "--lora", lora), message)
    with pytest.raises(LoraKitError, match="--seed 18446744073709551616: it must be a whole number from 0"):
        gen.Settings("a dog", seed=2**64)
    assert not out.exists()


def test_allow_pickle_reads_a_pickled_lora(model_and_loras, tmp_path):
    model, (subject, _) = model_and_loras
    pt = tmp_path / "subject.pt"
    torch.save(load_file(subject), pt)
    assert invoke(model, tmp_path / "a", "--lora", subject).exit_code == 0
    result = invoke(model, tmp_path / "b", "--lora", pt, "--allow-pickle")
    assert result.exit_code == 0, result.output
    a, b = (np.asarray(Image.open(tmp_path / d / "000-seed0.png")) for d in "ab")
    assert np.array_equal(a, b)


def _sd3_with_16x_latents(folder):
    """A tiny SD3 pipeline as the real ones are: an 8x VAE and transformer patches of 2, so sizes in 16s."""
    import diffusers as d
    from conftest import clip_config, clip_tokenizer, t5_encoder, t5_tokenizer
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok, tok2, tok3 = (
        clip_tokenizer(str(folder / "t1")),
        clip_tokenizer(str(folder / "t2"), pad_token="!"),
        t5_tokenizer(),
    )
    vae = d.AutoencoderKL(
        latent_channels=4, block_out_channels=(4, 4, 4, 4), layers_per_block=1, norm_num_groups=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip
    transformer = d.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )  # fmt: skip
    pipe = d.StableDiffusion3Pipeline(
        scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=transformer,
        text_encoder=CLIPTextModelWithProjection(clip_config(tok, proj=32)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(clip_config(tok2, proj=32)), tokenizer_2=tok2,
        text_encoder_3=t5_encoder(tok3), tokenizer_3=tok3,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if hasattr(component, "eval"):
            component.eval()  # built from configs in training mode (T5 dropout)
    return pipe


def test_the_size_is_checked_against_the_models_own_multiple(tmp_path, monkeypatch):
    """SD3 takes sizes in multiples of 16 (8x VAE, patch 2): --size 40 passed parse_size's multiples of 8 and
    ended in diffusers' ValueError (a traceback, exit 1). Now one line, exit 2, nothing written; 48 gives the image
    the pipeline gives from Python."""
    pipe = _sd3_with_16x_latents(tmp_path)
    monkeypatch.setattr("lora_kit.models.open_pipeline", lambda *args, **kwargs: pipe)
    out = tmp_path / "out"
    for size in ["40", "48x40"]:
        assert_one_error_line(
            invoke("sd3", out, "--size", size),
            "StableDiffusion3Pipeline needs width and height in multiples of 16",
        )
        assert not out.exists()
    result = invoke("sd3", out, "--size", "48x32")
    assert result.exit_code == 0, result.output
    expected = pipe("a dog", num_inference_steps=1, width=48, height=32, generator=torch.Generator().manual_seed(0))
    image = Image.open(out / "000-seed0.png")
    assert image.size == (48, 32)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected.images[0]))


def test_a_negative_prompt_the_model_would_ignore_is_refused(make_pipe, model_and_loras, tmp_path, monkeypatch):
    """FluxPipeline uses a negative prompt only with true CFG (true_cfg_scale > 1), which lora-generate does not run:
    the image was the same with and without it, and the PNG recorded it. Refused in one line, nothing written; on
    an SD pipeline at --guidance above 1 the negative prompt is taken and changes the image."""
    flux = make_pipe("flux")
    monkeypatch.setattr("lora_kit.models.open_pipeline", lambda *args, **kwargs: flux)
    out = tmp_path / "out"
    assert_one_error_line(
        invoke("flux", out, "--negative-prompt", "a cat"),
        "--negative-prompt has no effect on FluxPipeline: its --guidance is distilled guidance",
    )
    assert not out.exists()
    assert invoke("flux", out).exit_code == 0  # without it: fine
    monkeypatch.undo()
    model, _ = model_and_loras
    images = []
    for extra in [[], ["--negative-prompt", "a cat"]]:
        shutil.rmtree(out)
        assert invoke(model, out, "--guidance", "2", *extra).exit_code == 0
        images.append(np.asarray(Image.open(out / "000-seed0.png")))
    assert not np.array_equal(*images)
