"""What a hostile user found (issue 30), each now one line or a clear note: a named pipe given as a file, a --size no
memory holds, NaN in a model to extract from, bad LoRAs refused only after a model load, stray warnings from Pillow
and diffusers, misleading rank reports, a caption that is a folder, a full disk found after training, a run killed
between its two outputs, and lora-ppim's --min-size above its --resolution."""

import json
import logging
import os
import shutil
import threading
import warnings

import pytest
import torch
from click.testing import CliRunner
from lora_kit.cli import convert, extract, generate, inspect, merge, ppim, resize
from PIL import Image
from safetensors.torch import load_file, save_file
from test_bad_inputs import _fails  # exit 2, one line naming what is wrong, inputs unchanged

from lora_kit import LoraKitError, ops
from lora_kit.formats import files
from lora_kit.formats.dispatch import precheck
from lora_kit.train import loop
from lora_kit.train.config import TrainConfig

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # SD1.5's names and sizes
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def _module(stem, down, up, seed=0, alpha=2.0):
    g = torch.Generator().manual_seed(seed)
    return {f"{stem}.lora_down.weight": torch.randn(down, generator=g) * 0.1,
            f"{stem}.lora_up.weight": torch.randn(up, generator=g) * 0.1,
            f"{stem}.alpha": torch.tensor(alpha)}  # fmt: skip


def _good(seed=0):
    return {**_module(Q, (4, 320), (320, 4), seed), **_module(K, (4, 768), (320, 4), seed + 1)}


