"""lora-train's bad inputs: one line naming the flag (or the config file and key) or the file, exit code 2, before the
model loads, nothing written; and a run that fails while writing its outputs leaves none of them behind."""

from pathlib import Path

import pytest
from click.testing import CliRunner
from lora_kit.cli import train as train_cli
from test_train import write_images

from lora_kit.errors import LoraKitError
from lora_kit.formats import embeddings as ti_files
from lora_kit.train import loop
from lora_kit.train.config import ConfigError, TrainConfig

# a model no test here may reach: each error must come before the model loads (else the error is about the model)
UNREACHED = "/nonexistent/model"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("inputs") / "images", n=2)


def lora_train(data, tmp_path, *extra, config: str | None = None):
    """Run lora-train on the unreachable model; the result, and every file of tmp_path afterwards."""
    args = ["--model", UNREACHED, "--data", str(data), "--steps", "2", "-o", str(tmp_path / "o.safetensors")]
    if config is not None:
        (tmp_path / "c.toml").write_text(config)
        args += ["--config", str(tmp_path / "c.toml")]
    result = CliRunner().invoke(train_cli.main, [*args, *extra])
    return result, sorted(p.name for p in tmp_path.rglob("*"))


def assert_one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.strip().count("\n") == 0, result.output
    assert message in result.output, result.output


FLAGS = [
    (["--lr", "nan"], "--lr is nan; it must be a finite number"),
    (["--weight-decay", "nan"], "--weight-decay is nan; it must be a finite number"),
    (["--alpha", "nan"], "--alpha is nan; it must be a finite number"),
    (["--noise-offset", "inf"], "--noise-offset is inf; it must be a finite number"),
    (["--max-grad-norm", "-inf"], "--max-grad-norm is -inf; it must be a finite number"),
    (["--min-snr-gamma", "nan"], "--min-snr-gamma is nan; it must be a finite number"),
    (["--alpha", "-1"], "--alpha is -1.0; it must be above 0"),
    (["--conv-alpha", "0"], "--conv-alpha is 0.0; it must be above 0"),
    (["--rank", "0"], "--rank is 0; it must be at least 1"),
    (["--targets", "bogus"], "--targets is 'bogus'; choose one of attn, kohya, locon, dit"),
    (["--text-encoder-targets", "attn"], "--text-encoder-targets is 'attn'; choose one of clip-attn, clip-all"),
    (["--mode", "dreambooth"], "--mode is 'dreambooth'; it needs --class-prompt"),
    (["--mode", "pivotal"], "--mode is 'pivotal'; it needs --token"),
    (["--mode", "pivotal", "--token", "<x>", "--ti-steps", "2"], "--ti-steps is 2; pivotal needs it below --steps"),
    (["--resume", "latest"], "o-checkpoints: no checkpoint to resume from"),
    (["--seed", "99999999999999999999999"], "--seed is 99999999999999999999999; it must be from 0 to 2**63 - 1"),
    (["--seed", str(2**63)], f"--seed is {2**63}; it must be from 0 to 2**63 - 1"),
    (["--resolution", "100000000000000000000"], "--resolution is 100000000000000000000; it must be from 1 to 8192"),
    (["--mode", "textual-inversion", "--token", "<x>", "--num-vectors", "76"], "--num-vectors is 76; it must be from"),
    (["--mode", "textual-inversion", "--token", " "], "--token is ' '; it must not be blank"),
    (["--mode", "pivotal", "--token", "<x>", "--init-token", ""], "--init-token is ''; it must not be blank"),
    (
        ["--mode", "textual-inversion", "--token", "<x>", "--init-token", "red dog"],
        "--init-token is 'red dog'; it must be one word",
    ),
]


@pytest.mark.parametrize(("extra", "message"), FLAGS, ids=[" ".join(e) for e, _ in FLAGS])
def test_a_bad_flag_is_named_before_the_model_loads(data, tmp_path, extra, message):
    result, written = lora_train(data, tmp_path, *extra)
    assert_one_line_error(result, message)
    assert written == []


