"""Bad inputs to the file tools: one line naming the file (or flag) and the problem, exit 2, nothing written, inputs
untouched, and checked before any model is opened. Files are built from small tensors, not pipelines."""

import json
import struct

import pytest
import torch
from click.testing import CliRunner
from lora_kit.cli import convert, extract, inspect, merge, resize
from safetensors.torch import save_file

import lora_kit
from lora_kit import LoraKitError, ops, tools

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # real SD1.5 module names and sizes
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # (its 768 input says: SD1.5)
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


def _module(stem, down, up, alpha=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {f"{stem}.lora_down.weight": torch.randn(down, generator=g) * 0.1,
           f"{stem}.lora_up.weight": torch.randn(up, generator=g) * 0.1}  # fmt: skip
    if alpha is not None:
        out[f"{stem}.alpha"] = torch.full(alpha, 2.0)
    return out


def _good():
    return {**_module(Q, (4, 320), (320, 4)), **_module(K, (4, 768), (320, 4), seed=1),
            **_module(CONV, (2, 320, 3, 3), (320, 2, 1, 1), seed=2)}  # fmt: skip


def _without(key):
    return {k: t for k, t in _good().items() if k != key}


MALFORMED = {  # file -> (tensors, what the error says)
    "no_up": (_without(f"{Q}.lora_up.weight"), f"{Q}: has lora_down and alpha but no lora_up"),
    "no_down": (_without(f"{CONV}.lora_down.weight"), f"{CONV}: has lora_up and alpha but no lora_down"),
    "ranks": ({**_good(), **_module(Q, (3, 320), (320, 4))}, f"{Q}: lora_up has rank 4 but lora_down has rank 3"),
    "mixed": ({**_good(), **_module(Q, (4, 37), (32, 4, 1, 1))}, f"{Q}: lora_up has shape (32, 4, 1, 1)"),
    "up_kxk": ({**_good(), **_module(CONV, (2, 320, 3, 3), (320, 2, 3, 3))}, f"{CONV}: lora_up has shape (320, 2, 3"),
    "down_3d": ({**_good(), **_module(Q, (4, 320, 1), (320, 4))}, f"{Q}: lora_down has shape (4, 320, 1)"),
    "alpha": ({**_good(), **_module(Q, (4, 320), (320, 4), alpha=(4,))}, f"{Q}: alpha has shape (4,)"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{name: path} of a good SD1.5 kohya file and of every malformed one."""
    folder = tmp_path_factory.mktemp("loras")
    out = {"good": folder / "good.safetensors"}
    save_file(_good(), out["good"])
    for name, (tensors, _) in MALFORMED.items():
        out[name] = folder / f"{name}.safetensors"
        save_file(tensors, out[name])
    return out


def _fails(cmd, args, *expected):
    """Run a command that must refuse its input: exit 2, one line on stderr with every `expected` part, no stdout,
    no output file, inputs unchanged."""
    paths = [a for a in args if hasattr(a, "read_bytes") and a.is_file()]
    before = {p: p.read_bytes() for p in paths}
    result = CliRunner().invoke(cmd.main, [str(a) for a in args])
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert result.stdout == "" and result.stderr.count("\n") == 1, (args, result.output)
    assert result.stderr.startswith("error: ") and all(e in result.stderr for e in expected), (args, result.stderr)
    assert all(p.read_bytes() == b for p, b in before.items())
    return result.stderr


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_module_is_refused_by_every_tool(files, tmp_path, name):
    bad, message = files[name], MALFORMED[name][1]
    out = tmp_path / "out.safetensors"
    _fails(resize, [bad, "--rank", "1", "-o", out], str(bad), message)
    _fails(merge, [files["good"], bad, "-o", out], str(bad), message)
    _fails(convert, [bad, "--to", "peft", "-o", out], str(bad), message)
    _fails(inspect, [bad], str(bad), message)  # the same check, on the shapes in the header
    assert not out.exists()


def test_peft_file_missing_a_factor(make_pipe, tmp_path):
    """A PEFT file whose module has lora_B but no lora_A (this crashed the PEFT reader with KeyError 'down')."""
    path = tmp_path / "peft.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 2)}, path)
    with pytest.raises(LoraKitError, match=r"peft.safetensors: unet.down_blocks.0.attentions.0.proj_in: .* lora_down"):
        lora_kit.load(make_pipe("sd1"), path)
    _fails(merge, [path, path, "-o", tmp_path / "o.safetensors"], str(path), "no lora_down")


def test_convert_checks_shapes_against_the_model(files, tmp_path):
    """Well-formed factors that fit no layer of --model: the check lora_kit.load makes. Without --model the shipped
    architecture maps names only (a smaller model of the family, such as the toy model, has other sizes)."""
    path = tmp_path / "wrong.safetensors"
    save_file({**_good(), **_module(Q, (4, 37), (320, 4))}, path)
    out = tmp_path / "out.safetensors"
    message = "down (4, 37) / up (320, 4) do not fit a layer with weight"
    _fails(convert, [path, "--to", "peft", "--model", "toy", "-o", out], str(path), "attn1.to_q", message)
    model = tmp_path / "model"
    _fails(convert, [path, "--to", "peft", "--model", model, "-o", out], "no such folder")
    assert CliRunner().invoke(convert.main, [str(files["good"]), "--to", "peft", "-o", str(out)]).exit_code == 0


@pytest.mark.parametrize(
    "cmd, flag_args",
    [(resize, ["--rank", "0"]), (resize, ["--rank", "-3"]), (resize, ["--rank", "2", "--conv-rank", "-1"]),
     (merge, ["--rank", "0"]), (merge, ["--rank", "-3"]), (merge, ["--rank", "2", "--conv-rank", "0"]),
     (extract, ["--rank", "0"]), (extract, ["--rank", "-3"]), (extract, ["--conv-rank", "-1"])],
)  # fmt: skip
def test_ranks_below_one_are_refused(files, tmp_path, cmd, flag_args):
    inputs = {resize: [files["good"]], merge: [files["good"], files["good"]], extract: ["toy", "toy"]}[cmd]
    flag = flag_args[-2]
    _fails(cmd, [*inputs, *flag_args, "-o", tmp_path / "o.safetensors"], f"'{flag}'", "x>=1")


def test_library_refuses_ranks_below_one():
    for kwargs in ({"rank": 0}, {"rank": 2, "conv_rank": -1}, {"rank": True}):
        with pytest.raises(LoraKitError, match=f"{next(reversed(kwargs))} must be a whole number >= 1"):
            ops.check_ranks(**kwargs)


@pytest.mark.parametrize(
    "rule, message",
    [("sv_ratio=-1", "sv_ratio must be a finite number >= 1"), ("sv_ratio=0.5", "sv_ratio must be"),
     ("sv_ratio=inf", "sv_ratio must be"), ("sv_fro=2", "sv_fro must be in (0, 1]"), ("sv_fro=nan", "got nan"),
     ("sv_cumulative=0", "sv_cumulative must be in (0, 1]"), ("foo=1", "'foo' is not one of"),
     ("sv_fro", "expected sv_ratio=N")],
)  # fmt: skip
def test_dynamic_rules_are_checked_before_any_work(files, tmp_path, rule, message):
    err = _fails(resize, [files["good"], "--dynamic", rule, "-o", tmp_path / "o.safetensors"], f"--dynamic '{rule}'",
                 message)  # fmt: skip
    assert "resize" not in err  # no progress bar was started
    with pytest.raises(LoraKitError, match="sv_fro must be"):  # the library checks too, before reading the file
        tools.resize(tmp_path / "missing.safetensors", tmp_path / "o.safetensors", dynamic=("sv_fro", 2.0))


@pytest.mark.parametrize(
    "args, flag",
    [(["--alpha", "nan"], "--alpha"), (["--alpha", "inf"], "--alpha"), (["--weights", "nan,1"], "--weights"),
     (["--weights", "inf,1"], "--weights"), (["--weights", "1,-inf"], "--weights")],
)  # fmt: skip
def test_merge_refuses_non_finite_weights(files, tmp_path, args, flag):
    _fails(merge, [files["good"], files["good"], *args, "-o", tmp_path / "o.safetensors"], flag, "finite")
    with pytest.raises(LoraKitError, match="finite"):
        ops.merge([_good(), _good()], [float("nan"), 1.0])


def test_merge_refuses_weights_that_are_all_zero(files, tmp_path):
    """A merge at weights 0,0 would write a file with no module, which every reader then refuses."""
    _fails(merge, [files["good"], files["good"], "--weights", "0,0", "-o", tmp_path / "o.safetensors"], "all 0")
    with pytest.raises(LoraKitError, match="all 0"):
        ops.merge([_good(), _good()], [0.0, -0.0])


def test_merge_shape_clash_names_both_files(files, tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({**_good(), **_module(Q, (4, 37), (320, 4))}, other)
    _fails(merge, [files["good"], other, "-o", tmp_path / "o.safetensors"], Q, str(files["good"]), str(other),
           "(320, 320) vs (320, 37)")  # fmt: skip


def test_extract_refuses_an_unknown_preset_before_opening_models(tmp_path):
    missing = tmp_path / "no_model"  # never opened: the preset is checked first
    _fails(extract, [missing, missing, "--targets", "bogus", "-o", tmp_path / "o.safetensors"], "'bogus'", "presets:")


def test_extract_models_of_different_sizes(tmp_path):
    from conftest import UNET_SD1, build_pipeline
    from diffusers import UNet2DConditionModel

    small = build_pipeline("sd1", str(tmp_path / "tok"))
    small.save_pretrained(tmp_path / "small")
    big = build_pipeline("sd1", str(tmp_path / "tok"))
    big.unet = UNet2DConditionModel(**dict(UNET_SD1, block_out_channels=(64, 64)))
    big.save_pretrained(tmp_path / "big")
    expected = "differ at unet.down_blocks.0.attentions.0.proj_in: (32, 32, 1, 1) vs (64, 64, 1, 1)"
    args = [tmp_path / "small", tmp_path / "big", "-o", tmp_path / "o.safetensors"]
    _fails(extract, args, str(tmp_path / "small"), str(tmp_path / "big"), expected)


def _raw(path, header, data=b"\0" * 4):
    """A safetensors file written by hand (for headers the library would refuse to write)."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_inspect_refuses_what_the_other_tools_refuse(tmp_path):
    alpha = {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}
    plain, empty, loha = tmp_path / "plain.safetensors", tmp_path / "empty.safetensors", tmp_path / "loha.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, plain)
    save_file({}, empty)
    save_file({f"{Q}.hada_w1_a": torch.zeros(2, 2), f"{Q}.alpha": torch.tensor(1.0)}, loha)
    cases = [
        (plain, "not a LoRA file lora_kit knows (keys such as conv.weight)"),
        (empty, "not a LoRA file lora_kit knows (it holds no tensors)"),
        (loha, "LoHa module lacks hada_w1_b"),  # (a malformed one: LoHa files are read)
        (_raw(tmp_path / "q9.safetensors", {f"{Q}.alpha": dict(alpha, dtype="Q9")}), "dtype 'Q9'"),
        (_raw(tmp_path / "m1.safetensors", {"__metadata__": "hi", f"{Q}.alpha": alpha}), "__metadata__ is a str"),
        (_raw(tmp_path / "m2.safetensors", {"__metadata__": {"a": "x", "b": 3}, f"{Q}.alpha": alpha}), "'b' is not"),
    ]
    for path, message in cases:
        _fails(inspect, [path, "--metadata"], str(path), message)
    for path, message in cases[1:3]:  # and the readers say the same
        _fails(merge, [path, path, "-o", tmp_path / "o.safetensors"], str(path), message)


def test_inspect_reads_legacy_and_peft_keys(tmp_path):
    legacy = tmp_path / "legacy.safetensors"
    save_file({"unet:0:up": torch.zeros(32, 2), "unet:0:down": torch.zeros(2, 32)}, legacy,
              metadata={"unet": json.dumps(["Attention"])})  # fmt: skip
    info = lora_kit.inspect(legacy)
    assert info["format"] == "legacy" and info["modules"] == 1 and info["components"] == {"unet": 1}
    peft = tmp_path / "peft.safetensors"
    save_file({"unet.a.lora_A.weight": torch.zeros(2, 32), "unet.a.lora_B.weight": torch.zeros(32, 2)}, peft)
    info = lora_kit.inspect(peft)
    assert info["format"] == "peft" and info["ranks"] == {"2": 1}


def _peft(path, config):
    """An SD1.5 PEFT file whose lora_adapter_metadata is `config` (a JSON text)."""
    tensors = {}
    for stem, (down, up) in {Q: ((4, 320), (320, 4)), K: ((4, 768), (320, 4))}.items():
        path_ = stem.removeprefix("lora_unet_").replace("_", ".")  # close enough: the header fails first
        parts = _module(stem, down, up, alpha=None)
        tensors[f"unet.{path_}.lora_A.weight"] = parts[f"{stem}.lora_down.weight"]
        tensors[f"unet.{path_}.lora_B.weight"] = parts[f"{stem}.lora_up.weight"]
    save_file(tensors, path, metadata={"lora_adapter_metadata": config})
    return path


@pytest.mark.parametrize(
    "config, message",
    [('{"unet.r": 4, "unet.lora_alpha": null}', "unet.lora_alpha is null; expected a finite number"),
     ('{"unet.r": 4, "unet.lora_alpha": "x"}', 'unet.lora_alpha is "x"'),
     ('{"unet.r": 4, "unet.lora_alpha": NaN}', "unet.lora_alpha is NaN"),
     ('{"unet.r": true}', "unet.r is true"),
     ("[1, 2]", "lora_adapter_metadata header is a JSON list, not an object"),
     ('{"unet.lora_alpha": 4, "unet.alpha_pattern": [1]}', "unet.alpha_pattern is [1]; expected an object"),
     ('{"unet.lora_alpha": 4, "unet.alpha_pattern": {"(": 3}}', "alpha_pattern key '(' is not a regular expression"),
     ('{"unet.lora_alpha": 4, "unet.alpha_pattern": {"to_q": "2"}}', "alpha_pattern['to_q'] is \"2\""),
     ('{"unet.lora_alpha": 4, "unet.use_rslora": "yes"}', "use_rslora is \"yes\"; expected true or false")],
)  # fmt: skip
def test_bad_peft_adapter_metadata_is_one_line_in_every_tool(tmp_path, config, message):
    bad, out = _peft(tmp_path / "peft.safetensors", config), tmp_path / "out.safetensors"
    _fails(inspect, [bad], str(bad), message)
    _fails(resize, [bad, "--rank", "1", "-o", out], str(bad), message)
    _fails(merge, [bad, bad, "-o", out], str(bad), message)
    _fails(convert, [bad, "--to", "kohya", "-o", out], str(bad), message)
    with pytest.raises(LoraKitError, match="lora_adapter_metadata"):
        lora_kit.inspect(bad)
    assert not out.exists()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_non_float_factors_are_refused_by_every_tool(make_pipe, tmp_path, dtype):
    """An integer lora_up was read as a LoRA (whole-number deltas); alphas may stay integers (diffusers' int64)."""
    tensors = _good()
    tensors[f"{Q}.lora_up.weight"] = tensors[f"{Q}.lora_up.weight"].to(dtype)
    tensors[f"{K}.alpha"] = torch.tensor(2, dtype=torch.int64)
    bad, out = tmp_path / "int.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, bad)
    message = f"tensor {Q}.lora_up.weight is "
    _fails(inspect, [bad], str(bad), message, "adapter factors must be floating point")
    _fails(resize, [bad, "--rank", "1", "-o", out], str(bad), message, "floating point")
    save_file(_good(), good := tmp_path / "good.safetensors")
    _fails(merge, [good, bad, "-o", out], str(bad), message)
    _fails(convert, [bad, "--to", "peft", "-o", out], str(bad), message)
    with pytest.raises(LoraKitError, match=r"int.safetensors: tensor unet\..*attn1\.to_q\.lora_up\.weight is .*float"):
        lora_kit.load(make_pipe("sd1"), bad)
    assert not out.exists()
    tensors[f"{Q}.lora_up.weight"] = tensors[f"{Q}.lora_up.weight"].float()  # integer alphas alone are fine
    save_file(tensors, bad)
    assert lora_kit.inspect(bad)["modules"] == 3


def test_headers_safetensors_refuses_are_refused_by_inspect(tmp_path):
    """lora-inspect reads the header itself: it refuses what safetensors (and so every other tool) refuses."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def alpha(start, shape=(), dtype="F32"):
        return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, start + 4]}

    down, up = f"{Q}.lora_down.weight", f"{Q}.lora_up.weight"
    cases = {  # name -> (header, data, what the error says)
        "overlap": ({down: alpha(0, [1, 1]), up: alpha(0, [1, 1])}, 4, "overlaps another tensor"),
        "gap": ({down: alpha(0, [1, 1]), up: alpha(8, [1, 1])}, 12, "leaves 4 bytes unused before it"),
        "start": ({down: alpha(4, [1, 1]), up: alpha(8, [1, 1])}, 12, "leaves 4 bytes unused before it"),
        "trailing": ({down: alpha(0, [1, 1]), up: alpha(4, [1, 1])}, 12, "the tensors cover 8 of its 12 data bytes"),
        "bool_shape": ({down: alpha(0, [True, 1]), up: alpha(4, [1, 1])}, 8, f"entry '{down}'"),
        "float_shape": ({down: alpha(0, [1.0, 1]), up: alpha(4, [1, 1])}, 8, f"entry '{down}'"),
        "bool_offset": ({down: {**alpha(0, [1, 1]), "data_offsets": [False, 4]}, up: alpha(4, [1, 1])}, 8, "entry"),
        "three_offsets": ({down: {**alpha(0, [1, 1]), "data_offsets": [0, 4, 4]}, up: alpha(4, [1, 1])}, 8, "entry"),
    }
    for name, (header, size, message) in cases.items():
        path = _raw(tmp_path / f"{name}.safetensors", header, b"\0" * size)
        with pytest.raises(SafetensorError):  # what every other tool meets
            load_file(path)
        _fails(inspect, [path], str(path), "corrupt safetensors header", message)
        _fails(resize, [path, "--rank", "1", "-o", tmp_path / "o.safetensors"], str(path), message)
    ok = _raw(tmp_path / "ok.safetensors", {up: alpha(4, [1, 1]), down: alpha(0, [1, 1])}, b"\0" * 8)  # any order
    assert lora_kit.inspect(ok)["modules"] == 1 and load_file(ok)[up].shape == (1, 1)


@pytest.mark.parametrize("content", [b"hello", b"\x80\x02}q\x00X", b"", bytes(range(256))])
def test_a_file_that_is_no_pickle_is_one_line_with_allow_pickle(make_pipe, tmp_path, content):
    """torch.load of bytes that are no pickle fails as KeyError, struct.error, ... (a traceback before)."""
    bad, out = tmp_path / "text.pt", tmp_path / "o.safetensors"
    bad.write_bytes(content)
    _fails(merge, [bad, bad, "--allow-pickle", "-o", out], str(bad))
    _fails(resize, [bad, "--rank", "1", "--allow-pickle", "-o", out], str(bad))
    with pytest.raises(LoraKitError, match="text.pt: "):
        lora_kit.load(make_pipe("sd1"), bad, allow_pickle=True)
    assert not out.exists()


def test_pickled_loras_need_allow_pickle_and_every_reading_command_has_it(files, tmp_path):
    """The refusal says --allow-pickle: lora-merge, -resize, -convert and -generate all take it."""
    from lora_kit.cli import generate
    from safetensors.torch import load_file

    pt, out = tmp_path / "good.pt", tmp_path / "o.safetensors"
    torch.save(_good(), pt)
    _fails(merge, [pt, files["good"], "-o", out], str(pt), "--allow-pickle")
    _fails(resize, [pt, "--rank", "1", "-o", out], str(pt), "--allow-pickle")
    for cmd in (merge, resize, convert, generate):
        assert "--allow-pickle" in CliRunner().invoke(cmd.main, ["--help"]).output
    ok = CliRunner().invoke(merge.main, [str(pt), str(files["good"]), "--allow-pickle", "-o", str(out)])
    assert ok.exit_code == 0, ok.output
    same = tmp_path / "same.safetensors"
    assert CliRunner().invoke(merge.main, [str(files["good"])] * 2 + ["-o", str(same)]).exit_code == 0
    assert load_file(out).keys() == load_file(same).keys()
    assert all(torch.equal(t, load_file(same)[k]) for k, t in load_file(out).items())
    small = tmp_path / "small.safetensors"
    assert CliRunner().invoke(resize.main, [str(pt), "--rank", "1", "--allow-pickle", "-o", str(small)]).exit_code == 0
    cloneofsimo = tmp_path / "list.pt"  # positional factors name no module: a model is needed (lora-convert)
    torch.save([torch.zeros(4, 2), torch.zeros(2, 4)], cloneofsimo)
    other = tmp_path / "other.safetensors"
    _fails(resize, [cloneofsimo, "--rank", "1", "--allow-pickle", "-o", other], str(cloneofsimo), "lora-convert")


@pytest.fixture
def models_not_opened(monkeypatch):
    """The checks under test come before any model is opened."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was opened")

    monkeypatch.setattr("lora_kit.tools.open_pipeline", refuse)


def test_merge_refuses_rank_flags_it_would_ignore(files, tmp_path, models_not_opened):
    """--rank/--conv-rank re-compress a merged LoRA: with a MODEL first (a collapse) they did nothing, and
    --conv-rank without --rank kept the concatenated ranks."""
    out = tmp_path / "out"
    _fails(merge, ["toy", files["good"], "--rank", "2", "-o", out], "--rank re-compresses a merged LoRA; with a MODEL")
    _fails(merge, ["toy", files["good"], "--conv-rank", "1", "-o", out], "--conv-rank re-compresses")
    _fails(merge, [files["good"], files["good"], "--conv-rank", "1", "-o", out], "--conv-rank 1 without --rank")
    with pytest.raises(LoraKitError, match="without --rank"):
        tools.merge([files["good"]] * 2, out, [0.5, 0.5], conv_rank=1)
    assert not out.exists()


def test_input_files_are_checked_before_a_model_opens(files, tmp_path, models_not_opened):
    garbage, pt, out = tmp_path / "garbage.safetensors", tmp_path / "good.pt", tmp_path / "out"
    garbage.write_bytes(b"hello")
    torch.save(_good(), pt)
    missing = tmp_path / "missing.safetensors"
    _fails(merge, ["toy", missing, "-o", out], str(missing), "no such file")
    _fails(merge, ["toy", garbage, "-o", out], str(garbage), "not a safetensors file")
    _fails(merge, ["toy", pt, "-o", out], str(pt), "--allow-pickle")
    _fails(convert, [pt, "--to", "kohya", "--model", "toy", "-o", out], str(pt), "--allow-pickle")
    _fails(convert, [garbage, "--to", "kohya", "--model", "toy", "-o", out], str(garbage), "not a safetensors")
    _fails(extract, ["toy", tmp_path / "no_model", "-o", out], str(tmp_path / "no_model"), "no such folder")
    _fails(extract, ["toy", files["good"], "-o", out], str(files["good"]), "is a LoRA")
    assert not out.exists()


def test_extract_refuses_a_preset_that_matches_no_layer(tmp_path, monkeypatch):
    """`dit` on a UNet selected nothing and was reported as 'TUNED does not differ'; TUNED is not even opened."""
    from lora_kit import models

    opened = []
    monkeypatch.setattr(tools, "open_pipeline", lambda spec, **kw: opened.append(spec) or models.open_pipeline(spec))
    _fails(extract, ["toy", "toy", "--targets", "dit", "-o", tmp_path / "o.safetensors"],
           "no layer of UNet2DConditionModel matches targets 'dit'")  # fmt: skip
    assert opened == ["toy"]


def _with_sidecar(folder, name, embeddings, metadata=None):
    """A good LoRA file `name`.safetensors with the pivotal-tuning sidecar `name`.emb.safetensors."""
    save_file(_good(), folder / f"{name}.safetensors")
    save_file(embeddings, folder / f"{name}.emb.safetensors", metadata=metadata)
    return folder / f"{name}.safetensors"


@pytest.mark.parametrize(
    "embeddings, metadata, message",
    [({"clip_l": torch.ones(1, 64), "clip_g": torch.ones(1, 64)}, {"lora_kit.tokens": "not json"},
      "metadata lora_kit.tokens must be [[token, n], ...]"),
     ({"clip_l": torch.ones(1, 64)}, {"lora_kit.tokens": '[["<x>", 1]]'}, "SDXL embedding without clip_g"),
     ({"clip_l": torch.ones(2, 64), "clip_g": torch.ones(2, 32)}, {"lora_kit.tokens": '[["<x>", 1]]'},
      "lora_kit.tokens counts 1 vectors, the file has 2"),
     ({"<x>": torch.ones(1, 64, dtype=torch.int32)}, None, "must be a float tensor"),
     ({"<y>": torch.ones(1, 32)}, None, "token '<y>' is 32 wide but '<x>' in")],
)  # fmt: skip
def test_merge_checks_pivotal_sidecars_as_load_does(tmp_path, embeddings, metadata, message):
    """lora-merge read sidecars unchecked (JSONDecodeError, KeyError 'clip_g'), and wrote tokens of two widths into
    one sidecar no model loads."""
    ok = _with_sidecar(tmp_path, "ok", {"<x>": torch.ones(1, 64)})
    bad = _with_sidecar(tmp_path, "bad", embeddings, metadata)
    out = tmp_path / "out.safetensors"
    _fails(merge, [ok, bad, "-o", out], str(bad.with_suffix(".emb.safetensors")), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.emb.safetensors", "bad.safetensors",
                                                          "ok.emb.safetensors", "ok.safetensors"]  # fmt: skip


def test_opening_a_model_logs_nothing_of_its_own(tmp_path):
    """diffusers logged 'An error occurred while trying to fetch ...' and 'Defaulting to unsafe serialization'
    before our error line; its verbosity is back afterwards."""
    import logging
    import shutil

    from diffusers.utils import logging as diffusers_logging

    from lora_kit import models

    folder = tmp_path / "model"
    shutil.copytree(models.toy_model(), folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    records, handler = [], logging.Handler()
    handler.emit = records.append
    before = diffusers_logging.get_verbosity()
    for name in ("diffusers", "huggingface_hub", "transformers"):
        logging.getLogger(name).addHandler(handler)
    try:
        with pytest.raises(LoraKitError, match="cannot open the model"):
            models.open_pipeline(str(folder))
    finally:
        for name in ("diffusers", "huggingface_hub", "transformers"):
            logging.getLogger(name).removeHandler(handler)
    assert [r.getMessage() for r in records] == [] and diffusers_logging.get_verbosity() == before
