"""Injection over all five architectures: identity at init, injected == collapsed, remove restores exactly,
save -> load round trips, and the errors a user meets."""

import pytest
import torch
from conftest import (
    ARCHS,
    assert_close_scaled,
    assert_outputs_close,
    forward_main,
    main_model,
    pipeline_outputs,
    randomize_adapters,
)
from torch import nn

import lora_kit
from lora_kit import LoraKitError
from lora_kit.formats import files, read
from lora_kit.inject import collapse_lora, find_targets, inject_lora, lora_modules, remove_lora
from lora_kit.state import components
from lora_kit.targets import Target

MAIN_PRESET = {"sd1": "locon", "sd2": "locon", "sdxl": "locon", "sd3": "dit", "flux": "dit"}
T5_ATTENTION = Target(children=r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.(q|k|v|o)")  # a path regex


def adapt(pipe, arch, name="default"):
    """Mixed ranks and alphas != ranks everywhere; random non-zero factors."""
    inject_lora(main_model(pipe), MAIN_PRESET[arch], rank=4, alpha=1.0, conv_rank=2, conv_alpha=3.0, name=name)
    for comp, module in components(pipe).items():
        if comp.startswith("text_encoder"):
            is_t5 = "T5" in type(module).__name__
            inject_lora(module, T5_ATTENTION if is_t5 else "clip-all", rank=2, alpha=5.0, name=name)
    randomize_adapters(pipe, seed=7)


def _modules(pipe):
    return {c: dict(m.named_modules()) for c, m in components(pipe).items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_inject_collapse_remove(make_pipe, arch):
    pipe = make_pipe(arch)
    base = pipeline_outputs(pipe)
    before = _modules(pipe)
    adapt(pipe, arch)
    randomize_adapters(pipe, seed=1, std=0.0)  # zero factors: the output must be the base output
    assert_outputs_close(pipeline_outputs(pipe), base, exact=True)
    randomize_adapters(pipe, seed=2)
    injected = pipeline_outputs(pipe)
    assert not torch.allclose(injected["main"], base["main"], atol=1e-4)

    remove_lora(main_model(pipe))
    for comp in components(pipe):
        if comp.startswith("text_encoder"):
            remove_lora(getattr(pipe, comp))
    assert_outputs_close(pipeline_outputs(pipe), base, exact=True)
    after = _modules(pipe)
    for comp, mods in before.items():  # the very same module objects are back in place
        assert mods.keys() == after[comp].keys() and all(mods[k] is after[comp][k] for k in mods)

    adapt(pipe, arch)
    injected = pipeline_outputs(pipe)
    lora_kit.collapse(pipe)
    assert not any(True for m in components(pipe).values() for _ in lora_modules(m))
    assert_outputs_close(pipeline_outputs(pipe), injected, pipe)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_roundtrip(make_pipe, tmp_path, arch):
    pipe = make_pipe(arch)
    adapt(pipe, arch, name="mine")
    expected = pipeline_outputs(pipe)
    path = lora_kit.save(pipe, tmp_path / "a.safetensors")

    fresh = make_pipe(arch)
    name = lora_kit.load(fresh, path)
    assert name == "a"
    assert_outputs_close(pipeline_outputs(fresh), expected, pipe)
    for comp, module in components(pipe).items():  # model -> file -> model: every delta to the rounding of up @ down
        loaded = dict(lora_modules(getattr(fresh, comp)))
        assert loaded.keys() == dict(lora_modules(module)).keys()
        for layer, wrapper in lora_modules(module):
            d0, d1 = wrapper.delta_weight("mine"), loaded[layer].delta_weight("a")
            rank = max(wrapper.adapters["mine"].rank, loaded[layer].adapters["a"].rank)
            assert_close_scaled(d1, d0, reduction=rank, msg=lambda m, at=f"{comp} {layer}": f"{at}: {m}")

    # file -> memory -> file is bit-exact: same keys, same bytes
    state, _ = read(path, fresh)
    again = lora_kit.save(fresh, tmp_path / "b.safetensors", name="a")
    first, second = files.load(path)[0], files.load(again)[0]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) and first[k].dtype == second[k].dtype for k in first)
    n_layers = sum(1 for m in components(fresh).values() for _ in lora_modules(m))
    assert len(state) == 3 * n_layers  # down, up and alpha of every adapted layer