CONFIGS = [  # (the --config file, the message with {file} for its path); --steps 2 is a flag
    ('flip = "false"', "flip in {file} is 'false'; it must be true or false"),
    ('rank = "four"', "rank in {file} is 'four'; it must be a whole number"),
    ("rank = true", "rank in {file} is True; it must be a whole number"),
    ("rank = 0", "rank in {file} is 0; it must be at least 1"),
    ("seed = 2.7", "seed in {file} is 2.7; it must be a whole number"),
    ('alpha = "4"', "alpha in {file} is '4'; it must be a number"),
    ("lr = nan", "lr in {file} is nan; it must be a finite number"),
    ("targets = ['attn']", "targets in {file} is ['attn']; it must be a string"),
    ('mode = "pivotal"\ntoken = "<x>"\nti_steps = 5', "ti_steps in {file} is 5; pivotal needs it below --steps"),
    ("bogus = 1", "{file}: unknown keys ['bogus']"),
    ("rank = ", "{file}: not valid TOML"),
]


@pytest.mark.parametrize(("text", "message"), CONFIGS, ids=[t for t, _ in CONFIGS])
def test_a_bad_config_value_names_the_key_and_the_file(data, tmp_path, text, message):
    result, written = lora_train(data, tmp_path, config=text)
    assert_one_line_error(result, message.format(file=tmp_path / "c.toml"))
    assert written == ["c.toml"]


def test_flags_win_over_the_config_file_before_it_is_checked(data, tmp_path):
    result, _ = lora_train(data, tmp_path, "--rank", "2", "--flip", config='rank = "four"\nflip = "no"')
    assert_one_line_error(result, f"{UNREACHED}: no such folder")  # valid: it went on to load the model


def test_config_values_keep_their_declared_types():
    cfg = TrainConfig(alpha=4, conv_alpha=2)
    assert type(cfg.alpha) is float and type(cfg.conv_alpha) is float  # int -> float: one spelling, one fingerprint
    assert cfg.fingerprint() == TrainConfig(alpha=4.0, conv_alpha=2.0).fingerprint()
    for values, message in ((dict(steps=2.0), "steps is 2.0; it must be a whole number"),
                            (dict(flip=1), "flip is 1; it must be true or false"),
                            (dict(lr=float("inf")), "lr is inf; it must be a finite number"),
                            (dict(class_guidance=True), "class_guidance is True; it must be a number")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**values)


def test_data_that_is_a_file_is_called_a_file(data, tmp_path):
    image = data / "img0.png"
    result, written = lora_train(image, tmp_path)
    assert_one_line_error(result, f"{image}: is a file; the data must be a folder")
    assert written == []


EXISTING = [  # (flags, what exists already, message): every output is checked up front
    (["--mode", "pivotal", "--token", "<x>", "--ti-steps", "1"], "o.emb.safetensors", "already exists"),
    ([], "o.config.toml", "o.config.toml: already exists"),
    (["--save-every", "1"], "o-checkpoints/step-1/state.json", "holds an earlier run's files"),
    (["--validation-prompt", "a dog", "--validate-every", "1"], "o-samples/step-1.png", "holds an earlier run"),
]


@pytest.mark.parametrize(("extra", "existing", "message"), EXISTING, ids=[e for _, e, _ in EXISTING])
def test_every_output_is_checked_before_the_model_loads(data, tmp_path, extra, existing, message):
    path = tmp_path / existing
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"keep me")
    result, written = lora_train(data, tmp_path, *extra)
    assert_one_line_error(result, message)
    assert path.read_bytes() == b"keep me" and "o.safetensors" not in written
    forced, _ = lora_train(data, tmp_path, *extra, "--force")
    assert_one_line_error(forced, f"{UNREACHED}: no such folder")  # --force lets it go on to the model


