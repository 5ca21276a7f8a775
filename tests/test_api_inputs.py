"""The Python API on bad input: one LoraKitError naming the argument, and the pipeline exactly as it was."""

import pytest
import torch
from conftest import forward_main, forward_text, randomize_adapters
from safetensors.torch import load_file, save_file

import lora_kit
import lora_kit.embeddings
from lora_kit.errors import LoraKitError
from lora_kit.inject import adapter_names, inject_lora


def _state(pipe) -> dict:
    """Every adapter's weight and the UNet's output: what a failed call must leave unchanged."""
    weights = {
        (p, n): a.weight for p, w in lora_kit.lora_modules(pipe.unet) for n, a in w.adapters.items()
    }  # fmt: skip
    return {"weights": weights, "names": adapter_names(pipe.unet), "out": forward_main(pipe.unet)}


def _same(a: dict, b: dict) -> None:
    assert a["weights"] == b["weights"] and a["names"] == b["names"]
    assert torch.equal(a["out"], b["out"])


def test_replace_with_a_bad_file_keeps_the_old_adapter(make_pipe, two_loras, tmp_path):
    a, _ = two_loras
    pipe = make_pipe("sd1")
    lora_kit.load(pipe, a, name="x")
    before = _state(pipe)
    tensors = load_file(a)
    key = next(k for k in tensors if k.startswith("lora_unet") and k.endswith("lora_up.weight"))
    tensors[key] = torch.cat([tensors[key], tensors[key][:1]])  # one output row too many
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad)
    with pytest.raises(LoraKitError, match="does not fit the model"):
        lora_kit.load(pipe, bad, name="x", replace=True)
    _same(before, _state(pipe))


def test_replace_whose_tokens_clash_keeps_the_old_adapter(make_pipe, two_loras, tmp_path):
    """load(replace=True) checks the new file's tokens before the old adapter goes: a token that another adapter
    owns is refused with the old adapter, its tokens and the outputs as they were; the replaced adapter's own
    tokens are free for the new file."""
    a, _ = two_loras
    g = torch.Generator().manual_seed(0)
    vectors = {n: torch.randn(n, 32, generator=g) for n in (1, 2, 3)}
    save_file({"<aa>": vectors[2]}, tmp_path / "ti_a.safetensors")
    save_file({"<bb>": vectors[3]}, tmp_path / "ti_b.safetensors")
    (tmp_path / "style.safetensors").write_bytes(a.read_bytes())  # a LoRA whose pivotal sidecar takes <bb>
    save_file({"<bb>": vectors[1]}, tmp_path / "style.emb.safetensors")
    pipe = make_pipe("sd1")
    lora_kit.load(pipe, tmp_path / "ti_a.safetensors", name="x")
    lora_kit.load(pipe, tmp_path / "ti_b.safetensors", name="y")
    lora_kit.load(pipe, a, name="z", weight=0.8)
    before, vocab, text = _state(pipe), pipe.tokenizer.get_added_vocab(), forward_text(pipe.text_encoder)
    for name, path in [("x", "ti_b.safetensors"), ("z", "style.safetensors")]:
        with pytest.raises(LoraKitError, match="'<bb>' already exists"):
            lora_kit.load(pipe, tmp_path / path, name=name, replace=True)
        _same(before, _state(pipe))
        assert pipe.tokenizer.get_added_vocab() == vocab and torch.equal(forward_text(pipe.text_encoder), text)
        assert lora_kit.api._names(pipe) == ["z", "x", "y"]
    save_file({"<aa>": vectors[1]}, tmp_path / "ti_a2.safetensors")  # x's own token, now one vector
    lora_kit.load(pipe, tmp_path / "ti_a2.safetensors", name="x", replace=True)
    assert "<aa>_1" not in pipe.tokenizer.get_added_vocab()
    assert torch.equal(lora_kit.embeddings.get_embedding(pipe.tokenizer, pipe.text_encoder, "<aa>"), vectors[1])


@pytest.mark.parametrize("weight", ["abc", None, float("nan"), float("inf")])
def test_a_bad_load_weight_changes_nothing(make_pipe, two_loras, weight):
    a, _ = two_loras
    pipe = make_pipe("sd1")
    before = _state(pipe)
    with pytest.raises(LoraKitError, match="weight"):
        lora_kit.load(pipe, a, name="w", weight=weight)
    _same(before, _state(pipe))