def test_weight_and_second_adapter_join_one_wrapper(make_pipe):
    pipe = make_pipe("sd1")
    base = pipeline_outputs(pipe)
    paths = inject_lora(pipe.unet, "attn", rank=2, name="a")
    again = inject_lora(pipe.unet, "attn", rank=3, name="b")
    assert paths == again
    wrappers = dict(lora_modules(pipe.unet))
    assert set(wrappers) == set(paths) and all(set(w.adapters) == {"a", "b"} for w in wrappers.values())
    assert not any(isinstance(w.base, lora_kit.LoraInjectedLinear) for w in wrappers.values())
    randomize_adapters(pipe.unet, seed=3)
    both = pipeline_outputs(pipe)
    lora_kit.set_weights(pipe, {"a": 0.0, "b": 0.0})
    assert_outputs_close(pipeline_outputs(pipe), base, exact=True)
    lora_kit.set_weights(pipe, {"a": 1.0, "b": 1.0})
    assert_outputs_close(pipeline_outputs(pipe), both, exact=True)
    # removing one adapter keeps the other; removing both restores the originals
    remove_lora(pipe.unet, "a")
    assert all(set(w.adapters) == {"b"} for _, w in lora_modules(pipe.unet))
    remove_lora(pipe.unet, "b")
    assert not list(lora_modules(pipe.unet))


