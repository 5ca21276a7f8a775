"""A quantized frozen base with adapters beside it (lora_kit/quantize.py, lora-train --quantize-base).

The claims: a wrapper over a quantized layer adds exactly its adapters' contribution to the layer's own quantized
output (training and inference, LoRA and the other kinds), never writing the quantized weight; a layer's quantized
op computes with its dequantized weight (`quantize.dense`), so training over the quantized base equals training over
a float model holding those dequantized weights, to rounding; the written file applies to the unquantized base and
says what it trained on."""

import sys

import pytest
import torch
from conftest import assert_close_scaled
from test_train import write_images
from test_train_checks import config
from torch import nn

from lora_kit import quantize
from lora_kit.errors import LoraKitError
from lora_kit.formats import files
from lora_kit.inject import collapse_lora, inject_lora, lora_parameters
from lora_kit.layers import LoraInjectedLinear
from lora_kit.train import loop

pytest.importorskip("torchao")

SCHEMES = ("fp8", "int8", "nf4")


def quantized_linear(scheme: str, fan_in: int = 64, out: int = 48) -> tuple[nn.Linear, torch.Tensor]:
    """A Linear quantized by `scheme`, and a copy of its float weight from before."""
    torch.manual_seed(0)
    layer = nn.Linear(fan_in, out)
    before = layer.weight.detach().clone()
    assert quantize.quantize_base(nn.Sequential(layer), scheme) == 1
    return layer, before


def bnb_linear(kind: str, fan_in: int = 64, out: int = 64) -> nn.Module:
    """A bitsandbytes layer, as diffusers' BitsAndBytesConfig puts in a pipeline (4-bit NF4 or LLM.int8)."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    ref = nn.Linear(fan_in, out)
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(fan_in, out, quant_type="nf4", compute_dtype=torch.float32)
        layer.weight = bnb.nn.Params4bit(ref.weight.detach().clone(), requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(fan_in, out, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(ref.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    layer.bias = ref.bias
    return layer.to("cpu")  # (bitsandbytes quantizes on the move)


def inner(weight: torch.Tensor) -> list[torch.Tensor]:
    """The tensors a quantized weight keeps its data in (itself for bitsandbytes' packed bytes)."""
    if hasattr(weight, "__tensor_flatten__"):
        return [getattr(weight, n) for n in weight.__tensor_flatten__()[0]]
    return [weight.data]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_linear_holds_its_scheme_and_computes_with_its_dense_weight(scheme):
    """The layer's op equals F.linear on its dequantized weight (to rounding), and that weight is the float one to
    within the scheme's step: int8 and fp8 per-row scales, nf4 a 4-bit code per block of 64."""
    layer, before = quantized_linear(scheme)
    assert quantize.is_quantized(layer.weight) and not layer.weight.requires_grad
    w = quantize.dense(layer)
    assert w.shape == before.shape == quantize.shape(layer) and not quantize.is_quantized(w)
    rows = before.abs().amax(dim=1, keepdim=True)
    step = {"int8": rows / 127, "fp8": rows * 2.0**-3, "nf4": rows}[scheme]  # (e4m3: 3 mantissa bits)
    assert ((w.float() - before).abs() <= step).all()
    x = torch.randn(5, before.shape[1])
    want = nn.functional.linear(x, w.float(), layer.bias)
    assert_close_scaled(layer(x), want, reduction=before.shape[1], scale=(x.abs().max() * w.abs().max()).item())
    assert quantize.describe(nn.Sequential(layer)).endswith("x 1 of 1 linear layers")


def lora_sum(wrapper, x: torch.Tensor) -> torch.Tensor:
    """What the adapters add, from their factors: sum of scale * x down^T up^T."""
    adapters = wrapper.adapters.values()
    return sum(a.scale * nn.functional.linear(nn.functional.linear(x, a.down), a.up) for a in adapters)


@pytest.mark.parametrize("layer_of", [*(lambda s=s: quantized_linear(s)[0] for s in SCHEMES),
                                      lambda: bnb_linear("nf4"), lambda: bnb_linear("int8")],
                         ids=[*SCHEMES, "bnb-nf4", "bnb-int8"])  # fmt: skip
def test_adapters_run_beside_a_quantized_layer(layer_of):
    """Training and inference forwards (fused asked for too) add exactly the adapters' sum to the quantized layer's
    own output; gradients reach the adapters; the quantized weight is never written, and collapse is refused."""
    layer = layer_of()
    x = torch.randn(3, 7, 64)
    with torch.no_grad():  # (bitsandbytes repacks its 4-bit weight for its CPU inference kernel at the first call)
        layer.eval()(x)
    layer.train()
    before = [t.clone() for t in inner(layer.weight)]
    weight = layer.weight
    wrapper = LoraInjectedLinear(layer)
    assert wrapper.max_rank == min(quantize.shape(layer)) == 64 - 16 * (type(layer).__name__ == "Linear")  # (the
    # layer's shape, not its packed data's)
    wrapper.add_adapter("a", rank=4, alpha=2.0)
    wrapper.add_adapter("b", rank=2)
    for a in wrapper.adapters.values():
        nn.init.normal_(a.up, std=0.1)
    with torch.no_grad():
        own = layer(x)
        scale = (own.abs().max() + lora_sum(wrapper, x).abs().max()).item()
    y = wrapper(x)  # training: the per-adapter loop
    assert_close_scaled(y, own + lora_sum(wrapper, x), reduction=64, scale=scale)
    y.square().sum().backward()
    factors = [p for a in wrapper.adapters.values() for p in (a.down, a.up)]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in factors)
    wrapper.eval()  # (bitsandbytes' 4-bit layer takes another kernel for inference on the CPU)
    for fused in (False, True):  # (fused: a quantized layer stays unfused)
        wrapper.fused = fused
        with torch.no_grad():
            assert_close_scaled(wrapper(x), layer(x) + lora_sum(wrapper, x), reduction=64, scale=scale)
    assert wrapper.base.weight is weight
    assert all(torch.equal(a, b) for a, b in zip(inner(layer.weight), before, strict=True))
    with pytest.raises(LoraKitError, match="quantized layer .* dequantize it in place"):
        collapse_lora(nn.Sequential(wrapper))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("kind", ["dora", "lokr"])
