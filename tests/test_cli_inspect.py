"""lora-inspect: header-only description, JSON output, one-line errors with exit 2, instant --help."""

import json
import subprocess
import sys

import torch
from click.testing import CliRunner
from conftest import randomize_adapters
from lora_kit.cli.inspect import main

import lora_kit
from lora_kit.inject import inject_lora


def test_inspect_reports_what_was_saved(make_pipe, tmp_path):
    pipe = make_pipe("sd1")
    inject_lora(pipe.unet, "locon", rank=4, alpha=2.0, conv_rank=2, conv_alpha=2.0)
    inject_lora(pipe.text_encoder, "clip-attn", rank=2, alpha=2.0)
    randomize_adapters(pipe)
    path = lora_kit.save(pipe, tmp_path / "a.safetensors", metadata={"trigger_words": ["sks"]}, dtype=torch.float16)
    result = CliRunner().invoke(main, [str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    n_unet = len(lora_kit.find_targets(pipe.unet, "locon"))
    n_conv = sum(
        1 for _, w in lora_kit.lora_modules(pipe.unet) if w.base.weight.dim() == 4 and w.base.kernel_size != (1, 1)
    )
    assert info["format"] == "kohya" and info["architecture"] == "sd1"
    assert info["components"] == {"unet": n_unet, "te": 8}
    assert info["conv_modules"] == n_conv and info["ranks"] == {"2": n_conv + 8, "4": n_unet - n_conv}
    assert info["alphas"] == {"2": n_unet + 8} and info["dtypes"] == ["F16"]
    assert json.loads(info["trigger_words"]) == ["sks"]
    text = CliRunner().invoke(main, [str(path)])
    assert text.exit_code == 0 and "kohya" in text.output and "4 x" in text.output


def test_inspect_bad_input_exit_2(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    for path, message in [(tmp_path / "none.safetensors", "no such file"), (bad, "not a safetensors")]:
        result = CliRunner().invoke(main, [str(path)])
        assert result.exit_code == 2
        assert result.output.strip().count("\n") == 0 and message in result.output and str(path) in result.output


def test_help_needs_no_torch():
    out = subprocess.run([sys.executable, "-m", "lora_kit.cli.inspect", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--json" in out.stdout
    mods = subprocess.run(
        [sys.executable, "-c", "import sys, lora_kit.cli.inspect; print('torch' in sys.modules)"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert mods.stdout.strip() == "False"  # --help and header reads never import torch (~2 s saved)


def test_inspect_refuses_a_nan_alpha(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "nan.safetensors"
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{stem}.lora_down.weight": torch.ones(2, 8), f"{stem}.lora_up.weight": torch.ones(8, 2),
               f"{stem}.alpha": torch.tensor(float("nan"))}, path)  # fmt: skip
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 2 and f"{stem}.alpha holds NaN or inf" in result.output, result.output


def test_inspect_reads_a_peft_file_alphas_from_its_lora_config(make_pipe, tmp_path):
    """PEFT files keep alpha in the `lora_adapter_metadata` header, not in tensors: inspect reads it there."""
    pipe = make_pipe("sd1")
    inject_lora(pipe.unet, "attn", rank=4, alpha=2.0)
    inject_lora(pipe.text_encoder, "clip-attn", rank=2, alpha=8.0)
    randomize_adapters(pipe)
    path = lora_kit.save(pipe, tmp_path / "p.safetensors", format="peft")
    info = json.loads(CliRunner().invoke(main, [str(path), "--json"]).output)
    n_unet = len(lora_kit.find_targets(pipe.unet, "attn"))
    from lora_kit.formats.files import read_header

    assert not [k for k in read_header(path)[0] if k.endswith("alpha")]  # no alpha tensors in a PEFT file
    assert info["format"] == "peft" and info["alphas"] == {"2": n_unet + 8}  # one alpha per file (see README)


def test_inspect_reads_alphas_of_every_scalar_dtype(tmp_path):
    """sd-scripts stores alpha in its save precision (bf16, fp16, ...), diffusers' kohya converter as int64:
    lora-inspect reads each (it showed "alpha = rank" for all but F32/F16/F64). 8-bit floats: checked byte by byte."""
    from safetensors.torch import save_file

    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    cases = [(torch.float64, 1.25), (torch.float32, 1.25), (torch.float16, 1.25), (torch.bfloat16, 1.25),
             (torch.int64, 3), (torch.int32, 3), (torch.int16, 3), (torch.int8, 3), (torch.uint8, 3),
             (torch.float8_e4m3fn, 1.25), (torch.float8_e5m2, 1.25)]  # fmt: skip
    for dtype, value in cases:
        path = tmp_path / f"{str(dtype)[6:]}.safetensors"
        alpha = torch.tensor(value).to(dtype)
        factors = {f"{stem}.lora_down.weight": torch.ones(4, 32), f"{stem}.lora_up.weight": torch.ones(32, 4)}
        save_file({**factors, f"{stem}.alpha": alpha}, path)
        result = CliRunner().invoke(main, [str(path), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["alphas"] == {f"{float(alpha.float()):g}": 1}, dtype
    from lora_kit.formats.header import _F8, _minifloat

    every = torch.arange(256, dtype=torch.uint8)
    for name, dtype in (("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)):
        want = every.view(dtype).float().tolist()
        got = [_minifloat(b, *_F8[name]) for b in range(256)]
        assert all((g != g and w != w) or g == w for g, w in zip(got, want, strict=True)), name


def test_inspect_agrees_with_the_readers_on_a_comfyui_file(tmp_path):
    """A FLUX LoRA keyed `diffusion_model.` (ComfyUI's LoraSave, ai-toolkit, SimpleTuner) was shown as a valid
    "peft / flux" file that every reader refused. Now lora-inspect names its dialect and architecture and the reader
    takes it: the one fused module inspect counts is the q, k, v layers the reader maps it to."""
    from safetensors.torch import save_file

    from lora_kit.formats import read
    from lora_kit.models import meta_pipeline

    path = tmp_path / "comfy_flux.safetensors"
    stem = "diffusion_model.double_blocks.0.img_attn.qkv"
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 3072, generator=g), torch.randn(9216, 4, generator=g)
    save_file({f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up}, path)
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 0 and "comfyui" in result.output and "flux" in result.output, result.output
    info = json.loads(CliRunner().invoke(main, [str(path), "--json"]).output)
    assert info["format"] == "comfyui" and info["architecture"] == "flux" and info["modules"] == 1
    state, _ = read(path, meta_pipeline("flux"))
    for i, x in enumerate("qkv"):
        key = f"transformer.transformer_blocks.0.attn.to_{x}"
        assert torch.equal(state[f"{key}.lora_down.weight"], down)
        assert torch.equal(state[f"{key}.lora_up.weight"], up[3072 * i : 3072 * (i + 1)])
    assert len(state) == 3 * 3  # down, up, alpha (= rank: none stored) of each