def test_presets_select_the_documented_layers(make_pipe):
    pipe = make_pipe("sd1")
    attn = find_targets(pipe.unet, "attn")
    assert attn and all(p.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v"} or p.endswith("to_out.0") for p in attn)
    kohya = set(find_targets(pipe.unet, "kohya"))
    assert set(attn) < kohya and "down_blocks.0.attentions.0.proj_in" in kohya
    assert "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2" in kohya
    locon = set(find_targets(pipe.unet, "locon"))
    for p in ["down_blocks.0.resnets.0.conv1", "down_blocks.1.resnets.0.conv_shortcut",
              "down_blocks.0.resnets.0.time_emb_proj", "down_blocks.0.downsamplers.0.conv"]:  # fmt: skip
        assert p in locon
    assert "conv_in" not in locon and not any("norm" in p for p in locon)
    clip = find_targets(pipe.text_encoder, "clip-all")
    assert len(clip) == 2 * 6 and len(find_targets(pipe.text_encoder, "clip-attn")) == 2 * 4
    flux = make_pipe("flux")
    dit = find_targets(flux.transformer, "dit")
    assert "single_transformer_blocks.0.proj_mlp" in dit and not any("norm" in p for p in dit)


def test_errors_name_the_problem(make_pipe, tmp_path):
    pipe = make_pipe("sd1")
    with pytest.raises(LoraKitError, match=r"no layer of CLIPTextModel matches targets 'attn'.*encoder\.layers"):
        inject_lora(pipe.text_encoder, "attn")
    with pytest.raises(LoraKitError, match="rank 99 is larger than min"):
        inject_lora(pipe.unet, "attn", rank=99)
    assert not list(lora_modules(pipe.unet))  # nothing was half-injected
    with pytest.raises(ValueError, match="unknown target preset 'nope'"):
        inject_lora(pipe.unet, "nope")
    # NaN deltas are refused before any base weight is written
    inject_lora(pipe.unet, "attn", rank=2)
    up = next(iter(lora_modules(pipe.unet)))[1].adapters["default"].up
    with torch.no_grad():
        up.fill_(float("nan"))
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(LoraKitError, match="not finite"):
        collapse_lora(pipe.unet)
    assert all(
        torch.allclose(weights[k], v, rtol=0, atol=0, equal_nan=True) for k, v in pipe.unet.state_dict().items()
    )


def test_bf16_pipeline_fp32_adapters_train_under_autocast(make_pipe):
    """Adapters injected into a bf16 UNet are fp32; under autocast forward and backward give finite fp32 grads
    close to the same adapters on the fp32 UNet."""
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        unet = make_pipe("sd1").unet.to(dtype)
        unet.requires_grad_(False)
        inject_lora(unet, "kohya", rank=4)
        randomize_adapters(unet, seed=4)
        params = list(lora_kit.lora_parameters(unet))
        assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
        g = torch.Generator().manual_seed(0)
        x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = unet(x, 10, encoder_hidden_states=ctx).sample
        out.float().square().mean().backward()
        grads[dtype] = torch.cat([p.grad.flatten() for p in params])
        assert torch.isfinite(grads[dtype]).all() and grads[dtype].abs().sum() > 0
    cos = nn.functional.cosine_similarity(grads[torch.float32], grads[torch.bfloat16], dim=0)
    assert cos > 0.98


def test_bare_module_takes_its_part_of_a_pipeline_file(make_pipe, tmp_path):
    pipe = make_pipe("sdxl")
    adapt(pipe, "sdxl")
    path = lora_kit.save(pipe, tmp_path / "xl.safetensors")
    unet = make_pipe("sdxl").unet
    lora_kit.load(unet, path)
    assert {p for p, _ in lora_modules(unet)} == {p for p, _ in lora_modules(pipe.unet)}
    assert_close_scaled(forward_main(unet), forward_main(pipe.unet), reduction=unet)


def test_wrappers_and_adapters_take_the_mode_of_the_layer_they_join():
    """An adapter loaded into an eval model is in eval mode (no dropout, the inference plan is kept)."""
    from lora_kit.inject import attach_adapter

    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    model[1].eval()
    for path in ("0", "1"):
        attach_adapter(model, path, "a", 2, dropout=0.5)
    assert all(m.training for m in model[0].modules())
    assert not any(m.training for m in model[1].modules())
    model.eval()
    attach_adapter(model, "0", "b", 2, dropout=0.5)
    assert not any(m.training for m in model.modules())
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # no dropout drawn
    assert model[0]._plan is not None and model[1]._plan is not None


@pytest.mark.parametrize("order", ["offload then load", "load then offload"])
def test_sequential_cpu_offload_runs_the_loaded_lora(make_pipe, two_loras, tmp_path, order):
    """accelerate's sequential offload (what enable_sequential_cpu_offload does to each component; on the UNet alone,
    as transformers' CLIP does not run under it on the CPU) keeps every layer's weights on meta between calls. Loaded
    after it, the adapters were made on meta (the file's values lost); loaded before, accelerate moved them to meta
    and the wrapper, which never calls them, computed with garbage. Now the adapters live on the execution device:
    the pipeline gives what it gives without offload, save writes the file's values, collapse is refused."""
    from accelerate import cpu_offload
    from safetensors.torch import load_file

    a, _ = two_loras

    def denoise(pipe):
        g = torch.Generator().manual_seed(0)
        return pipe("a photo", num_inference_steps=2, generator=g, output_type="latent").images

    reference = make_pipe("sd1")
    lora_kit.load(reference, a, weight=0.8)
    expected, base = denoise(reference), denoise(make_pipe("sd1"))
    pipe = make_pipe("sd1")
    if order == "offload then load":
        cpu_offload(pipe.unet, execution_device=torch.device("cpu"))
    lora_kit.load(pipe, a, weight=0.8)
    if order == "load then offload":
        cpu_offload(pipe.unet, execution_device=torch.device("cpu"))
    lora_kit.save(pipe, tmp_path / "saved.safetensors")  # (before any call: offloaded adapters read back too)
    saved, given = load_file(tmp_path / "saved.safetensors"), load_file(a)
    assert saved.keys() == given.keys() and all(torch.equal(saved[k], given[k]) for k in saved)
    loop = (reference.text_encoder,) + (reference.unet,) * 2  # the text encoder, then the UNet at both steps
    for _ in range(2):
        assert_close_scaled(denoise(pipe), expected, reduction=loop)
    assert (expected - base).abs().max() > 0.1
    with pytest.raises(LoraKitError, match="base weight is on the meta device"):
        lora_kit.collapse(pipe)
    assert_close_scaled(denoise(pipe), expected, reduction=loop)
