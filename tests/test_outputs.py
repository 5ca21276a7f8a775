"""What every writer shares: all-or-nothing writes, a failure in one line, ordinary permissions, and a --force
that never replaces what it should not."""

import errno
import os

import click
import pytest
from click.testing import CliRunner
from lora_kit.cli import merge
from lora_kit.cli._common import friendly_errors

from lora_kit.errors import LoraKitError
from lora_kit.formats import files


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_full_disk_leaves_nothing_and_says_so_in_one_line(tmp_path, monkeypatch):
    out = tmp_path / "a.safetensors"
    out.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(LoraKitError, match="a.safetensors: cannot write it .No space left on device"):
        files.write_atomic(out, b"new bytes", force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"] and out.read_bytes() == b"old"


def test_written_files_get_the_umask_permissions(tmp_path, umask):
    path = files.write_atomic(tmp_path / "a.safetensors", b"x")
    assert path.stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0o600
    os.umask(0o077)
    assert files.write_atomic(tmp_path / "b.safetensors", b"x").stat().st_mode & 0o777 == 0o600


def test_a_folder_is_never_a_file_output(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(LoraKitError, match="is a folder"):
        files.check_output(tmp_path / "d", force=True)
    with pytest.raises(LoraKitError, match="is a folder"):  # a new folder's path: Path() would drop the slash
        files.check_output(f"{tmp_path}/new/", force=True)


def test_unexpected_os_errors_are_one_line_after_the_progress_bar_is_gone():
    from tqdm import tqdm

    @click.command()
    @friendly_errors
    def main():
        bar = tqdm(total=3, desc="working", leave=False)
        bar.update(1)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/x.png")

    result = CliRunner().invoke(main, [])
    assert result.exit_code == 2
    assert result.output.rsplit("\r", 1)[-1].strip() == "error: out/x.png: No space left on device"
    assert not list(tqdm._instances)


@pytest.fixture(scope="module")
def sd1_model(tmp_path_factory):
    from conftest import build_pipeline

    folder = tmp_path_factory.mktemp("sd1")
    build_pipeline("sd1", str(folder / "tok")).save_pretrained(folder / "model")
    return folder / "model"


def test_collapse_replaces_only_its_own_pipeline_folders(two_loras, sd1_model, tmp_path, monkeypatch, umask):
    a, _ = two_loras
    run = lambda *args: CliRunner().invoke(merge.main, [str(x) for x in args])  # noqa: E731

    out = tmp_path / "merged"
    assert run(sd1_model, a, "-o", out).exit_code == 0
    assert out.stat().st_mode & 0o777 == 0o755  # not mkdtemp's private 0o700
    assert {p.stat().st_mode & 0o777 for p in out.rglob("*.safetensors")} == {0o644}  # safetensors makes 0o600
    first = (out / "model_index.json").stat().st_mtime_ns
    assert run(sd1_model, a, "--alpha", "0.5", "-o", out, "--force").exit_code == 0  # its own earlier output
    assert (out / "model_index.json").stat().st_mtime_ns >= first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or set-aside folder left

    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    result = run(sd1_model, a, "-o", other, "--force")
    assert result.exit_code == 2 and "not a pipeline folder" in result.output
    assert result.output.strip().count("\n") == 0, result.output  # no transformers notes around the error
    assert (other / "precious.txt").read_text() == "keep"

    (out / "lora.safetensors").write_bytes(a.read_bytes())  # a pipeline folder that holds the input
    monkeypatch.chdir(out)
    result = run(sd1_model, "lora.safetensors", "-o", ".", "--force")
    assert result.exit_code == 2 and "holds the input lora.safetensors" in result.output, result.output
    assert (out / "lora.safetensors").read_bytes() == a.read_bytes()


def test_force_never_overwrites_an_input(two_loras, tmp_path):
    from lora_kit.cli import convert, resize

    a, b = two_loras
    link = tmp_path / "same.safetensors"
    os.link(a, link)  # another name for the same file
    before = a.read_bytes()
    for cmd, args in [
        (resize, [a, "--rank", "2", "-o", a, "--force"]),
        (merge, [a, b, "-o", b, "--force"]),
        (merge, [a, b, "-o", link, "--force"]),
        (convert, [a, "--to", "peft", "-o", a, "--force"]),
    ]:
        result = CliRunner().invoke(cmd.main, [str(x) for x in args])
        assert result.exit_code == 2 and "is the input" in result.output, (args, result.output)
        assert result.output.strip().count("\n") == 0
    assert a.read_bytes() == before


@pytest.mark.parametrize("name", ["convert", "extract", "generate", "inspect", "merge", "ppim", "resize", "train"])
def test_usage_errors_are_one_line(name):
    import importlib

    cmd = importlib.import_module(f"lora_kit.cli.{name}").main
    result = CliRunner().invoke(cmd, ["--no-such-flag"])
    assert result.exit_code == 2 and result.output.startswith("error: No such option '--no-such-flag'"), result.output
    assert result.output.strip().count("\n") == 0
    assert CliRunner().invoke(cmd, ["--help"]).exit_code == 0


def test_force_never_writes_into_an_input_folder(two_loras, sd1_model, tmp_path):
    """A model or dataset folder is an input as a whole: no output may land in it, even with --force."""
    from lora_kit.cli import convert, extract, train

    a, _ = two_loras
    weights = sd1_model / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.txt").write_text("a caption")
    config = tmp_path / "run.config.toml"
    config.write_text(f'model = "{sd1_model}"\ndata = "{data}"\n')
    for cmd, args in [
        (extract, [sd1_model, sd1_model, "-o", weights, "--force"]),
        (convert, [a, "--to", "peft", "--model", sd1_model, "-o", weights, "--force"]),
        (train, ["--model", sd1_model, "--data", data, "-o", data / "x.txt", "--force"]),
        (train, ["--config", config, "-o", tmp_path / "run.safetensors", "--force"]),  # would rewrite run.config.toml
    ]:
        result = CliRunner().invoke(cmd.main, [str(x) for x in args])
        assert result.exit_code == 2 and "the input" in result.output, (args, result.output)
        assert result.output.strip().count("\n") == 0
    assert weights.read_bytes() == before and (data / "x.txt").read_text() == "a caption"
    assert config.read_text().startswith("model = ")


def test_merge_and_resize_write_the_dtype_they_were_given(two_loras, tmp_path):
    from lora_kit.cli import resize
    from safetensors.torch import load_file, save_file

    from lora_kit.formats.files import read_header

    def half(path):
        out = tmp_path / f"{path.stem}16.safetensors"
        save_file({k: t.half() for k, t in load_file(path).items()}, out, metadata=read_header(path)[1])
        return out

    a, b = map(half, two_loras)
    dtypes = lambda path: {v["dtype"] for k, v in read_header(path)[0].items() if ".lora_" in k}  # noqa: E731
    given = dtypes(a)
    assert given == {"F16"} and dtypes(b) == given
    for cmd, args in [(resize, [a, "--rank", "2"]), (merge, [a, b])]:
        out = tmp_path / f"{cmd.__name__.rsplit('.', 1)[-1]}.safetensors"
        assert CliRunner().invoke(cmd.main, [*map(str, args), "-o", str(out)]).exit_code == 0
        assert dtypes(out) == given
        out32 = out.with_suffix(".fp32.safetensors")
        assert CliRunner().invoke(cmd.main, [*map(str, args), "--dtype", "fp32", "-o", str(out32)]).exit_code == 0
        assert dtypes(out32) == {"F32"}


def test_collapse_into_an_fp16_model_writes_fp16_base_plus_weight_times_delta(two_loras, tmp_path):
    """diffusers opens an fp16 folder's UNet and VAE in fp32: the written pipeline must hold the model's own dtype
    (not twice its size), each collapsed weight == (base + 0.8 delta in fp32) rounded once, the input untouched."""
    import hashlib

    import torch
    from conftest import build_pipeline
    from diffusers import DiffusionPipeline

    from lora_kit import ops
    from lora_kit.formats import read
    from lora_kit.state import modules

    a, _ = two_loras
    model, out = tmp_path / "model", tmp_path / "merged"
    build_pipeline("sd1", str(tmp_path / "tok")).to(torch.float16).save_pretrained(model)
    digest = lambda: {p: hashlib.md5(p.read_bytes()).hexdigest() for p in model.rglob("*") if p.is_file()}  # noqa: E731
    before = digest()
    result = CliRunner().invoke(merge.main, [str(model), str(a), "--alpha", "0.8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert digest() == before
    for f in out.rglob("*.safetensors"):
        assert {e["dtype"] for k, e in files.read_header(f)[0].items() if k != "__metadata__"} == {"F16"}, f
    base, merged = DiffusionPipeline.from_pretrained(model), DiffusionPipeline.from_pretrained(out)
    state, _ = read(a, base)
    for stem, parts in modules(state).items():
        comp, path = stem.split(".", 1)
        w = getattr(base, comp).get_submodule(path).weight.detach()
        expected = (w.float() + 0.8 * ops.delta(parts)).half().float()
        got = getattr(merged, comp).get_submodule(path).weight.detach().float()
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