@pytest.mark.parametrize(
    "weights", [{"a": 0.3, "zzz": 1.0}, {"a": {"unet": 0.2, "unte": 1.0}}, {"a": float("nan")}, {"a": "0.5,x"}, None]
)
def test_set_weights_sets_all_or_nothing(make_pipe, two_loras, weights):
    a, _ = two_loras
    pipe = make_pipe("sd1")
    lora_kit.load(pipe, a, name="a")
    before = _state(pipe)
    with pytest.raises(LoraKitError):
        lora_kit.set_weights(pipe, weights)
    _same(before, _state(pipe))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"targets": "locon", "rank": 2, "conv_rank": 0}, "give a whole number >= 1"),
        ({"rank": 2.5}, "give a whole number >= 1"),
        ({"rank": 2, "alpha": float("nan")}, "not a finite number"),
        ({"rank": 2, "alpha": -1.0}, "it must be above 0"),
        ({"rank": 2, "dropout": 2.0}, "it must be in"),
    ],
)
def test_inject_checks_everything_before_it_wraps_a_layer(make_pipe, kwargs, message):
    pipe = make_pipe("sd1")
    with pytest.raises(LoraKitError, match=message):
        inject_lora(pipe.unet, **kwargs)
    assert not list(lora_kit.lora_modules(pipe.unet))


def test_a_schedule_giving_nan_stops_the_call_naming_the_adapter(make_pipe, two_loras):
    a, _ = two_loras
    pipe = make_pipe("sd1")
    lora_kit.load(pipe, a, name="a")
    lora_kit.schedule(pipe, {"a": lambda progress, step, t: float("nan") if step == 1 else 1.0})
    with pytest.raises(LoraKitError, match="the schedule of 'a' at step 1"):
        pipe("a photo", num_inference_steps=3, output_type="latent")


def test_save_takes_dtype_names_and_refuses_what_it_cannot_write(make_pipe, tmp_path):
    pipe = make_pipe("sd1")
    inject_lora(pipe.unet, "attn", rank=2)
    randomize_adapters(pipe)
    path = lora_kit.save(pipe, tmp_path / "a.safetensors", dtype="fp16")
    assert {t.dtype for k, t in load_file(path).items() if "lora_" in k and not k.endswith("alpha")} == {torch.float16}
    for dtype in (torch.int8, "bogus"):
        with pytest.raises(LoraKitError, match="fp16, bf16, fp32"):
            lora_kit.save(pipe, tmp_path / "b.safetensors", dtype=dtype)
    with pytest.raises(LoraKitError, match="writes safetensors"):
        lora_kit.save(pipe, tmp_path / "c.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_the_toy_model_opens_in_one_dtype():
    from lora_kit.models import open_pipeline

    pipe = open_pipeline("toy")
    assert {p.dtype for c in (pipe.unet, pipe.text_encoder, pipe.vae) for p in c.parameters()} == {torch.float32}


def test_train_is_exported_as_contracted(tmp_path):
    """CONTRACTS: train(config) is exported from lora_kit, like schedule, although both also name a submodule."""
    cfg = lora_kit.TrainConfig(model="toy", data=str(tmp_path / "missing"), output=str(tmp_path / "x.safetensors"))
    with pytest.raises(LoraKitError, match="no such data folder"):
        lora_kit.train(cfg)
    assert not (tmp_path / "x.safetensors").exists()


def test_more_bad_arguments_are_one_error_each(make_pipe, two_loras, tmp_path):
    a, _ = two_loras
    pipe = make_pipe("sd1")
    lora_kit.load(pipe, a, name="a")
    before, out = _state(pipe), tmp_path / "out"
    out.mkdir()
    calls = [
        (lambda: list(lora_kit.lora_parameters(pipe)), "is not a torch module"),  # a pipeline for a module
        (lambda: lora_kit.remove_lora(pipe), "is not a torch module"),
        (lambda: inject_lora(pipe, "attn", rank=2), "is not a torch module"),
        (lambda: lora_kit.merge([], out / "m.safetensors", []), "at least one"),
        (lambda: lora_kit.resize(a, out / "r.safetensors", dynamic=("sv_fro", "0.5")), "must be a number"),
        (lambda: lora_kit.resize(a, out / "r.safetensors", dynamic=("sv_fro",)), "give \\(method, number\\)"),
        (lambda: lora_kit.save(pipe, out / "s.safetensors", metadata="x"), "give a dict"),
        (lambda: lora_kit.save(pipe, out / "s.safetensors", metadata={"k": object()}), "neither text nor"),
        (lambda: lora_kit.collapse(pipe, "zzz"), "no adapter named 'zzz'"),
        (lambda: lora_kit.unschedule(pipe, "zzz"), "no schedule for an adapter named 'zzz'"),
    ]
    for call, message in calls:
        with pytest.raises(LoraKitError, match=message):
            call()
    _same(before, _state(pipe))
    assert not list(out.iterdir())


def test_train_requires_model_data_and_output(tmp_path):
    cfg = lora_kit.TrainConfig(model="toy", data=str(tmp_path), output="")
    with pytest.raises(LoraKitError, match="output is ''; it is required"):
        lora_kit.train(cfg)