def test_other_kinds_over_a_quantized_layer_equal_them_over_its_dense_weight(scheme, kind):
    """DoRA (which reads the weight's norms) and LoKr on a quantized layer: its output and the adapters' gradients
    equal those on a float layer holding the dequantized weight (the composed route reads it dequantized)."""
    from lora_kit import kinds

    layer, _ = quantized_linear(scheme)
    twin = nn.Linear(64, 48)
    with torch.no_grad():
        twin.weight.copy_(quantize.dense(layer).float())
        twin.bias.copy_(layer.bias)
    torch.manual_seed(1)
    parts = kinds.init_parts(kind, (48, 64), 4, 4.0, weight=twin.weight.detach())
    for name, t in parts.items():  # (a trained adapter: no zero factor)
        if t.dim() > 1 and not t.any():
            parts[name] = torch.randn_like(t) * 0.1
    outs, grads = [], []
    for base in (layer, twin):
        wrapper = LoraInjectedLinear(base)
        adapter = wrapper.add_kind("k", {n: t.clone() for n, t in parts.items()})
        x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
        y = wrapper(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([p.grad for p in adapter.parameters() if p.grad is not None])
    scale = outs[1].abs().max().item()
    assert_close_scaled(outs[0], outs[1], reduction=64, scale=scale)
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        assert_close_scaled(a, b, reduction=64 * 4, scale=b.abs().max().item())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("quantize_data") / "images")


def dense_twin(pipe) -> None:
    """Replace every quantized linear weight of the pipeline by its dequantized float copy, in place."""
    for module in (pipe.unet, pipe.text_encoder):
        for layer in module.modules():
            if isinstance(layer, nn.Linear) and quantize.is_quantized(layer.weight):
                layer.weight = nn.Parameter(quantize.dense(layer).detach().clone(), requires_grad=False)


def test_training_over_a_quantized_base_equals_training_over_its_dense_weights(make_pipe, data, tmp_path):
    """lora-train --quantize-base int8 --quantize-text-encoders nf4 (text-encoder adapters too) trains what a float
    pipeline holding the same dequantized weights trains: losses to rounding, weights to what AdamW allows (2 x lr
    per step: summation-order noise can turn a near-zero gradient's update anywhere within +-lr). The file says what
    it trained on and applies to the unquantized base."""
    import lora_kit

    written, losses, metadata = {}, {}, {}
    for run in ("quantized", "dense"):
        (tmp_path / run).mkdir()
        pipe = make_pipe("sd1")
        quantized = quantize.quantize_pipeline(pipe, "int8", "nf4")
        assert set(quantized) == {"unet", "text_encoder"}, quantized
        if run == "dense":
            dense_twin(pipe)
            assert not quantize.quantize_pipeline(pipe)
        cfg = config(data, tmp_path / run, steps=2, save_dtype="fp32", text_encoder_rank=2,
                     quantize_base="int8" if run == "quantized" else "none",
                     quantize_text_encoders="nf4" if run == "quantized" else "none")  # fmt: skip
        losses[run] = []
        loop.train(cfg, pipe=pipe, callbacks=[lambda step, loss, context, run=run: losses[run].append(loss)])
        written[run], metadata[run] = files.load(tmp_path / run / "out.safetensors")
    assert "unet" in metadata["quantized"]["lora_kit.quantized_base"]
    assert metadata["quantized"]["ss_fp8_base"] == "False" and "lora_kit.quantized_base" not in metadata["dense"]
    assert_close_scaled(torch.tensor(losses["quantized"]), torch.tensor(losses["dense"]), reduction=pipe.unet)
    bound = 2 * cfg.lr * cfg.steps
    assert written["quantized"].keys() == written["dense"].keys()
    assert any(k.startswith("lora_te_") for k in written["dense"])
    for key, want in written["dense"].items():
        torch.testing.assert_close(written["quantized"][key], want, atol=bound, rtol=0, msg=key)
    from click.testing import CliRunner
    from lora_kit.cli import inspect as inspect_cli

    shown = CliRunner().invoke(inspect_cli.main, [str(tmp_path / "quantized" / "out.safetensors")]).output
    assert "trained over  a quantized base: unet Int8Tensor x 50 of 50 linear layers; text_encoder NF4Tensor" in shown
    float_pipe = make_pipe("sd1")
    lora_kit.load(float_pipe, tmp_path / "quantized" / "out.safetensors")
    factors = sum(k.startswith("lora_unet_") and not k.endswith(".alpha") for k in written["dense"])
    assert len(list(lora_parameters(float_pipe.unet))) == factors


