"""Files lora_kit writes load through diffusers' own loader and compute what lora_kit computes; files diffusers
and peft write load into lora_kit and reproduce peft's forward."""

import pytest
import torch
from conftest import assert_outputs_close, main_model, pipeline_outputs, randomize_adapters

import lora_kit
from lora_kit.inject import inject_lora, lora_modules, tune_lora_scale

TEXT_ENCODERS = {"sd1": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"]}


def _adapt(pipe, arch):
    """UNet LoCon (3x3 and 1x1 convs) at rank 4 / alpha 2, convs at rank 2 / alpha 3; text encoders attention+MLP
    at rank 2 / alpha 3: mixed ranks, alpha != rank and mixed alphas."""
    inject_lora(main_model(pipe), "locon", rank=4, alpha=2.0, conv_rank=2, conv_alpha=3.0, name="x")
    for te in TEXT_ENCODERS[arch]:
        inject_lora(getattr(pipe, te), "clip-all", rank=2, alpha=3.0, name="x")
    randomize_adapters(pipe, seed=3)


def _peft_paths(module, adapter):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n for n, m in module.named_modules() if isinstance(m, BaseTunerLayer) and adapter in m.active_adapters}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.conformance(dialect="kohya", kind="lora", arch="{arch}", checks="write apply", reference="diffusers")
def test_kohya_file_in_diffusers_loader_matches_lora_kit(make_pipe, tmp_path, arch):
    ours = make_pipe(arch)
    _adapt(ours, arch)
    path = lora_kit.save(ours, tmp_path / "x.safetensors")
    expected = pipeline_outputs(ours)

    theirs = make_pipe(arch)
    base = pipeline_outputs(theirs)
    theirs.load_lora_weights(str(path), adapter_name="x")
    # every module lora_kit adapted got a peft layer, and nothing else did (no missing / unexpected keys)
    for comp in ["unet", *TEXT_ENCODERS[arch]]:
        assert _peft_paths(getattr(theirs, comp), "x") == {p for p, _ in lora_modules(getattr(ours, comp))}, comp
    got = pipeline_outputs(theirs)
    assert_outputs_close(got, expected, ours)
    assert not torch.allclose(got["main"], base["main"], atol=1e-3)  # the adapter does change the output

    theirs.set_adapters("x", 0.5)
    for comp in ["unet", *TEXT_ENCODERS[arch]]:
        tune_lora_scale(getattr(ours, comp), 0.5)
    assert_outputs_close(pipeline_outputs(theirs), pipeline_outputs(ours), ours)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.conformance(dialect="peft", kind="lora", arch="{arch}", checks="read apply", reference="diffusers")
def test_diffusers_saved_lora_loads_into_lora_kit(make_pipe, tmp_path, arch):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    theirs = make_pipe(arch)
    unet_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    te_cfg = LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "v_proj", "fc1"])
    theirs.unet.add_adapter(unet_cfg)
    tes = TEXT_ENCODERS[arch]
    for te in tes:
        getattr(theirs, te).add_adapter(te_cfg)
    torch.manual_seed(5)
    for comp in ["unet", *tes]:
        for n, p in getattr(theirs, comp).named_parameters():
            if "lora_" in n:
                p.data.normal_(0, 0.2)
    expected = pipeline_outputs(theirs)
    layers = {"unet_lora_layers": get_peft_model_state_dict(theirs.unet)}
    meta = {"unet_lora_adapter_metadata": theirs.unet.peft_config["default"].to_dict()}
    for i, te in enumerate(tes):
        key = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
        sd = get_peft_model_state_dict(getattr(theirs, te))
        layers[f"{key}_lora_layers"] = convert_state_dict_to_diffusers(sd)  # the older `lora_linear_layer` spelling
        meta[f"{key}_lora_adapter_metadata"] = getattr(theirs, te).peft_config["default"].to_dict()
    type(theirs).save_lora_weights(str(tmp_path), **layers, **meta)

    ours = make_pipe(arch)
    lora_kit.load(ours, tmp_path / "pytorch_lora_weights.safetensors", name="y")
    assert_outputs_close(pipeline_outputs(ours), expected, ours)


@pytest.mark.parametrize("arch", ["sdxl", "sd3"])
@pytest.mark.conformance(dialect="peft", kind="lora", arch="{arch}", checks="write apply", reference="diffusers")
def test_peft_file_in_diffusers_loader_matches_lora_kit(make_pipe, tmp_path, arch):
    """diffusers/PEFT files (the SD3 default, SDXL on request) with mixed ranks and alpha != rank."""
    ours = make_pipe(arch)
    inject_lora(main_model(ours), "dit" if arch == "sd3" else "kohya", rank=4, alpha=2.0, name="x")
    for te in ("text_encoder", "text_encoder_2"):
        inject_lora(getattr(ours, te), "clip-attn", rank=2, alpha=3.0, name="x")
    randomize_adapters(ours, seed=4)
    path = lora_kit.save(ours, tmp_path / "p.safetensors", format="peft")
    theirs = make_pipe(arch)
    theirs.load_lora_weights(str(path))
    assert_outputs_close(pipeline_outputs(theirs), pipeline_outputs(ours), ours)