@pytest.fixture
def no_model(monkeypatch):
    """The refusals under test come before any model is opened."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was opened")

    monkeypatch.setattr("lora_kit.models.open_pipeline", refuse)
    monkeypatch.setattr("lora_kit.tools.open_pipeline", refuse)


# 1. a named pipe: open() waits for a writer, so every reader blocked forever


def _returns_within(seconds, fn, fifo):
    """fn()'s result, or a failure when it is still blocked after `seconds` (a writer then opens the pipe and closes
    it, so that the blocked read ends and the test run goes on)."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail(f"blocked reading the named pipe {fifo}")
    return out["result"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_is_refused_instead_of_read(tmp_path):
    fifo, good, out = tmp_path / "x.safetensors", tmp_path / "good.safetensors", tmp_path / "o.safetensors"
    os.mkfifo(fifo)
    save_file(_good(), good)
    message = "not a regular file (a named pipe); expected a .safetensors file"
    for cmd, args in [(inspect, [fifo]), (resize, [fifo, "--rank", "1", "-o", out]), (merge, [good, fifo, "-o", out]),
                      (convert, [fifo, "--to", "peft", "-o", out])]:  # fmt: skip
        run = lambda cmd=cmd, args=args: CliRunner().invoke(cmd.main, list(map(str, args)))  # noqa: E731
        result = _returns_within(60, run, fifo)
        assert result.exit_code == 2 and result.stderr == f"error: {fifo}: {message}\n", result.output
    with pytest.raises(LoraKitError, match="a named pipe"):
        files.read_header(fifo)
    assert not out.exists()


# 2. lora-generate --size: bounded before the model opens; an allocation failure is one line


def test_a_size_beyond_8192_a_side_is_refused_before_the_model_opens(tmp_path, no_model):
    out = tmp_path / "out"
    for size in ["65536x65536", "8200", "512x16384"]:
        args = ["--model", "toy", "--prompt", "a dog", "--size", size, "-o", out]
        _fails(generate, args, f"--size '{size}': at most 8192 pixels a side")
    assert not out.exists()


@pytest.mark.parametrize(
    "error",
    [RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to "
                  "allocate 4563402752 bytes."),
     torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB\nmore lines"), MemoryError()],
)  # fmt: skip
def test_an_allocation_failure_while_generating_is_one_line(make_pipe, tmp_path, monkeypatch, error):
    pipe = make_pipe("sd1")
    monkeypatch.setattr("lora_kit.models.open_pipeline", lambda *args, **kwargs: pipe)

    def allocate(*args, **kwargs):
        raise error

    monkeypatch.setattr(type(pipe), "__call__", allocate)
    out = tmp_path / "out"
    args = ["--model", "sd1", "--prompt", "a dog", "--steps", "1", "--size", "4096", "-o", out, "--device", "cpu"]
    _fails(generate, args, "--size 4096x4096: not enough memory on cpu to generate an image this large")
    assert not out.exists()
    monkeypatch.setattr(type(pipe), "__call__", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    result = CliRunner().invoke(generate.main, list(map(str, args)))
    assert isinstance(result.exception, RuntimeError)  # any other failure is not reported as memory


# 3. lora-extract: NaN or inf in a changed layer


@pytest.fixture(scope="module")
def base_and_tuned(tmp_path_factory):
    """A tiny SD1 folder and two tuned copies: one changed in two layers, one of them NaN; one changed only by NaN."""
    from conftest import build_pipeline

    root = tmp_path_factory.mktemp("extract")
    pipe = build_pipeline("sd1", str(root / "tok"))
    pipe.save_pretrained(root / "base")
    q, k = (
        pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q,
        pipe.unet.mid_block.resnets[0].conv1,
    )
    with torch.no_grad():
        q.weight.add_(0.1)
        k.weight[0, 0, 0, 0] = float("nan")
    pipe.save_pretrained(root / "two")
    with torch.no_grad():
        q.weight.sub_(0.1)
    pipe.save_pretrained(root / "only")
    return root


def test_extract_names_the_model_and_tensor_that_is_not_finite(base_and_tuned, tmp_path):
    """A NaN in a changed layer ended in LinAlgError (a traceback); as the only change, in 'does not differ'."""
    base, out = base_and_tuned / "base", tmp_path / "o.safetensors"
    for tuned in ("two", "only"):
        path = base_and_tuned / tuned
        named = f"{path}: tensor unet.mid_block.resnets.0.conv1.weight holds NaN or inf"
        _fails(extract, [base, path, "--rank", "2", "-o", out], named)
        _fails(extract, [path, base, "--rank", "2", "-o", out], named)
    assert not out.exists()
    w = {"a": torch.ones(4, 4)}
    with pytest.raises(LoraKitError, match="tuned weight a holds NaN or inf"):
        ops.extract(w, {"a": torch.full((4, 4), float("inf"))}, rank=2)


# 4. bad LoRAs refused before the model loads


@pytest.fixture
def loras(tmp_path):
    """{name: path} of LoRAs each refused before a model opens, and of ones that pass."""
    out = {}

    def save(name, tensors, metadata=None):
        out[name] = tmp_path / f"{name}.safetensors"
        save_file(tensors, out[name], metadata=metadata)

    save("sdxl_meta", _good(), {"ss_base_model_version": "sdxl_base_v1-0"})
    save("sdxl_width", _module("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", (4, 2048), (640, 4)))
    save("flux", _module("lora_unet_double_blocks_0_img_attn_qkv", (4, 3072), (9216, 4)))
    nan = _good()
    nan[f"{K}.lora_up.weight"][1, 2] = float("nan")
    save("nan", nan)
    save("inf_alpha", {**_good(), f"{Q}.alpha": torch.tensor(float("inf"))})
    save("rank", {**_good(), **_module(Q, (3, 320), (320, 4))})
    save("good", _good())  # keys alone: an SD1/SD2 LoRA, for an SD1 model (that it does not fit: only the model says)
    out["refused_pickle"] = tmp_path / "refused.pt"
    torch.save({f"{Q}.lora_down.weight": torch.zeros(4, 320), "x": Image.new("RGB", (1, 1))}, out["refused_pickle"])
    return out


REFUSED = {  # name -> what the error says (the model: toy, an SD1.x pipeline)
    "sdxl_meta": "is a LoRA for SDXL, but the model toy is SD1.x",
    "sdxl_width": "is a LoRA for SDXL, but the model toy is SD1.x",
    "flux": "is a LoRA for FLUX.1, but the model toy is SD1.x",
    "nan": f"tensor {K}.lora_up.weight holds NaN or inf",
    "inf_alpha": f"tensor {Q}.alpha holds NaN or inf",
    "rank": f"{Q}: lora_up has rank 4 but lora_down has rank 3",
    "refused_pickle": "cannot load this pickle with weights_only=True",
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_bad_loras_are_refused_before_the_model_loads(loras, tmp_path, no_model, name):
    """Each took a model load (11-14 s) before its one line: lora-merge MODEL LORA, lora-generate, lora-convert."""
    lora, message, out = loras[name], REFUSED[name], tmp_path / "out"
    _fails(merge, ["toy", lora, "--allow-pickle", "-o", out], str(lora), message)
    _fails(generate, ["--model", "toy", "--lora", lora, "--allow-pickle", "--prompt", "a", "-o", out], str(lora),
           message)  # fmt: skip
    _fails(convert, [lora, "--to", "peft", "--model", "toy", "--allow-pickle", "-o", tmp_path / "o.safetensors"],
           str(lora), message)  # fmt: skip
    assert not out.exists() and not (tmp_path / "o.safetensors").exists()


def test_what_the_header_cannot_tell_is_left_to_the_model(loras, tmp_path, no_model):
    """A LoRA whose keys fit either model, an embedding and a hub id pass the checks made without a model."""
    from lora_kit.formats.header import architectures_for
    from lora_kit.models import spec_architecture

    precheck(loras["good"], model="toy")
    precheck(loras["good"], model="owner/hub-model")  # a hub id: its architecture is not told without it
    emb = tmp_path / "emb.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, emb)
    precheck(emb, model="toy")
    assert architectures_for(["transformer.transformer_blocks.0.attn.to_q"], {}) == {"sd3", "flux"}
    assert architectures_for(["unet.down_blocks.0.attentions.0.proj_in"], {}) == {"sd1", "sd2", "sdxl"}
    assert architectures_for(["lora_te1_text_model_encoder_layers_0_mlp_fc1"], {}) == {"sd1", "sd2", "sdxl", "sd3",
                                                                                       "flux"}  # fmt: skip
    assert spec_architecture("toy") == "sd1" and spec_architecture("owner/hub-model") is None


def test_a_single_file_models_architecture_is_read_from_its_header(loras, tmp_path, no_model):
    from lora_kit.models import spec_architecture

    ckpt = tmp_path / "xl.safetensors"  # the keys that tell a checkpoint and its architecture (single_file.sniff)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 8)}, ckpt)  # fmt: skip
    assert spec_architecture(str(ckpt)) == "sdxl"
    sd1 = tmp_path / "sd1.safetensors"
    save_file(_good(), sd1, metadata={"lora_kit.architecture": "sd1"})
    message = f"{sd1}: is a LoRA for SD1.x, but the model {ckpt} is SDXL"
    _fails(merge, [ckpt, sd1, "-o", tmp_path / "o.safetensors"], message)


# 5. smaller: stray warnings, rank reports, a caption that is a folder, the disk space


def test_merge_prints_the_rank_it_kept(tmp_path):
    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "o.safetensors"
    save_file(_good(0), a)
    save_file(_good(5), b)
    result = CliRunner().invoke(merge.main, [str(a), str(b), "--rank", "1000000000", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "re-compressed to rank 8 (8 x2)" in result.stdout and "1000000000" not in result.stdout
    assert {t.shape[0] for k, t in load_file(out).items() if k.endswith("lora_down.weight")} == {8}


def test_resize_to_a_rank_above_every_module_says_nothing_shrank(tmp_path):
    src, out = tmp_path / "a.safetensors", tmp_path / "o.safetensors"
    save_file(_good(), src)
    result = CliRunner().invoke(resize.main, [str(src), "--rank", "99999999", "-o", str(out)])
    assert result.exit_code == 0, result.output
    note = f"every module already has rank <= 99999999: nothing to shrink; {out} holds the same deltas as {src}"
    assert note in result.stdout
    for stem in (Q, K):  # the file is written (as every resize is): each delta unchanged
        parts = {p: load_file(out)[f"{stem}.{p}"] for p in ("lora_down.weight", "lora_up.weight", "alpha")}
        given = _good()
        want = given[f"{stem}.lora_up.weight"] @ given[f"{stem}.lora_down.weight"] * given[f"{stem}.alpha"] / 4
        got = parts["lora_up.weight"].float() @ parts["lora_down.weight"].float() * parts["alpha"] / 4
        torch.testing.assert_close(got, want)
    result = CliRunner().invoke(resize.main, [str(src), "--rank", "2", "-o", str(out), "--force"])
    assert "nothing to shrink" not in result.stdout


def _photos(folder, sizes, caption="a photo of sks dog"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (40 * i, 90, 200)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return folder


def test_a_caption_that_is_a_folder_is_named_as_one(tmp_path):
    from lora_kit.train.data import scan

    data = _photos(tmp_path / "data", [(40, 32)] * 2)
    (data / "img1.txt").unlink()
    (data / "img1.txt").mkdir()
    for prompt in (None, "a photo"):  # it was 'no caption', or the instance prompt taken without a word
        with pytest.raises(LoraKitError, match=r"img1.txt: the caption of img1.png is a folder, not a text file"):
            scan(data, prompt)


def test_pillows_decompression_bomb_warning_does_not_leak(tmp_path, monkeypatch):
    """Images between Pillow's MAX_IMAGE_PIXELS and twice that are read, with a warning on stderr each time (lora-ppim,
    lora-train); they are read without it. Here the limit is lowered so that a small image is such an image."""
    from lora_kit.preprocess.images import decoded
    from lora_kit.train.data import _open, _size

    photo = _photos(tmp_path / "in", [(40, 32)]) / "img0.png"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x32 = 1280 pixels: a warning, not yet an error
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with decoded(photo) as img:
            assert img.size == (40, 32)
        assert _size(photo) == (40, 32) and _open(photo).size == (40, 32)
        result = CliRunner().invoke(ppim.main, [str(photo.parent), str(tmp_path / "out"), "--resolution", "32",
                                                "--min-size", "16", "--token", "sks"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_long_prompt_is_one_note_not_diffusers_echo(make_pipe, tmp_path, monkeypatch):
    """diffusers logs 'The following part of your input was truncated ...' for every image; lora-generate says it
    once, in its own words."""
    pipe = make_pipe("sd1")
    monkeypatch.setattr("lora_kit.models.open_pipeline", lambda *args, **kwargs: pipe)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        prompt = " ".join(["a photo of a red dog"] * 20)  # 120 words: beyond CLIP's 77 tokens
        args = ["--model", "sd1", "--prompt", prompt, "--steps", "1", "--size", "32", "-n", "2", "-o", tmp_path / "o"]
        result = CliRunner().invoke(generate.main, list(map(str, args)))
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert result.exit_code == 0, result.output
    assert not [r for r in records if "truncated" in r.getMessage()]
    note = "note: the prompt is 122 tokens and the text encoders read 77: the rest is ignored"  # (a tiny tokenizer)
    assert result.stderr == "" and result.stdout.count(note) == 1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _photos(tmp_path_factory.mktemp("data") / "images", [(40, 32)] * 2)


def _config(data, tmp_path, **kw):
    return TrainConfig(model="tiny", data=str(data), output=str(tmp_path / "o.safetensors"), steps=2, resolution=32,
                       rank=2, **kw)  # fmt: skip


def test_a_disk_too_full_for_the_outputs_is_found_before_the_first_step(make_pipe, data, tmp_path, monkeypatch):
    """It was found when the run ended, when the LoRA was written: the training was lost."""
    steps = []
    monkeypatch.setattr(loop, "per_sample_loss", lambda *args: steps.append(1) or pytest.fail("a step ran"))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    with pytest.raises(LoraKitError, match=r"o.safetensors: .* has 0.0 MB free, and this run writes about 0.1 MB"):
        loop.train(_config(data, tmp_path), pipe=make_pipe("sd1"))
    assert steps == [] and list(tmp_path.iterdir()) == []


# 6. lora-train's outputs: the LoRA is written last, and a resume finishes a run killed before it


def test_the_lora_is_written_last_and_a_resume_finishes_a_run_killed_before_it(make_pipe, data, tmp_path, monkeypatch):
    replaced, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: replaced.append(os.path.basename(b)) or real(a, b))
    cfg = _config(data, tmp_path, save_every=1)
    loop.train(cfg, pipe=make_pipe("sd1"))
    assert replaced == ["o.config.toml", "o.safetensors"]  # (a checkpoint folder is renamed, not replaced)
    first = load_file(tmp_path / "o.safetensors")
    # killed between the two: the config is there, the LoRA is not (it refused: 'o.config.toml: already exists')
    (tmp_path / "o.safetensors").unlink()
    config = (tmp_path / "o.config.toml").read_text()
    loop.train(_config(data, tmp_path, save_every=1, resume="latest"), pipe=make_pipe("sd1"))
    again = load_file(tmp_path / "o.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert (tmp_path / "o.config.toml").read_text().replace('resume = "latest"\n', "") == config
    # a finished run: resuming it says so
    with pytest.raises(LoraKitError, match=r"o.safetensors: the run has finished .*nothing to resume"):
        loop.train(_config(data, tmp_path, save_every=1, resume="latest"), pipe=make_pipe("sd1"))


# 7. lora-ppim: --min-size no larger than --resolution needs


def test_ppim_min_size_defaults_to_what_the_resolution_needs(tmp_path):
    src = _photos(tmp_path / "photos", [(80, 100), (120, 90), (100, 120)])
    out = tmp_path / "out"
    result = CliRunner().invoke(ppim.main, [str(src), str(out), "--resolution", "64", "--token", "sks"])
    assert result.exit_code == 0, result.output
    kept = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(kept) == 3 and all((e["width"], e["height"]) == (64, 64) for e in kept)
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["min_size"] == 64 and report["rejected"] == []
    result = CliRunner().invoke(ppim.main, [str(src), str(tmp_path / "big"), "--token", "sks"])  # 512: 256 still
    assert result.exit_code == 2 and "too small" in result.output