def test_load_onto_a_quantized_pipeline(make_pipe, tmp_path):
    """lora_kit.load on a pipeline quantized by its owner: the UNet then equals the quantized base plus the adapters
    on the activations, i.e. the same LoRA over a float UNet holding the dequantized weights; weights untouched,
    fuse runs unfused, unload gives the quantized base back exactly."""
    import lora_kit

    source = make_pipe("sd1")
    inject_lora(source.unet, "kohya", rank=4)
    for p in lora_parameters(source.unet):
        p.data.normal_(0, 0.05)
    path = tmp_path / "a.safetensors"
    lora_kit.save(source, path)
    pipes = {"quantized": make_pipe("sd1"), "dense": make_pipe("sd1")}
    for name, pipe in pipes.items():
        quantize.quantize_base(pipe.unet, "nf4")
        if name == "dense":
            dense_twin(pipe)
    unet = pipes["quantized"].unet
    weights = {n: (m.weight, [t.clone() for t in inner(m.weight)]) for n, m in unet.named_modules()
               if isinstance(m, nn.Linear)}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 32, 32, generator=g), torch.tensor([500])
    c = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        base_out = unet(x, t, c).sample
        outs = {}
        for name, pipe in pipes.items():
            lora_kit.load(pipe, path, weight=0.8)
            outs[name] = pipe.unet(x, t, c).sample
        lora_kit.fuse(pipes["quantized"])
        fused = unet(x, t, c).sample
        lora_kit.unload(pipes["quantized"], "a")
        unloaded = unet(x, t, c).sample
    assert not torch.allclose(outs["quantized"], base_out)
    scale = outs["dense"].abs().max().item()
    assert_close_scaled(outs["quantized"], outs["dense"], reduction=pipes["dense"].unet, scale=scale)
    assert torch.equal(fused, outs["quantized"]) and torch.equal(unloaded, base_out)
    for name, m in unet.named_modules():
        if name in weights:
            assert m.weight is weights[name][0] and all(map(torch.equal, inner(m.weight), weights[name][1])), name


def test_quantize_flags_refused_without_torchao(data, tmp_path, monkeypatch):
    """--quantize-base without torchao: one line, before the model opens."""
    import lora_kit.models

    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setattr(lora_kit.models, "open_pipeline", lambda *a, **k: pytest.fail("the model was opened"))
    with pytest.raises(LoraKitError, match=r"quantizing the base needs torchao \(pip install torchao\)"):
        loop.train(config(data, tmp_path, steps=1, quantize_base="int8"))


def test_quantize_flags_and_fingerprint():
    from click.testing import CliRunner
    from lora_kit.cli import train as train_cli

    from lora_kit.train.config import ConfigError, TrainConfig

    shown = CliRunner().invoke(train_cli.main, ["--help"], terminal_width=200).output
    assert "--quantize-base" in shown and "--quantize-text-encoders" in shown
    cfg = TrainConfig(model="m", data="d", output="o.safetensors")
    assert cfg.fingerprint() == "f2dfe57930e5e6f6"  # (the default config's, as before these fields existed)
    assert TrainConfig(model="m", data="d", output="o.safetensors", quantize_base="nf4").fingerprint() != (
        cfg.fingerprint()
    )
    with pytest.raises(ConfigError, match="quantize_base is 'int4'; choose one of none, fp8, int8, nf4"):
        TrainConfig(model="m", data="d", output="o.safetensors", quantize_base="int4")


def test_lora_train_quantized_prints_no_import_noise(make_pipe, data, tmp_path):
    """The command as a user runs it (a fresh process, so diffusers imports torchao there): stderr holds lora-train's
    own lines, not the warnings torchao, torch and bitsandbytes log while being imported (cli/_common.QUIETED)."""
    import os
    import subprocess

    model = tmp_path / "model"
    make_pipe("sd1").save_pretrained(model)
    out = tmp_path / "o.safetensors"
    argv = [sys.executable, "-m", "lora_kit.cli.train", "--model", str(model), "--data", str(data), "--steps", "1",
            "--resolution", "32", "--rank", "2", "--quantize-base", "int8", "-o", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["training lora on 4 images in 1 processes",
                                        "unet: Int8Tensor x 50 of 50 linear layers"], done.stderr  # fmt: skip
    assert out.exists()
