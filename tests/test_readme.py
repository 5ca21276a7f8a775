"""The README runs as shown.

Its ```python blocks are executed in README order in one namespace (as a user pasting them into one Python session
would), unchanged: same calls, same arguments. They run in a scratch folder where the README's placeholder names are
real files (STAGED below), so nothing is rewritten:

- `path/to/model`, `path/to/sd15`: a tiny pipeline with SD 1.5's layout (its UNet config from
  lora_kit/assets/configs/sd1.json at small widths: the README's block-weight vectors count SD 1.5's blocks), a tiny
  VAE and the tiny CLIP of conftest.py; random weights, fp32;
- `style.safetensors` (UNet attention + CLIP attention) and `subject.safetensors` (UNet `kohya`): random LoRAs for it;
- `v1-5-pruned-emaonly.safetensors`: that pipeline written as an A1111 checkpoint (lora_kit's writer);
- `photos/`: three photos; `./clip-vit-b32`, `./git-base`, `./clipseg`: the tiny models of test_ppim.py.

The toy-world block needs no placeholder: it opens the shipped model with a plain `from_pretrained`.

Every command of the ```bash blocks parses (lora-* with click, accelerate with its own parser, make with -n) and its
`--help` names every flag the README gives it; the cheap ones run as shown (the toy world's generator, lora-ppim,
lora-generate). A README block that names a file not staged here fails, by design: stage it in STAGED, or say in
the README what it needs."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import clip_config, clip_tokenizer, randomize_adapters
from test_ppim import models  # noqa: F401 - the fixture: tiny CLIP, CLIPSeg and GIT folders
from test_train import write_images

import lora_kit

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# placeholder names of the README -> what stands for them in the scratch folder (see the module docstring)
STAGED = {
    "path/to/model": "tiny SD 1.5-layout pipeline",
    "path/to/sd15": "tiny SD 1.5-layout pipeline",
    "style.safetensors": "LoRA: UNet attn + CLIP attn",
    "subject.safetensors": "LoRA: UNet kohya",
    "v1-5-pruned-emaonly.safetensors": "the tiny SD 1.5-layout pipeline as an A1111 single-file checkpoint",
    "photos/": "three photos",
    "clip-vit-b32": "tiny CLIP (test_ppim)",
    "git-base": "tiny GIT (test_ppim)",
    "clipseg": "tiny CLIPSeg (test_ppim)",
}


def readme_blocks(lang: str) -> list[tuple[int, str]]:
    """(line number of the block's first code line, code) for every ```lang block of the README."""
    return [(README[: m.start(1)].count("\n") + 1, m.group(1))
            for m in re.finditer(rf"^```{lang}\n(.*?)^```", README, re.S | re.M)]  # fmt: skip


def readme_commands() -> list[tuple[int, list[str]]]:
    """(README line, argv) of every command in the ```bash blocks: continuation lines joined, comments dropped,
    leading VAR=value assignments dropped."""
    out = []
    for first, code in readme_blocks("bash"):
        lines, start, pending = code.splitlines(), None, ""
        for i, line in enumerate(lines):
            start = first + i if not pending else start
            pending += line.rstrip("\\") + " " if line.endswith("\\") else line
            if line.endswith("\\"):
                continue
            argv = shlex.split(pending, comments=True)
            pending = ""
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                argv = argv[1:]
            if argv:
                out.append((start, argv))
    return out


def script_main(name: str):
    """The click command behind a console script of pyproject.toml (lora-train -> lora_kit.cli.train:main)."""
    target = re.search(rf'^{re.escape(name)} = "([\w.]+):(\w+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert target, f"{name} is not a console script of pyproject.toml"
    return getattr(importlib.import_module(target.group(1)), target.group(2))


def flags(argv: list[str]) -> set[str]:
    return {a.split("=")[0] for a in argv if a.startswith("-") and not re.fullmatch(r"-?[\d.]+", a)}


@pytest.fixture(autouse=True)
def one_thread():
    """Torch on one thread while these tests run: their models are tiny, a second intra-op thread saves nothing on
    ops this small, and on a busy 2-core machine it made the README's examples 10-25x slower (threads waiting on each
    other); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ staged files
def sd15_layout_pipeline(folder: Path):
    """A tiny StableDiffusionPipeline with SD 1.5's UNet block layout (4 blocks of 2 layers, cross-attention in the
    first three), random weights."""
    import diffusers as d
    import torch
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = json.loads((ROOT / "lora_kit" / "assets" / "configs" / "sd1.json").read_text())["unet"]
    unet = {k: v for k, v in unet.items() if k != "class"}
    unet.update(block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=4, sample_size=8)
    tok = clip_tokenizer(str(folder / "tok"))
    # a VAE that downsamples 32x (SD's: 8x) keeps the README's 512 px samples cheap: the UNet works at 16x16
    vae = d.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 16, 32, 32),
                          layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 6,
                          up_block_types=("UpDecoderBlock2D",) * 6, sample_size=256)  # fmt: skip
    scheduler = d.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    return d.StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(clip_config(tok)), tokenizer=tok, unet=d.UNet2DConditionModel(**unet),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def write_photos(folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, size in enumerate([(640, 560), (560, 700), (600, 600)]):
        img = Image.new("RGB", size, (40 * i, 90, 160))
        img.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), (220, 180, 40)), (size[0] // 4, size[1] // 4))
        img.save(folder / f"photo{i}.jpg")


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    """A folder holding the model and LoRA files the README's examples name (STAGED)."""
    from lora_kit.inject import inject_lora

    root = tmp_path_factory.mktemp("readme")
    model = root / "path" / "to" / "model"
    sd15_layout_pipeline(root / "tok").save_pretrained(model)
    (root / "path" / "to" / "sd15").symlink_to(model, target_is_directory=True)
    for name, unet_preset, te in (("style", "attn", True), ("subject", "kohya", False)):
        pipe = sd15_layout_pipeline(root / "tok")
        inject_lora(pipe.unet, unet_preset, rank=4)
        if te:
            inject_lora(pipe.text_encoder, "clip-attn", rank=4)
        randomize_adapters(pipe, seed=len(name), std=0.05)
        lora_kit.save(pipe, root / f"{name}.safetensors")
    write_photos(root / "photos")
    from lora_kit.single_file.writer import write_single_file

    write_single_file(sd15_layout_pipeline(root / "tok"), root / "v1-5-pruned-emaonly.safetensors")
    return root


def scratch(staged: Path, tmp_path: Path, ppim_models: dict[str, str] | None = None) -> Path:
    """A fresh working folder with links to everything staged (each README command that writes data/ or out/ gets
    its own)."""
    for item in staged.iterdir():
        (tmp_path / item.name).symlink_to(item, target_is_directory=item.is_dir())
    for name, key in (("clip-vit-b32", "clip"), ("git-base", "git"), ("clipseg", "clipseg")):
        if ppim_models:
            (tmp_path / name).symlink_to(ppim_models[key], target_is_directory=True)
    return tmp_path


# ------------------------------------------------------------------------------------------------ python blocks
def test_the_toy_model_opens_in_one_dtype_with_a_plain_from_pretrained():
    """Issue 30: the shipped text encoder opened in fp16 beside an fp32 UNet and VAE, and the first prompt failed."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(lora_kit.toy_model())
    assert {p.dtype for c in (pipe.unet, pipe.text_encoder, pipe.vae) for p in c.parameters()} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle on a blue background", num_inference_steps=2).images[0].size == (64, 64)
    half = StableDiffusionPipeline.from_pretrained(lora_kit.toy_model(), dtype=torch.float16)
    assert {p.dtype for c in (half.unet, half.text_encoder, half.vae) for p in c.parameters()} == {torch.float16}


def test_saved_pipelines_open_in_one_dtype(make_pipe, tmp_path):
    """models.loads_in_fp32 (pretrain.py's toy model, lora-merge MODEL LORA -o DIR): fp16 weights stay fp16 on disk,
    and a plain from_pretrained opens the text encoder in fp32 beside the fp32 UNet and VAE."""
    import torch
    from diffusers import StableDiffusionPipeline

    from lora_kit.models import loads_in_fp32

    make_pipe("sd1").to(torch.float16).save_pretrained(tmp_path / "a")
    assert StableDiffusionPipeline.from_pretrained(tmp_path / "a").text_encoder.dtype == torch.float16  # the bug
    loads_in_fp32(tmp_path / "a")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "a")
    assert {p.dtype for c in (pipe.unet, pipe.text_encoder, pipe.vae) for p in c.parameters()} == {torch.float32}
    header = json.loads((tmp_path / "a" / "text_encoder" / "model.safetensors").read_bytes()[8:][:10_000]
                        .split(b"}}")[0].decode() + "}}")  # fmt: skip
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}  # the files stay fp16
    from lora_kit import tools
    from lora_kit.inject import inject_lora

    half = make_pipe("sd1").to(torch.float16)
    half.save_pretrained(tmp_path / "b")
    inject_lora(half.unet, "attn", rank=2)
    tools.collapse_into_model(str(tmp_path / "b"), lora_kit.save(half, tmp_path / "l.safetensors"), tmp_path / "m")
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "m")
    assert {p.dtype for c in (merged.unet, merged.text_encoder, merged.vae) for p in c.parameters()} == {torch.float32}


def test_placeholders_are_the_staged_ones():
    """Every path-like placeholder of the python blocks is staged here (a new one must be added to STAGED)."""
    named = set()
    for _, code in readme_blocks("python"):
        named |= set(re.findall(r'"([\w./-]+(?:\.safetensors|/[\w./-]*))"', code))
    assert named - {"mine.safetensors"} <= set(STAGED), named  # mine.safetensors is written by the README itself


@pytest.mark.slow
def test_python_blocks_run_as_shown(staged, tmp_path, monkeypatch):
    """Each ```python block, unchanged and in order, in one namespace; a traceback names the README line."""
    import torch
    from PIL import Image

    monkeypatch.chdir(scratch(staged, tmp_path))
    blocks = readme_blocks("python")
    assert len(blocks) >= 5, "the README's python blocks went missing"
    namespace = {"__name__": "__readme__"}
    for line, code in blocks:
        exec(compile("\n" * (line - 1) + code, str(ROOT / "README.md"), "exec"), namespace)  # noqa: S102
    assert (tmp_path / "mine.safetensors").is_file()
    # the last block is the toy world's: the shipped model from a plain from_pretrained, all fp32, 64x64 samples
    pipe, image = namespace["pipe"], namespace["image"]
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    assert {p.dtype for c in (pipe.unet, pipe.text_encoder, pipe.vae) for p in c.parameters()} == {torch.float32}


# ------------------------------------------------------------------------------------------------ bash blocks
OURS = ("lora-train", "lora-generate", "lora-ppim", "lora-merge", "lora-extract", "lora-resize", "lora-convert",
        "lora-inspect")  # fmt: skip


def _our_command(argv: list[str]) -> tuple[str, list[str]] | None:
    """(console script, its arguments) for one of our commands, also when accelerate launches it with -m."""
    if argv[0] in OURS:
        return argv[0], argv[1:]
    if argv[:2] == ["accelerate", "launch"] and "-m" in argv:
        module = argv[argv.index("-m") + 1]
        assert module.startswith("lora_kit.cli."), argv
        return "lora-" + module.rsplit(".", 1)[1], argv[argv.index("-m") + 2 :]
    return None


def test_every_bash_command_is_one_this_test_knows():
    commands = readme_commands()
    assert len(commands) >= 15, "the README's commands went missing"
    for line, argv in commands:
        known = argv[0] in OURS + ("make", "accelerate") or argv[:2] == ["python", "datasets/toyworld/generate.py"]
        assert known, f"README.md:{line}: {argv[0]} is not checked by tests/test_readme.py; add it there"


@pytest.mark.parametrize(("line", "argv"), readme_commands(), ids=[f"line{n}" for n, _ in readme_commands()])
def test_bash_command_parses_and_its_help_names_its_flags(line, argv, tmp_path):
    ours = _our_command(argv)
    if argv[0] == "make":
        if shutil.which("make") is None:
            pytest.skip("needs make")
        dry = subprocess.run(["make", "-n", "-C", str(ROOT), *argv[1:], f"QUICK={tmp_path / 'qs'}"],
                             capture_output=True, text=True)  # fmt: skip
        assert dry.returncode == 0, f"README.md:{line}: {dry.stderr}"
        return
    if argv[0] == "python":
        parser_help = subprocess.run([sys.executable, str(ROOT / argv[1]), "--help"], capture_output=True, text=True)
        assert parser_help.returncode == 0 and all(f in parser_help.stdout for f in flags(argv[2:])), line
        return
    if argv[0] == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        launched = launch_command_parser().parse_args(argv[2:])
        assert launched.module and launched.training_script == "lora_kit.cli.train", launched
    name, args = ours
    main = script_main(name)
    shown = CliRunner().invoke(main, ["--help"])
    assert shown.exit_code == 0, shown.output
    missing = [f for f in flags(args) if f not in shown.output]
    assert not missing, f"README.md:{line}: {name} --help does not name {missing}"
    ctx = main.make_context(name, list(args))  # a flag it lacks or a value it refuses raises here
    if name == "lora-train" and "--config" not in args:  # the values as TrainConfig checks them (no training)
        from lora_kit.train.config import TrainConfig

        TrainConfig(**{k: v for k, v in ctx.params.items() if v is not None and k != "config_file"})


def test_quickstart_images_command_runs_as_shown(tmp_path):
    """README: `python datasets/toyworld/generate.py quickstart/data --split subject --count 5` (5 images)."""
    argv = next(a for _, a in readme_commands() if a[:2] == ["python", "datasets/toyworld/generate.py"])
    run = subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:]], cwd=tmp_path, capture_output=True,
                         text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert len(list((tmp_path / "quickstart" / "data").glob("*.png"))) == 5


@pytest.mark.slow
def test_lora_generate_example_runs_as_shown(staged, tmp_path, monkeypatch):
    """The lora-generate example with two LoRAs, a weight and a schedule, on the SD 1.5-layout model: it writes
    the files the README lists, each PNG with its settings."""
    from PIL import Image

    argv = next(a for _, a in readme_commands() if a[0] == "lora-generate" and "path/to/sd15" in a)
    monkeypatch.chdir(scratch(staged, tmp_path))
    result = CliRunner().invoke(script_main("lora-generate"), argv[1:])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["000-seed1.png", "001-seed2.png", "002-seed3.png", "003-seed4.png", "grid.png"]
    assert "000-seed1.png" in README and "003-seed4.png" in README
    with Image.open(tmp_path / "out" / "000-seed1.png") as png:
        assert png.size == (512, 512) and "a photo of sks dog, watercolor" in png.text["parameters"]


@pytest.mark.slow
def test_lora_ppim_examples_run_as_shown(staged, models, tmp_path, monkeypatch):  # noqa: F811 - test_ppim's fixture
    """Each lora-ppim example (alternatives, each into its own data/) on three photos with the tiny local models."""
    commands = [a for _, a in readme_commands() if a[0] == "lora-ppim"]
    assert len(commands) == 4
    for i, argv in enumerate(commands):
        (tmp_path / str(i)).mkdir()
        monkeypatch.chdir(scratch(staged, tmp_path / str(i), models))
        result = CliRunner().invoke(script_main("lora-ppim"), argv[1:])
        assert result.exit_code == 0, f"{shlex.join(argv)}: {result.output}"
        entries = [json.loads(s) for s in Path("data", "manifest.jsonl").read_text().splitlines()]
        assert len(entries) == 3 and all("sks" in e["caption"] for e in entries), entries
        assert all((e["mask"] is not None) == ("--mask" in argv) for e in entries)


@pytest.mark.slow
def test_training_outputs_are_named_after_the_output_stem(staged, tmp_path):
    """README: `-o out/style.safetensors` writes out/style.config.toml, out/style-checkpoints/step-N/,
    out/style-samples/ and out/style-class-images/ (the stem, not the output's full name)."""
    for said in ("out/style.config.toml", "out/style-checkpoints/step-N/", "out/style-samples/",
                 "out/style-class-images/"):  # fmt: skip
        assert f"`{said}`" in README, said
    assert "<output>" not in README
    data = write_images(tmp_path / "dog")
    out = tmp_path / "out" / "style.safetensors"
    out.parent.mkdir()
    args = ["--model", str(staged / "path" / "to" / "model"), "--data", str(data), "--mode", "dreambooth",
            "--class-prompt", "a photo of a dog", "--num-class-images", "1", "--resolution", "64", "--steps", "2",
            "--rank", "2", "--save-every", "1", "--validation-prompt", "a photo of sks dog", "--validate-every", "2",
            "--validation-steps", "2", "-o", str(out)]  # fmt: skip
    result = CliRunner().invoke(script_main("lora-train"), args)
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in out.parent.iterdir())
    assert written == ["style-checkpoints", "style-class-images", "style-samples", "style.config.toml",
                       "style.safetensors"], written  # fmt: skip
    assert (out.parent / "style-checkpoints" / "step-1").is_dir()