def test_a_failed_write_leaves_no_output(make_pipe, data, tmp_path, monkeypatch):
    def full_disk(path, *args, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(ti_files, "write", full_disk)  # the sidecar, written after the LoRA
    out = tmp_path / "o.safetensors"
    cfg = TrainConfig(model="tiny", data=str(data), output=str(out), mode="pivotal", token="<x>", steps=2, ti_steps=1,
                      resolution=32, rank=2)  # fmt: skip
    with pytest.raises(OSError, match="No space left"):
        loop.train(cfg, pipe=make_pipe("sd1"))
    assert sorted(Path(tmp_path).iterdir()) == []


def test_unreadable_images_are_named(tmp_path):
    """An unreadable image is skipped, by name (lora-train prints the names), not only counted."""
    from PIL import Image

    from lora_kit.train.data import scan

    Image.new("RGB", (16, 16)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    examples, skipped = scan(tmp_path, "a photo")
    assert [ex.image.name for ex in examples] == ["good.png"] and skipped == [tmp_path / "broken.png"]


def test_caption_precedence_is_manifest_then_txt_then_instance_prompt(tmp_path):
    """CONTRACTS: manifest, then <image>.txt, then --instance-prompt; a manifest entry without a caption takes its
    image's .txt before the instance prompt."""
    import json

    from PIL import Image

    from lora_kit.train.data import scan

    for name in ("a", "b", "c"):
        Image.new("RGB", (16, 16)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("the txt of a")
    (tmp_path / "b.txt").write_text("the txt of b")
    entries = [{"image": "a.png", "caption": "the manifest's a"}, {"image": "b.png", "caption": None},
               {"image": "c.png"}]  # fmt: skip
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(e) for e in entries))
    examples, _ = scan(tmp_path, "the instance prompt")
    assert [ex.caption for ex in examples] == ["the manifest's a", "the txt of b", "the instance prompt"]


def test_fp16_without_a_cuda_gpu_is_refused_before_the_model_loads(data, tmp_path, monkeypatch):
    """The CPU has no fp16 autocast (the run would crash on 'mat1 and mat2 must have the same dtype')."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result, written = lora_train(data, tmp_path, "--mixed-precision", "fp16")
    assert_one_line_error(result, "--mixed-precision is 'fp16'; it needs a CUDA GPU; use bf16 or no on the CPU")
    assert written == []


def test_seed_bounds_are_what_torch_takes():
    """The largest seed lora-train and lora-generate take is one place (errors.SEED_MAX): one more is refused, and
    torch takes the largest plus the index of any class or generated image (a million of them)."""
    import torch

    from lora_kit.errors import SEED_MAX
    from lora_kit.generate import Settings

    with pytest.raises(ConfigError, match=f"seed is {SEED_MAX + 1}; it must be from 0 to 2\\*\\*63 - 1"):
        TrainConfig(seed=SEED_MAX + 1)
    with pytest.raises(LoraKitError, match="--seed"):
        Settings(prompt="x", seed=SEED_MAX + 1)
    cfg = TrainConfig(seed=SEED_MAX, num_class_images=1_000_000)
    assert cfg.seed == Settings(prompt="x", seed=SEED_MAX).seed == SEED_MAX
    last = cfg.seed + cfg.num_class_images - 1
    assert torch.Generator().manual_seed(last).initial_seed() == last
    assert torch.manual_seed(cfg.seed + 1).initial_seed() == cfg.seed + 1  # the class images' plan: seed + 1


def _bad_data(root: Path, case: str) -> tuple[Path, str]:
    """A data folder with one defect, and the message it gets ({d}: the folder)."""
    import json

    from PIL import Image

    d = write_images(root / case, n=2)
    manifest = d / "manifest.jsonl"

    def entries(**fields):
        lines = (json.dumps({"image": f"img{i}.png", "caption": "x", **fields}) for i in range(2))
        manifest.write_text("\n".join(lines))

    if case == "txt-not-utf8":
        (d / "img0.txt").write_bytes(b"\xff\xfe a caption")
        return d, f"{d / 'img0.txt'}: the caption file is not UTF-8 text"
    if case == "manifest-not-utf8":
        manifest.write_bytes(b"\xff\xfe{}")
        return d, f"{manifest}: the manifest is not UTF-8 text"
    if case == "caption-int":
        entries(caption=7)
        return d, f"{manifest}: line 1: 'caption' is 7; it must be text or null"
    if case == "mask-int":
        entries(mask=3)
        return d, f"{manifest}: line 1: 'mask' is 3; it must be a path relative to the manifest, or null"
    if case == "image-list":
        manifest.write_text(json.dumps({"image": ["img0.png"]}))
        return d, f"{manifest}: line 1: 'image' is ['img0.png']; it must be a path relative to the manifest"
    if case == "mask-corrupt":
        (d / "m.png").write_bytes(b"not a png")
        entries(mask="m.png")
        return d, f"mask {d / 'm.png'} of image {d / 'img0.png'}: not an image"
    if case == "mask-missing":
        entries(mask="gone.png")
        return d, f"mask {d / 'gone.png'} of image {d / 'img0.png'}: no such file"
    if case == "mask-size":
        Image.new("L", (8, 8), 255).save(d / "m.png")
        entries(mask="m.png")
        return d, f"mask {d / 'm.png'} of image {d / 'img0.png'} is 8x8, the image 40x32; a mask must have its size"
    raise AssertionError(case)


BAD_DATA = ["txt-not-utf8", "manifest-not-utf8", "caption-int", "mask-int", "image-list", "mask-corrupt",
            "mask-missing", "mask-size"]  # fmt: skip


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_training_data_is_one_line_before_the_model_loads(tmp_path_factory, tmp_path, case):
    """A caption or manifest that is not UTF-8, a manifest field of the wrong type, a bad mask: one line naming the
    file, at scan time (the model is never reached), not a traceback or a failure mid-training."""
    folder, message = _bad_data(tmp_path_factory.mktemp("bad-data"), case)
    before = {p: p.read_bytes() for p in folder.iterdir()}
    result, written = lora_train(folder, tmp_path)
    assert_one_line_error(result, message)
    assert written == [] and {p: p.read_bytes() for p in folder.iterdir()} == before


def test_a_decompression_bomb_is_skipped_as_unreadable(tmp_path):
    """An image PIL refuses to decode as too large (lora-ppim's 'too large' rejection) is skipped by name, like a
    corrupt one, not a DecompressionBombError traceback."""
    import struct
    import zlib

    from lora_kit.train.data import scan

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    write_images(tmp_path, n=2)
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    (tmp_path / "img0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    examples, skipped = scan(tmp_path)
    assert [ex.image.name for ex in examples] == ["img1.png"] and skipped == [tmp_path / "img0.png"]


def test_an_unreadable_subfolder_is_refused(data, tmp_path, monkeypatch):
    """A subfolder lora-train cannot list is an error naming it: Path.rglob skipped it, and its images, silently. (A
    chmod would not stop root, who runs the tests in CI: the listing itself is made to fail.)"""
    import os
    import shutil

    folder = tmp_path / "data"
    shutil.copytree(data, folder)
    locked = write_images(folder / "10_more", n=1)
    real = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = CliRunner().invoke(train_cli.main, ["--model", UNREACHED, "--data", str(folder), "-o",
                                                 str(tmp_path / "o.safetensors")])  # fmt: skip
    assert_one_line_error(result, f"{locked}: cannot read this folder (Permission denied)")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("name", ["logdir", "class-data"])
def test_a_folder_option_naming_a_file_is_refused_before_the_model_loads(data, tmp_path, name):
    """--logdir and --class-data name folders; a file there (or on the way there) failed with 'File exists' after
    the model had loaded."""
    file = tmp_path / "a.safetensors"
    file.write_bytes(b"keep me")
    prior = ["--mode", "dreambooth", "--class-prompt", "a dog"] if name == "class-data" else []
    for value, problem in ((file, "it names a file"), (file / "sub", f"{file} is a file")):
        result, _ = lora_train(data, tmp_path, *prior, f"--{name}", str(value))
        assert_one_line_error(result, f"--{name} is '{value}'; {problem}; it must be a folder (made if missing)")
    assert file.read_bytes() == b"keep me" and not (tmp_path / "o.safetensors").exists()


def _checkpoint(cfg: TrainConfig, optimizer: bytes | None = None) -> Path:
    """A step-1 checkpoint of `cfg`'s run as lora-train writes one (its optimizer.pt bytes replaced if given)."""
    import json

    import torch

    from lora_kit.formats import files
    from lora_kit.train.checkpoints import fingerprints

    folder = cfg.checkpoint_dir / "step-1"
    folder.mkdir(parents=True)
    (folder / "trainable.safetensors").write_bytes(files.serialize({"lora.x": torch.zeros(1)}))
    torch.save({"optimizer": {}, "scheduler": {}}, folder / "optimizer.pt")
    if optimizer is not None:
        (folder / "optimizer.pt").write_bytes(optimizer)
    (folder / "state.json").write_text(json.dumps({"step": 1, "steps": 2, **fingerprints(cfg)}))
    return folder


def test_a_corrupt_optimizer_state_is_one_line_before_the_model_loads(data, tmp_path):
    out = tmp_path / "o.safetensors"
    folder = _checkpoint(TrainConfig(model=UNREACHED, data=str(data), output=str(out), steps=2), b"garbage\n")
    result, _ = lora_train(data, tmp_path, "--resume", "latest", "--force")
    assert_one_line_error(result, f"{folder / 'optimizer.pt'}: not a readable optimizer state (")
    assert (folder / "optimizer.pt").read_bytes() == b"garbage\n" and not out.exists()


def test_resume_takes_the_same_data_spelled_or_placed_otherwise(data, tmp_path, monkeypatch):
    """The config fingerprint leaves out the model and data paths (their files are fingerprinted): a run made with
    --data ../x resumes with --data /abs/x, or with a copy of x elsewhere; other data is still refused."""
    import os
    import shutil

    from lora_kit.errors import LoraKitError
    from lora_kit.train.checkpoints import check_resume, fingerprints

    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    moved = Path(shutil.copytree(data, tmp_path / "moved"))
    made = TrainConfig(model="tiny", data=os.path.relpath(data), output="o.safetensors", steps=2)
    folder = _checkpoint(made)
    for spelled in (str(Path(data).resolve()), str(moved)):
        resumed = TrainConfig(model="tiny", data=spelled, output=str(Path("o.safetensors").resolve()), steps=3,
                              resume="latest")  # fmt: skip
        assert check_resume(resumed, fingerprints(resumed)).resolve() == folder.resolve()
    (moved / "img0.txt").write_text("another caption")
    other = TrainConfig(model="tiny", data=str(moved), output="o.safetensors", steps=3, resume="latest")
    with pytest.raises(LoraKitError, match="different data"):
        check_resume(other, fingerprints(other))


def test_resume_refuses_data_edited_in_a_hidden_folder(data, tmp_path):
    """The data fingerprint covers exactly what scan() trains on: an image and caption under .extra/ are read, so
    editing the caption changes the data (the fingerprint left hidden folders out, and --resume took it)."""
    import shutil

    from lora_kit.train.checkpoints import data_fingerprint
    from lora_kit.train.data import scan

    folder = Path(shutil.copytree(data, tmp_path / "d"))
    (folder / ".extra").mkdir()
    shutil.copy(folder / "img0.png", folder / ".extra" / "x.png")
    (folder / ".extra" / "x.txt").write_text("one caption")
    assert folder / ".extra" / "x.png" in [ex.image for ex in scan(folder)[0]]
    before = data_fingerprint(folder)
    (folder / ".extra" / "x.txt").write_text("two caption")  # the same size
    assert data_fingerprint(folder) != before


@pytest.mark.parametrize(("arch", "clip_skip", "message"), [
    ("sd1", 50, "clip_skip is 50; it must be at most 2, the layers of this model's text encoder"),
    ("sdxl", 2, "clip_skip is 2; it does not apply to sdxl"),
])  # fmt: skip
def test_clip_skip_is_checked_against_the_text_encoder_before_training(make_pipe, data, tmp_path, arch, clip_skip,
                                                                       message):  # fmt: skip
    """hidden_states[-clip_skip] failed with an IndexError at the first step (SDXL ignored it silently): refused as
    soon as the model is known, before anything is written."""
    cfg = TrainConfig(model="tiny", data=str(data), output=str(tmp_path / "o.safetensors"), steps=1, resolution=32,
                      rank=2, clip_skip=clip_skip)  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        loop.train(cfg, pipe=make_pipe(arch))
    assert list(tmp_path.iterdir()) == []


def test_no_progress_bar_where_stderr_is_not_a_terminal(make_pipe, data, tmp_path, capsys):
    """As every lora_kit command: the bar shows on a terminal only, so a log holds the summary line alone."""
    cfg = TrainConfig(model="tiny", data=str(data), output=str(tmp_path / "o.safetensors"), steps=2, resolution=32,
                      rank=2)  # fmt: skip
    loop.train(cfg, pipe=make_pipe("sd1"))
    assert capsys.readouterr().err.splitlines() == ["training lora on 2 images in 1 processes"]
