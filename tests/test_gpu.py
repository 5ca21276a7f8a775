"""The same equivalences on a CUDA device, in the precisions people run there: fp16/bf16 unfused and fused forwards
against the fp32 formula on the CPU, unfuse back to the exact base weights, step schedules on the device, a LoRA file
loaded into a half-precision pipeline, and torch.compile against eager. CI has no GPU: these are skipped there."""

import pytest
import torch
from conftest import main_model, randomize_adapters

import lora_kit
from lora_kit.inject import inject_lora

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 4e-2}  # of the output's largest magnitude


def _adapted(make_pipe):
    pipe = make_pipe("sd1")
    inject_lora(pipe.unet, "locon", rank=3, alpha=1.5, conv_rank=2, name="a")
    inject_lora(pipe.unet, "attn", rank=2, alpha=4.0, name="b")
    randomize_adapters(pipe, seed=7)
    lora_kit.set_weights(pipe, {"a": 0.7, "b": -0.5})
    return pipe


def _inputs(unet, device, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    return x.to(device, dtype), context.to(device, dtype)


def _forward(unet, device, dtype):
    x, context = _inputs(unet, device, dtype)
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=context).sample.float().cpu()


def _close(out, ref, dtype):
    err = (out - ref).abs().max().item()
    assert err <= TOLERANCE[dtype] * ref.abs().max().item(), f"max error {err:.3g} of {ref.abs().max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_unfused_fused_and_unfuse_on_cuda(make_pipe, dtype):
    pipe = _adapted(make_pipe)
    ref = _forward(pipe.unet, "cpu", torch.float32)
    pipe.unet.to("cuda", dtype)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items() if ".base." in k}
    _close(_forward(pipe.unet, "cuda", dtype), ref, dtype)
    lora_kit.fuse(pipe)
    _close(_forward(pipe.unet, "cuda", dtype), ref, dtype)
    lora_kit.unfuse(pipe)
    after = {k: v for k, v in pipe.unet.state_dict().items() if ".base." in k}
    assert all(torch.equal(base[k], after[k]) for k in base)
    lora_kit.set_weights(pipe, {"a": 0.0, "b": 0.0})  # off: exactly the base model cast to the same precision
    plain = make_pipe("sd1").unet.to("cuda", dtype)
    assert torch.equal(_forward(pipe.unet, "cuda", dtype), _forward(plain, "cuda", dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_and_inference_mode_on_cuda(make_pipe, dtype):
    """An fp32 UNet under autocast keeps each layer's plan for its fp32 inputs, and a call under inference_mode
    leaves caches that a later call without it rebuilds: the CPU's fp32 output each way, each twice (the second
    call runs the plans the first kept)."""
    pipe = _adapted(make_pipe)
    ref = _forward(pipe.unet, "cpu", torch.float32)
    pipe.unet.to("cuda")
    for _ in range(2):
        with torch.autocast("cuda", dtype=dtype):
            _close(_forward(pipe.unet, "cuda", torch.float32), ref, dtype)
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):
        for _ in range(2):
            with mode():
                _close(_forward(pipe.unet, "cuda", torch.float32), ref, torch.float16)  # (fp32, TF32 convolutions)


def test_schedule_on_cuda(make_pipe):
    def denoise(pipe):
        g = torch.Generator("cuda").manual_seed(0)
        return pipe("a photo of a dog", num_inference_steps=3, generator=g, output_type="latent").images.float()

    base = denoise(make_pipe("sd1").to("cuda", torch.float16))
    pipe = _adapted(make_pipe).to("cuda", torch.float16)
    lora_kit.schedule(pipe, {"a": "0:0,1:0", "b": lambda p, s, t: 0.0})
    assert torch.equal(denoise(pipe), base)
    lora_kit.unschedule(pipe)
    lora_kit.set_weights(pipe, {"a": 0.3, "b": 0.8})
    static = denoise(pipe)
    lora_kit.set_weights(pipe, {"a": 0.5, "b": 1.0})
    lora_kit.schedule(pipe, {"a": "0:0.6", "b": lambda p, s, t: 0.8})
    torch.testing.assert_close(denoise(pipe), static, atol=2e-3, rtol=0)


def _batched_against_per_layer(make_pipe, monkeypatch, device, dtype):
    """A schedule whose factors change at every step, with every layer's factors set in one batch (FactorBatch)
    and, monkeypatched off, layer by layer: the latents of both."""
    from lora_kit.layers import FactorBatch

    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    out = []
    for batched in (True, False):
        if not batched:
            monkeypatch.setattr(FactorBatch, "apply", lambda self, factors: False)
        pipe = _adapted(make_pipe).to(device, dtype)
        lora_kit.schedule(pipe, {"a": "0:1,1:0.2", "b": lambda p, s, t: 0.3 + p})
        out.append(pipe("a photo of a dog", num_inference_steps=4, latents=latents, output_type="latent").images)
    return out


def test_a_changing_schedule_batched_on_cuda_equals_layer_by_layer(make_pipe, monkeypatch):
    batched, per_layer = _batched_against_per_layer(make_pipe, monkeypatch, "cuda", torch.float16)
    _close(batched.float().cpu(), per_layer.float().cpu(), torch.float16)


def test_file_loads_into_a_half_precision_pipeline(make_pipe, two_loras):
    a, b = two_loras
    ours = make_pipe("sd1").to("cuda", torch.float16)
    theirs = make_pipe("sd1").to("cuda", torch.float16)
    lora_kit.load(ours, a, weight=0.8)
    lora_kit.load(ours, b, weight=0.5)
    theirs.load_lora_weights(str(a), adapter_name="a")
    theirs.load_lora_weights(str(b), adapter_name="b")
    theirs.set_adapters(["a", "b"], [0.8, 0.5])
    outs = [_forward(main_model(p), "cuda", torch.float16) for p in (ours, theirs)]
    _close(outs[0], outs[1], torch.float16)
    g = torch.Generator("cuda").manual_seed(0)
    image = ours("a photo of a dog", num_inference_steps=2, generator=g, output_type="np").images
    assert image.shape[-1] == 3 and torch.isfinite(torch.from_numpy(image)).all()


def test_torch_compile_matches_eager_and_follows_weights(make_pipe):
    pipe = _adapted(make_pipe).to("cuda", torch.float16)
    eager = _forward(pipe.unet, "cuda", torch.float16)
    compiled = torch.compile(pipe.unet)
    x, context = _inputs(pipe.unet, "cuda", torch.float16)
    with torch.no_grad():
        out = compiled(x, 10, encoder_hidden_states=context).sample.float().cpu()
    _close(out, eager, torch.float16)
    lora_kit.set_weights(pipe, {"a": 0.1, "b": 1.3})
    eager = _forward(pipe.unet, "cuda", torch.float16)
    with torch.no_grad():
        out = compiled(x, 10, encoder_hidden_states=context).sample.float().cpu()
    _close(out, eager, torch.float16)
