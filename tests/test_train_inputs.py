"""lora-train's bad inputs: one line naming the flag (or the config file and key) or the file, exit code 2, before the
model loads, nothing written; and a run that fails while writing its outputs leaves none of them behind."""

from pathlib import Path

import pytest
from click.testing import CliRunner
from lora_kit.cli import train as train_cli
from test_train import write_images

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
