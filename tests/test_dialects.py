"""Other trainers' key dialects (issue 26): ComfyUI / ai-toolkit / SimpleTuner `diffusion_model.`, sd-scripts' SD3
names, XLabs, OneTrainer, musubi-tuner and LyCORIS `lycoris_`, read (and ComfyUI's and sd-scripts' SD3 written).

Judges: diffusers' own converters where they exist (ComfyUI-style and XLabs FLUX files in `load_lora_weights`), the
kohya formula W + alpha/r * up @ down on the original fused weights built here by hand (sd-scripts' SD3 names, which
diffusers does not convert), and the canonical dict the files were written from (unfused dialects).
"""

import pytest
import torch
from click.testing import CliRunner
from conftest import (
    assert_close_scaled,
    assert_outputs_close,
    forward_main,
    main_model,
    pipeline_outputs,
    randomize_adapters,
)
from safetensors.torch import save_file

import lora_kit
from lora_kit import LoraKitError, formats
from lora_kit.formats import dialects, files, kohya_flux, original
from lora_kit.formats.header import describe
from lora_kit.inject import inject_lora, lora_modules
from lora_kit.state import lora_state_dict


def _adapt(pipe, seed=3):
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        inject_lora(unet, "locon", rank=4, alpha=2.0, conv_rank=4, conv_alpha=2.0, name="x")
    else:
        inject_lora(pipe.transformer, "dit", rank=4, alpha=2.0, name="x")
    inject_lora(pipe.text_encoder, "clip-attn", rank=2, alpha=2.0, name="x")  # one alpha: files keep the factors
    randomize_adapters(pipe, seed=seed)


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


ROUND_TRIPS = [("flux", "kohya"), ("sd3", "kohya"), *((arch, "comfyui") for arch in ("flux", "sd3", "sd1", "sdxl"))]


@pytest.mark.parametrize(("arch", "fmt"), ROUND_TRIPS)
@pytest.mark.conformance(dialect="{fmt}", kind="lora", arch="{arch}", checks="read write", reference="round trip")
def test_write_read_round_trip(make_pipe, tmp_path, arch, fmt):
    """pipeline -> file -> memory -> file -> memory: the two reads are equal to the bit, the two files too, and the
    adapters loaded from the file compute what the pipeline's did."""
    pipe = make_pipe(arch)
    _adapt(pipe)
    first = lora_kit.save(pipe, tmp_path / "a.safetensors", format=fmt)
    state, _ = formats.read(first, make_pipe(arch))
    second = formats.write(tmp_path / "b.safetensors", state, make_pipe(arch), format=fmt)
    _equal(files.load(first)[0], files.load(second)[0])
    _equal(formats.read(second, make_pipe(arch))[0], state)
    fresh = make_pipe(arch)
    lora_kit.load(fresh, first)
    assert_outputs_close(pipeline_outputs(fresh), pipeline_outputs(pipe), pipe)
    assert not torch.allclose(forward_main(main_model(fresh)), forward_main(main_model(make_pipe(arch))), atol=1e-3)
    keys = list(files.load(first)[0])
    expected = {("kohya", "flux"): "kohya-bfl", ("kohya", "sd3"): "sd-scripts-sd3"}.get((fmt, arch), fmt)
    assert dialects.dialect_of(keys) == expected and describe(first)["format"] == expected
    if arch in ("flux", "sd3"):
        qkv = {"flux": "double_blocks.0.img_attn.qkv", "sd3": "joint_blocks.0.x_block.attn.qkv"}[arch]
        stem = {"kohya": kohya_flux.kohya_stem(qkv), "comfyui": "diffusion_model." + qkv}[fmt]
        assert f"{stem}.lora_up.weight" in keys and not any("to_q" in k for k in keys)
    else:  # ComfyUI's UNet keys are the SGM checkpoint's paths
        assert "diffusion_model.input_blocks.1.0.in_layers.2.lora_up.weight" in keys  # resnet conv1
        assert not any("down_blocks" in k for k in keys)
    if fmt == "comfyui":  # ComfyUI's text-encoder keys
        assert "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.alpha" in keys


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_comfyui_and_kohya_files_read_the_same(make_pipe, tmp_path, arch):
    """The same adapters through ComfyUI's names (lora_A/lora_B, as SimpleTuner writes them) and through sd-scripts':
    one canonical dict, to the bit."""
    pipe = make_pipe(arch)
    _adapt(pipe)
    kohya_file = lora_kit.save(pipe, tmp_path / "k.safetensors", format="kohya")
    comfy = files.load(lora_kit.save(pipe, tmp_path / "c.safetensors", format="comfyui"))[0]
    renamed = {k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): t for k, t in comfy.items()}
    save_file(renamed, tmp_path / "ab.safetensors")
    _equal(formats.read(tmp_path / "ab.safetensors", pipe)[0], formats.read(kohya_file, pipe)[0])


def _flux_comfy_file(path, transformer, prefix="diffusion_model."):
    """Random fused factors under BFL names with per-module alphas, plus a CLIP-L module (written here by hand). No
    `single_blocks_N_linear1` and no layer outside the blocks: diffusers' converter hard-codes FLUX.1's linear1
    sizes and drops those layers (see test_flux_bfl.py)."""
    g = torch.Generator().manual_seed(11)
    width = {p: m.weight.shape for p, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    hidden, mlp = width["transformer_blocks.0.attn.to_q"][1], width["transformer_blocks.0.ff.net.0.proj"][0]
    modules = {  # module: (rank, in, out, alpha)
        "double_blocks.0.img_attn.qkv": (5, hidden, 3 * hidden, 2.0),
        "double_blocks.0.txt_attn.qkv": (3, hidden, 3 * hidden, 0.5),
        "double_blocks.0.img_attn.proj": (2, hidden, hidden, 2.0),
        "double_blocks.0.txt_mlp.0": (4, hidden, mlp, 1.0),
        "single_blocks.0.linear2": (4, hidden + mlp, hidden, 8.0),
    }
    tensors = {}
    for name, (rank, fan_in, fan_out, alpha) in modules.items():
        tensors[f"{prefix}{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=g) * 0.3
        tensors[f"{prefix}{name}.lora_up.weight"] = torch.randn(fan_out, rank, generator=g) * 0.3
        tensors[f"{prefix}{name}.alpha"] = torch.tensor(alpha)
    for layer in ("v_proj", "out_proj"):  # (diffusers' text-encoder converter needs an out_proj to tell its keys)
        te = f"text_encoders.clip_l.transformer.text_model.encoder.layers.1.self_attn.{layer}"
        tensors[te + ".lora_down.weight"] = torch.randn(2, 32, generator=g) * 0.3
        tensors[te + ".lora_up.weight"] = torch.randn(32, 2, generator=g) * 0.3
        tensors[te + ".alpha"] = torch.tensor(3.0)
    save_file(tensors, path)
    return tensors


@pytest.mark.conformance(dialect="comfyui", kind="lora", arch="flux", checks="read write apply", reference="diffusers")
def test_comfyui_flux_file_in_diffusers_loader_matches_lora_kit(make_pipe, tmp_path):
    path = tmp_path / "comfy.safetensors"
    _flux_comfy_file(path, make_pipe("flux").transformer)
    base = pipeline_outputs(make_pipe("flux"))
    theirs, ours = make_pipe("flux"), make_pipe("flux")
    theirs.load_lora_weights(str(path), adapter_name="c")
    lora_kit.load(ours, path)
    qkv = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
    assert {p for p, _ in lora_modules(ours.transformer)} == {
        *(f"transformer_blocks.0.attn.{x}" for x in qkv),
        "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.ff_context.net.0.proj",
        "single_transformer_blocks.0.proj_out",
    }  # fmt: skip
    got = pipeline_outputs(ours)
    assert_outputs_close(got, pipeline_outputs(theirs), ours)
    assert not torch.allclose(got["main"], base["main"], atol=1e-3)
    assert not torch.allclose(got["text_encoder"], base["text_encoder"], atol=1e-3)
    assert describe(path)["format"] == "comfyui" and describe(path)["architecture"] == "flux"
    bare = make_pipe("flux")  # a bare transformer / text encoder takes its part of the file
    lora_kit.load(bare.transformer, path)
    lora_kit.load(bare.text_encoder, path)
    assert_outputs_close(pipeline_outputs(bare), got, ours, exact=True)


@pytest.mark.conformance(
    dialect="comfyui (diffusers paths)", kind="lora", arch="flux", checks="read apply", reference="round trip"
)
def test_comfyui_diffusers_paths_under_diffusion_model(make_pipe, tmp_path):
    """ai-toolkit writes diffusers paths under `diffusion_model.` for some models: read as those layers."""
    pipe = make_pipe("flux")
    _adapt(pipe)
    state = lora_state_dict(pipe)
    mine = {k: t for k, t in state.items() if k.startswith("transformer.")}
    tensors = {"diffusion_model." + k.removeprefix("transformer."): t for k, t in mine.items()}
    save_file(tensors, tmp_path / "ait.safetensors")
    read, _ = formats.read(tmp_path / "ait.safetensors", make_pipe("flux"))
    _equal(read, mine)


def _xlabs_file(path, transformer, prefix=""):
    g = torch.Generator().manual_seed(12)
    width = {p: m.weight.shape for p, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    hidden, proj_in = width["transformer_blocks.0.attn.to_q"][1], width["single_transformer_blocks.0.proj_out"][1]
    modules = {  # x-flux processor layer: (rank, in, out)
        "double_blocks.0.processor.qkv_lora1": (4, hidden, 3 * hidden),
        "double_blocks.0.processor.proj_lora1": (4, hidden, hidden),
        "double_blocks.0.processor.qkv_lora2": (4, hidden, 3 * hidden),
        "double_blocks.0.processor.proj_lora2": (4, hidden, hidden),
        "single_blocks.0.processor.qkv_lora": (4, hidden, 3 * hidden),
        "single_blocks.0.processor.proj_lora": (4, proj_in, hidden),
    }
    tensors = {}
    for name, (rank, fan_in, fan_out) in modules.items():
        tensors[f"{prefix}{name}.down.weight"] = torch.randn(rank, fan_in, generator=g) * 0.3
        tensors[f"{prefix}{name}.up.weight"] = torch.randn(fan_out, rank, generator=g) * 0.3
    save_file(tensors, path)


@pytest.mark.conformance(dialect="xlabs", kind="lora", arch="flux", checks="read apply", reference="diffusers")
def test_xlabs_file_in_diffusers_loader_matches_lora_kit(make_pipe, tmp_path):
    """lora1 = the image stream (to_q/k/v, to_out.0), lora2 = the text stream (add_q/k/v_proj, to_add_out); a
    single block's qkv_lora adds to linear1's q, k, v rows only (not proj_mlp's), proj_lora to linear2."""
    path, prefixed = tmp_path / "xlabs.safetensors", tmp_path / "xlabs_dm.safetensors"
    _xlabs_file(path, make_pipe("flux").transformer)
    _xlabs_file(prefixed, make_pipe("flux").transformer, prefix="diffusion_model.")
    theirs, ours = make_pipe("flux"), make_pipe("flux")
    theirs.load_lora_weights(str(path), adapter_name="x")
    lora_kit.load(ours, path)
    adapted = {p for p, _ in lora_modules(ours.transformer)}
    assert "single_transformer_blocks.0.proj_mlp" not in adapted and len(adapted) == 3 + 1 + 3 + 1 + 3 + 1
    assert_close_scaled(forward_main(ours.transformer), forward_main(theirs.transformer), reduction=ours.transformer)
    assert not torch.allclose(forward_main(ours.transformer), forward_main(make_pipe("flux").transformer), atol=1e-3)
    _equal(formats.read(prefixed, ours)[0], formats.read(path, ours)[0])
    assert describe(path)["format"] == "xlabs" and describe(path)["architecture"] == "flux"


def _sd3_fused_formula(transformer, tensors):
    """W + alpha/r * up @ down on MMDiT's fused weights, built here from diffusers' layers and split back; (shift,
    scale) modules (the last block's context modulation, the final layer's) swap their halves first."""
    fused = {  # sd-scripts stem -> (diffusers layers in MMDiT's row order, stored (shift, scale))
        "joint_blocks_0_x_block_attn_qkv": ([f"transformer_blocks.0.attn.to_{x}" for x in "qkv"], False),
        "joint_blocks_0_context_block_attn_qkv": ([f"transformer_blocks.0.attn.add_{x}_proj" for x in "qkv"], False),
        "joint_blocks_0_x_block_mlp_fc1": (["transformer_blocks.0.ff.net.0.proj"], False),
        "joint_blocks_0_context_block_adaLN_modulation_1": (["transformer_blocks.0.norm1_context.linear"], True),
        "final_layer_adaLN_modulation_1": (["norm_out.linear"], True),
        "context_embedder": (["context_embedder"], False),
    }
    with torch.no_grad():
        for name, (layers, swapped) in fused.items():
            stem = "lora_unet_" + name
            down, up = tensors[stem + ".lora_down.weight"], tensors[stem + ".lora_up.weight"]
            weights = [transformer.get_submodule(p).weight for p in layers]
            view = torch.cat(list(weights))
            if swapped:
                view = torch.cat(view.chunk(2)[::-1])
            view += float(tensors[stem + ".alpha"]) / down.shape[0] * up @ down
            if swapped:
                view = torch.cat(view.chunk(2)[::-1])
            for w, rows in zip(weights, view.split([w.shape[0] for w in weights]), strict=True):
                w.copy_(rows)
    return forward_main(transformer)


@pytest.mark.conformance(
    dialect="sd-scripts-sd3", kind="lora", arch="sd3", checks="read write apply", reference="by hand"
)
def test_sd_scripts_sd3_names_against_the_kohya_formula(make_pipe, tmp_path):
    transformer = make_pipe("sd3").transformer
    g = torch.Generator().manual_seed(13)
    shapes = {  # stem: (rank, alpha)
        "joint_blocks_0_x_block_attn_qkv": (5, 2.0), "joint_blocks_0_context_block_attn_qkv": (3, 0.5),
        "joint_blocks_0_x_block_mlp_fc1": (2, 1.0), "joint_blocks_0_context_block_adaLN_modulation_1": (4, 4.0),
        "final_layer_adaLN_modulation_1": (2, 3.0), "context_embedder": (3, 1.0),
    }  # fmt: skip
    layers = {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    rows = {
        "joint_blocks_0_x_block_attn_qkv": ["transformer_blocks.0.attn.to_q"] * 3,
        "joint_blocks_0_context_block_attn_qkv": ["transformer_blocks.0.attn.add_q_proj"] * 3,
        "joint_blocks_0_x_block_mlp_fc1": ["transformer_blocks.0.ff.net.0.proj"],
        "joint_blocks_0_context_block_adaLN_modulation_1": ["transformer_blocks.0.norm1_context.linear"],
        "final_layer_adaLN_modulation_1": ["norm_out.linear"],
        "context_embedder": ["context_embedder"],
    }
    tensors = {}
    for name, (rank, alpha) in shapes.items():
        fan_out = sum(layers[p].weight.shape[0] for p in rows[name])
        fan_in = layers[rows[name][0]].weight.shape[1]
        tensors[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=g) * 0.3
        tensors[f"lora_unet_{name}.lora_up.weight"] = torch.randn(fan_out, rank, generator=g) * 0.3
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, tmp_path / "sd3.safetensors")
    ours = make_pipe("sd3").transformer
    lora_kit.load(ours, tmp_path / "sd3.safetensors")
    assert_close_scaled(forward_main(ours), _sd3_fused_formula(transformer, tensors), reduction=ours)
    assert describe(tmp_path / "sd3.safetensors")["format"] == "sd-scripts-sd3"


@pytest.mark.conformance(
    dialect="musubi-tuner (= kohya-bfl)", kind="lora", arch="flux", checks="read", reference="by hand"
)
def test_musubi_tuner_flux_names_are_sd_scripts_bfl_names(make_pipe):
    """musubi-tuner's FLUX.1 LoRAs name a module `lora_unet` + "." + its path under BFL's DoubleStreamBlock /
    SingleStreamBlock, dots made underscores (networks/lora_flux.py over networks/lora.py): sd-scripts' names, read
    by the same reader."""
    transformer = make_pipe("flux").transformer
    blocks = [f"double_blocks.0.{n}" for n in ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
              "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")] + [
             f"single_blocks.0.{n}" for n in ("linear1", "linear2")]  # fmt: skip
    musubi = {("lora_unet" + "." + path).replace(".", "_") for path in blocks}
    assert musubi <= set(kohya_flux.bfl_names(transformer))
    assert dialects.dialect_of(f"{n}.lora_down.weight" for n in musubi) == "kohya-bfl"


@pytest.mark.parametrize("dialect", ["onetrainer", "lycoris"])
@pytest.mark.conformance(dialect="{dialect}", kind="lora", arch="flux", checks="read", reference="round trip")
def test_flat_diffusers_dialects(make_pipe, tmp_path, dialect):
    """OneTrainer's `lora_transformer_<path>` (its text encoders: kohya's `lora_te1_`) and LyCORIS' standalone
    `lycoris_<path>`: written here from the canonical dict, read back to it bit for bit."""
    pipe = make_pipe("flux")
    _adapt(pipe)
    state = lora_state_dict(pipe)
    prefix = dialects.FLAT_PREFIX[dialect]
    tensors = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        path, _, suffix = rest.partition(".lora_") if ".lora_" in rest else rest.rpartition(".")
        suffix = ("lora_" + suffix) if ".lora_" in rest else suffix
        if component == "transformer":
            tensors[f"{prefix}{path.replace('.', '_')}.{suffix}"] = tensor
        elif dialect == "onetrainer":
            tensors[f"lora_te1_text_model_{path.replace('.', '_')}.{suffix}"] = tensor
    save_file(tensors, tmp_path / "f.safetensors")
    read, _ = formats.read(tmp_path / "f.safetensors", make_pipe("flux"))
    _equal(read, {k: t for k, t in state.items() if dialect == "onetrainer" or k.startswith("transformer.")})
    assert describe(tmp_path / "f.safetensors")["format"] == dialect
    if dialect == "lycoris":  # LyCORIS wrapping a UNet: its diffusers paths
        sd1 = make_pipe("sd1")
        inject_lora(sd1.unet, "attn", rank=2, alpha=1.0, name="x")
        randomize_adapters(sd1, seed=2)
        unet_state = lora_state_dict(sd1)
        flat = {}
        for key, tensor in unet_state.items():
            rest = key.removeprefix("unet.")
            path, suffix = (rest.split(".lora_")[0], "lora_" + rest.split(".lora_")[1]) if ".lora_" in rest else (
                rest.rpartition(".")[0], "alpha")  # fmt: skip
            flat[f"lycoris_{path.replace('.', '_')}.{suffix}"] = tensor
        save_file(flat, tmp_path / "unet.safetensors")
        _equal(formats.read(tmp_path / "unet.safetensors", make_pipe("sd1"))[0], unet_state)
        assert describe(tmp_path / "unet.safetensors")["components"] == {"lycoris": len(unet_state) // 3}


def test_unknown_keys_are_one_line_errors(make_pipe, tmp_path):
    """A key that names no layer, or a module named twice, is refused in one line naming the file; lora-convert
    exits 2 and writes nothing."""
    from lora_kit.cli.convert import main as convert

    good = _flux_comfy_file(tmp_path / "good.safetensors", make_pipe("flux").transformer)
    pair = {k: good[k] for k in good if "img_attn.proj" in k}
    bad = {
        "extra.safetensors": {
            **good,
            "diffusion_model.double_blocks.0.img_attn.nope.lora_A.weight": torch.ones(2, 32),
        },
        "block.safetensors": {k.replace("blocks.0.", "blocks.7."): t for k, t in pair.items()},
        "twice.safetensors": {
            **pair,
            **{
                k.replace("double_blocks.0.img_attn.proj", "transformer_blocks.0.attn.to_out.0"): t.clone()
                for k, t in pair.items()
            },
        },
        "encoder.safetensors": {
            **pair,
            "text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.alpha": torch.tensor(1.0),
        },  # (FLUX has no CLIP-G)
        "lycoris.safetensors": {
            "lycoris_transformer_blocks_0_attn_to_q.lora_down.weight": torch.ones(2, 32),
            "lycoris_no_such_layer.lora_down.weight": torch.ones(2, 32),
        },  # fmt: skip
    }
    pipe = make_pipe("flux")
    base = forward_main(pipe.transformer)
    for name, tensors in bad.items():
        save_file(tensors, tmp_path / name)
        with pytest.raises(LoraKitError) as info:
            lora_kit.load(pipe, tmp_path / name)
        text = str(info.value)
        assert name in text and "\n" not in text, text
        assert ("name one module" if name == "twice.safetensors" else "name no layer") in text, text
    assert not list(lora_modules(pipe.transformer)) and torch.equal(forward_main(pipe.transformer), base)
    result = CliRunner().invoke(convert, [str(tmp_path / "extra.safetensors"), "--to", "kohya", "-o",
                                          str(tmp_path / "out.safetensors")])  # fmt: skip
    assert result.exit_code == 2 and "extra.safetensors" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_convert_cli_to_comfyui_on_a_real_size_file(tmp_path, arch):
    """lora-convert --to comfyui without --model (the real FLUX.1 / SD3 built on the meta device): sd-scripts'
    fused names in, ComfyUI's out, the same factors; and back to kohya, the same file."""
    from lora_kit.cli.convert import main as convert

    g = torch.Generator().manual_seed(0)
    hidden = {"flux": 3072, "sd3": 1536}[arch]
    name = {"flux": "double_blocks.0.img_attn.qkv", "sd3": "joint_blocks.0.x_block.attn.qkv"}[arch]
    stem = kohya_flux.kohya_stem(name)
    tensors = {
        f"{stem}.lora_down.weight": torch.randn(2, hidden, generator=g),
        f"{stem}.lora_up.weight": torch.randn(3 * hidden, 2, generator=g),
        f"{stem}.alpha": torch.tensor(2.0),
    }
    version = {"flux": "flux1", "sd3": "sd3"}[arch]
    save_file(tensors, tmp_path / "k.safetensors", metadata={"ss_base_model_version": version})  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(convert, [str(tmp_path / "k.safetensors"), "--to", "comfyui", "-o", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    comfy = files.load(tmp_path / "c")[0]
    _equal(comfy, {k.replace(stem, "diffusion_model." + name): t for k, t in tensors.items()})
    result = runner.invoke(convert, [str(tmp_path / "c"), "--to", "kohya", "-o", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    _equal(files.load(tmp_path / "back")[0], tensors)


def test_comfyui_file_as_stored_for_model_free_commands(make_pipe, tmp_path):
    """lora-merge A B / lora-resize read a file without a model: ComfyUI's lora_A/lora_B read as lora_down/lora_up
    under the stored names, written back in ComfyUI's spelling; XLabs' down/up likewise."""
    from lora_kit.formats.stored import read_lora, write_lora

    good = _flux_comfy_file(tmp_path / "c.safetensors", make_pipe("flux").transformer)
    renamed = {k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): t for k, t in good.items()}
    save_file(renamed, tmp_path / "ab.safetensors")
    state, fmt, _ = read_lora(tmp_path / "ab.safetensors")
    assert fmt == "comfyui"
    _equal(state, good)
    _xlabs_file(tmp_path / "x.safetensors", make_pipe("flux").transformer)
    state, fmt, _ = read_lora(tmp_path / "x.safetensors")
    assert fmt == "xlabs" and all(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in state)
    write_lora(tmp_path / "x2.safetensors", state, fmt, "flux")
    _equal(files.load(tmp_path / "x2.safetensors")[0], files.load(tmp_path / "x.safetensors")[0])


def test_other_kinds_pass_through_unfused_and_split_or_refused_on_fused(make_pipe):
    """Suffixes of other adapter kinds stay with their module; on a fused module they are split by rows
    (lora_kit.kinds.split_rows), or refused in one line naming the file and the module where no exact split exists
    (a DoRA norm over input columns spans every part)."""
    transformer = make_pipe("flux").transformer
    table = original.layout(transformer)
    proj = table["double_blocks.0.img_attn.proj"]
    w = torch.ones(2, 32)
    assert original.split("p", proj, {"hada_w1_a": w}, transformer, "f.safetensors") == {
        "transformer.transformer_blocks.0.attn.to_out.0.hada_w1_a": w
    }
    qkv = table["double_blocks.0.img_attn.qkv"]
    diff = torch.randn(96, 32)
    got = original.split("qkv", qkv, {"diff": diff}, transformer, "f.safetensors")
    for i, path in enumerate(qkv.paths):
        assert torch.equal(got[f"transformer.{path}.diff"], diff[32 * i : 32 * (i + 1)])
    parts = {
        "lora_down.weight": torch.ones(2, 32),
        "lora_up.weight": torch.ones(96, 2),
        "dora_scale": torch.ones(1, 32),
    }
    with pytest.raises(LoraKitError, match=r"^f\.safetensors: qkv fuses .*to_q.*dora_scale.* cannot be split: "):
        original.split("qkv", qkv, parts, transformer, "f.safetensors")


@pytest.mark.conformance(dialect="comfyui", kind="loha, full", arch="flux", checks="read apply", reference="by hand")
def test_comfyui_file_of_other_kinds(make_pipe, tmp_path):
    """A LoHa on an unfused module and a full diff on a fused qkv under ComfyUI's names: read through the same map,
    applied as W + alpha/r * (w1a @ w1b) * (w2a @ w2b) and W + diff (by hand here). ComfyUI files are written for
    LoRA pairs only: another kind is refused in one line."""
    g = torch.Generator().manual_seed(14)
    proj, qkv = "diffusion_model.double_blocks.0.img_attn.proj", "diffusion_model.double_blocks.0.img_attn.qkv"
    loha = {
        f"hada_w{i}_{ab}": torch.randn(*((32, 2) if ab == "a" else (2, 32)), generator=g)
        for i in (1, 2)
        for ab in "ab"
    }
    diff = torch.randn(96, 32, generator=g) * 0.1
    tensors = {**{f"{proj}.{k}": t for k, t in loha.items()}, f"{proj}.alpha": torch.tensor(1.0), f"{qkv}.diff": diff}
    save_file(tensors, tmp_path / "kinds.safetensors")
    ours = make_pipe("flux")
    lora_kit.load(ours, tmp_path / "kinds.safetensors")
    expected = make_pipe("flux").transformer
    with torch.no_grad():
        delta = 0.5 * (loha["hada_w1_a"] @ loha["hada_w1_b"]) * (loha["hada_w2_a"] @ loha["hada_w2_b"])
        expected.get_submodule("transformer_blocks.0.attn.to_out.0").weight += delta
        for i, x in enumerate("qkv"):
            expected.get_submodule(f"transformer_blocks.0.attn.to_{x}").weight += diff[32 * i : 32 * (i + 1)]
    assert_close_scaled(forward_main(ours.transformer), forward_main(expected), reduction=expected)
    with pytest.raises(LoraKitError, match=r"is not a LoRA pair .*format='kohya'"):
        lora_kit.save(ours, tmp_path / "out.safetensors", format="comfyui")


@pytest.mark.parametrize(("width", "arch"), [(3072, "flux"), (1536, "sd3"), (2432, "sd3")])
def test_dit_files_without_metadata_tell_flux_from_sd3_by_width(tmp_path, width, arch):
    """FLUX's double blocks and SD3's blocks share diffusers' names: the attention's input width tells them apart in
    files that do not say (LyCORIS's lycoris_ names, diffusers' transformer. keys)."""
    for stem in ("lycoris_transformer_blocks_0_attn_to_q", "transformer.transformer_blocks.0.attn.to_q"):
        path = tmp_path / f"{stem[:8]}.safetensors"
        save_file({f"{stem}.lora_down.weight": torch.zeros(2, width), f"{stem}.lora_up.weight": torch.zeros(width, 2)},
                  str(path))  # fmt: skip
        assert describe(path)["architecture"] == arch
