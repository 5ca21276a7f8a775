"""File formats: key names, metadata, uniform alpha, and one clear error for every bad file."""

import hashlib
import json
import struct

import pytest
import torch
from conftest import assert_close_scaled, assert_outputs_close, main_model, pipeline_outputs, randomize_adapters
from safetensors.torch import save_file

import lora_kit
from lora_kit import LoraKitError
from lora_kit.formats import files
from lora_kit.inject import inject_lora, lora_modules
from lora_kit.state import components


@pytest.fixture
def sd1(make_pipe):
    pipe = make_pipe("sd1")
    inject_lora(pipe.unet, "locon", rank=4, alpha=1.0, conv_rank=2, conv_alpha=3.0)
    inject_lora(pipe.text_encoder, "clip-attn", rank=2, alpha=2.0)
    randomize_adapters(pipe, seed=11)
    return pipe


def test_kohya_names_and_metadata_sd1(sd1, tmp_path):
    path = lora_kit.save(sd1, tmp_path / "a.safetensors", metadata={"trigger_words": ["sks"]})
    header, meta = files.read_header(path)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in header
    assert "lora_unet_down_blocks_0_resnets_0_conv1.alpha" in header
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in header
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in header)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_dim"] == "Dynamic" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["lora_kit.trigger_words"]) == ["sks"]
    tensors, _ = files.load(path)
    alphas = {float(t) for k, t in tensors.items() if k.endswith(".alpha")}
    assert len(alphas) == 1  # one alpha for every module, whatever was trained
    assert meta["ss_network_alpha"] == f"{alphas.pop():g}"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n :]).hexdigest()


def test_sdxl_writes_sgm_names_and_reads_both_spellings(make_pipe, tmp_path):
    pipe = make_pipe("sdxl")
    inject_lora(pipe.unet, "locon", rank=2)
    inject_lora(pipe.text_encoder, "clip-attn", rank=2)
    inject_lora(pipe.text_encoder_2, "clip-attn", rank=2)
    randomize_adapters(pipe, seed=2)
    path = lora_kit.save(pipe, tmp_path / "xl.safetensors")
    header, meta = files.read_header(path)
    for key in [
        "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k",  # down_blocks.1.attentions.0
        "lora_unet_input_blocks_3_0_skip_connection",  # down_blocks.1.resnets.0.conv_shortcut
        "lora_unet_input_blocks_2_0_op",  # down_blocks.0.downsamplers.0.conv
        "lora_unet_middle_block_1_proj_in", "lora_unet_middle_block_2_out_layers_3",
        "lora_unet_output_blocks_1_2_conv",  # up_blocks.0.upsamplers.0.conv (after the attention)
        "lora_unet_output_blocks_3_0_emb_layers_1",  # up_blocks.1.resnets.0.time_emb_proj
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_1_self_attn_out_proj",
    ]:  # fmt: skip
        assert key + ".lora_down.weight" in header, key
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    # the same LoRA spelled with diffusers paths (what diffusers' converter writes) reads to the same model
    tensors, _ = files.load(path)
    mapping = {}
    for p, _ in lora_modules(pipe.unet):
        from lora_kit.formats.kohya import sgm_blocks, to_sgm

        mapping["lora_unet_" + to_sgm(p, sgm_blocks(pipe.unet.config)).replace(".", "_")] = "lora_unet_" + p.replace(
            ".", "_"
        )
    renamed = {}
    for k, t in tensors.items():
        stem, dot, rest = k.partition(".")
        renamed[mapping.get(stem, stem) + dot + rest] = t
    save_file(renamed, tmp_path / "diffusers_names.safetensors")
    a, b = make_pipe("sdxl"), make_pipe("sdxl")
    lora_kit.load(a, path)
    lora_kit.load(b, tmp_path / "diffusers_names.safetensors")
    out_a, out_b = pipeline_outputs(a), pipeline_outputs(b)
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)


def test_peft_format_carries_alpha_metadata(sd1, make_pipe, tmp_path):
    expected = pipeline_outputs(sd1)
    path = lora_kit.save(sd1, tmp_path / "p.safetensors", format="peft")
    header, meta = files.read_header(path)
    assert all(".lora_A." in k or ".lora_B." in k for k in header)
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["unet.lora_alpha"] == config["text_encoder.lora_alpha"]
    assert config["unet.r"] == 4 and all(r == 2 for r in config["unet.rank_pattern"].values())
    theirs = make_pipe("sd1")  # diffusers' own loader reads the alphas from the metadata
    theirs.load_lora_weights(str(path))
    assert_outputs_close(pipeline_outputs(theirs), expected, sd1)
    ours = make_pipe("sd1")
    lora_kit.load(ours, path)
    assert_outputs_close(pipeline_outputs(ours), expected, sd1)


def test_fp16_dtype_and_existing_output(sd1, tmp_path):
    path = lora_kit.save(sd1, tmp_path / "h.safetensors", dtype=torch.float16)
    tensors, _ = files.load(path)
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {t.dtype for k, t in tensors.items() if k.endswith(".alpha")} == {torch.float32}
    before = path.read_bytes()
    with pytest.raises(LoraKitError, match="already exists"):
        lora_kit.save(sd1, path)
    assert path.read_bytes() == before
    lora_kit.save(sd1, path, force=True)
    with pytest.raises(LoraKitError, match="does not exist"):
        lora_kit.save(sd1, tmp_path / "missing" / "x.safetensors")


def _bad_files(tmp_path, good):
    raw = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) - 100])
    (tmp_path / "text.safetensors").write_text("hello, I am not a tensor file" * 3)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    tensors, _ = files.load(good)
    save_file({"lora_unet_no_such_block.lora_down.weight": torch.zeros(2, 4)}, tmp_path / "keys.safetensors")
    shapes = {
        k: (t[:, :1].contiguous() if k.endswith("lora_down.weight") and t.dim() == 2 else t)
        for k, t in tensors.items()
    }
    save_file(shapes, tmp_path / "shapes.safetensors")
    nan = dict(tensors)
    k0 = next(k for k in nan if k.endswith("lora_up.weight"))
    nan[k0] = torch.full_like(nan[k0], float("nan"))
    save_file(nan, tmp_path / "nan.safetensors")
    save_file(
        {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}, tmp_path / "loha.safetensors"
    )
    save_file({"weight": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    torch.save({"a": torch.zeros(1)}, tmp_path / "pickle.pt")
    return {
        "missing.safetensors": "no such file", "trunc.safetensors": "truncated",
        "text.safetensors": "not a safetensors", "empty.safetensors": "not a safetensors",
        "keys.safetensors": "name no layer of this sd1 model",
        "shapes.safetensors": "do not fit a layer", "nan.safetensors": "NaN or inf", "loha.safetensors": "LoHa",
        "foreign.safetensors": "not a LoRA file", "pickle.pt": "pickled files are not read",
    }  # fmt: skip


def test_bad_files_one_clear_error_and_nothing_changes(sd1, make_pipe, tmp_path):
    good = lora_kit.save(sd1, tmp_path / "good.safetensors")
    cases = _bad_files(tmp_path, good)
    pipe = make_pipe("sd1")
    base = pipeline_outputs(pipe)
    for name, message in cases.items():
        path = tmp_path / name
        before = path.read_bytes() if path.exists() else None
        with pytest.raises(LoraKitError) as info:
            lora_kit.load(pipe, path)
        text = str(info.value)
        assert message in text and name in text and "\n" not in text, (name, text)
        assert not any(True for m in components(pipe).values() for _ in lora_modules(m)), name
        if before is not None:
            assert path.read_bytes() == before
    after = pipeline_outputs(pipe)
    assert all(torch.equal(base[k], after[k]) for k in base)


def test_wrong_architecture_is_refused(make_pipe, tmp_path):
    xl = make_pipe("sdxl")
    inject_lora(main_model(xl), "attn", rank=2)
    inject_lora(xl.text_encoder_2, "clip-attn", rank=2)
    path = lora_kit.save(xl, tmp_path / "xl.safetensors")
    with pytest.raises(LoraKitError, match="xl.safetensors: .* keys name no layer of this sd1 model"):
        lora_kit.load(make_pipe("sd1"), path)


def test_load_names_and_replace(sd1, make_pipe, tmp_path):
    path = lora_kit.save(sd1, tmp_path / "style.safetensors")
    pipe = make_pipe("sd1")
    assert lora_kit.load(pipe, path, weight=0.5) == "style"
    with pytest.raises(LoraKitError, match="already loaded"):
        lora_kit.load(pipe, path)
    lora_kit.load(pipe, path, replace=True)
    lora_kit.load(pipe, path, name="again")
    wrappers = dict(lora_modules(pipe.unet))
    assert all(set(w.adapters) == {"style", "again"} for w in wrappers.values())
    lora_kit.unload(pipe, "style")
    lora_kit.unload(pipe, "again")
    assert not list(lora_modules(pipe.unet)) and not list(lora_modules(pipe.text_encoder))


def test_sdxl_text_projection_key(make_pipe, tmp_path):
    """text_encoder_2.text_projection lies outside text_model: sd-scripts, ComfyUI and diffusers call it
    `lora_te2_text_projection`. diffusers' loader on the file == lora_kit; the old text_model_ spelling reads too."""
    pipe = make_pipe("sdxl")
    inject_lora(pipe.text_encoder_2, paths=["text_projection"], rank=2, alpha=2.0, name="x")
    inject_lora(pipe.text_encoder_2, "clip-attn", rank=2, alpha=2.0, name="x")
    randomize_adapters(pipe, seed=1)
    path = lora_kit.save(pipe, tmp_path / "tp.safetensors")
    tensors, _ = files.load(path)
    assert "lora_te2_text_projection.lora_down.weight" in tensors
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors

    def embeds(p):
        with torch.no_grad():
            return p.text_encoder_2(torch.tensor([[1, 5, 9, 2]])).text_embeds

    expected = embeds(pipe)
    theirs = make_pipe("sdxl")
    theirs.load_lora_weights(str(path), adapter_name="x")
    assert_close_scaled(embeds(theirs), expected, reduction=pipe.text_encoder_2)
    assert not torch.allclose(embeds(make_pipe("sdxl")), expected, atol=1e-3)
    old = {k.replace("lora_te2_text_projection", "lora_te2_text_model_text_projection"): t for k, t in tensors.items()}
    save_file(old, tmp_path / "old.safetensors")
    ours = make_pipe("sdxl")
    lora_kit.load(ours, tmp_path / "old.safetensors")
    assert torch.equal(embeds(ours), expected)


def test_two_spellings_of_one_module_are_refused(sd1, make_pipe, tmp_path):
    """A file that names one module twice (lora_te_ and lora_te1_; diffusers and SGM block names) would keep only
    the last key read: it is refused in one line that names the file and both keys."""
    path = lora_kit.save(sd1, tmp_path / "a.safetensors")
    tensors, _ = files.load(path)
    pairs = [
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te1_encoder_layers_0_self_attn_q_proj"),
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
         "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"),
    ]  # fmt: skip
    pipe = make_pipe("sd1")
    for stem, other in pairs:
        twice = dict(tensors)
        twice.update({k.replace(stem, other): t.clone() for k, t in tensors.items() if k.startswith(stem + ".")})
        save_file(twice, tmp_path / "twice.safetensors")
        with pytest.raises(LoraKitError) as info:
            lora_kit.load(pipe, tmp_path / "twice.safetensors")
        text = str(info.value)
        assert "twice.safetensors" in text and stem in text and other in text and "\n" not in text, text
        assert not any(True for m in components(pipe).values() for _ in lora_modules(m))


def test_load_then_save_keeps_the_file_dtype(sd1, make_pipe, tmp_path):
    """file -> memory -> file is bit-exact, dtype included (adapters compute in fp32 in between); adapters made
    here, or loaded from a file holding two dtypes, are written in fp32."""
    for dtype in (torch.float16, torch.bfloat16):
        first = lora_kit.save(sd1, tmp_path / f"{dtype}.safetensors", dtype=dtype)
        pipe = make_pipe("sd1")
        lora_kit.load(pipe, first)
        again = files.load(lora_kit.save(pipe, tmp_path / f"again-{dtype}.safetensors"))[0]
        tensors = files.load(first)[0]
        assert again.keys() == tensors.keys()
        for k, t in tensors.items():
            assert again[k].dtype == t.dtype and torch.equal(again[k], t), k
    fresh = files.load(lora_kit.save(sd1, tmp_path / "trained.safetensors"))[0]
    assert {t.dtype for t in fresh.values()} == {torch.float32}
    mixed = {k: t.float() if k.startswith("lora_te_") else t for k, t in tensors.items()}
    save_file(mixed, tmp_path / "mixed.safetensors")
    pipe = make_pipe("sd1")
    lora_kit.load(pipe, tmp_path / "mixed.safetensors")
    out = files.load(lora_kit.save(pipe, tmp_path / "mixed-again.safetensors"))[0]
    assert {t.dtype for t in out.values()} == {torch.float32}
    assert all(torch.equal(out[k], t.float()) for k, t in mixed.items())


def test_peft_text_encoder_keys_say_text_model(make_pipe, tmp_path):
    """CLIPTextModel keys are written `text_encoder.text_model.encoder...` (diffusers' spelling, the one ComfyUI
    maps), with the LoraConfig's rank_pattern still matching in diffusers 0.42 + transformers 5 (mixed ranks);
    lora_kit reads that spelling and the one without `text_model.`."""
    pipe = make_pipe("sd1")
    inject_lora(pipe.unet, "attn", rank=2, alpha=3.0)
    inject_lora(pipe.text_encoder, "clip-attn", rank=2, alpha=3.0)
    inject_lora(pipe.text_encoder, paths=["encoder.layers.1.mlp.fc1"], rank=4, alpha=3.0)
    randomize_adapters(pipe, seed=4)
    expected = pipeline_outputs(pipe)
    path = lora_kit.save(pipe, tmp_path / "p.safetensors", format="peft")
    tensors, meta = files.load(path)
    te = [k for k in tensors if k.startswith("text_encoder.")]
    assert te and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te)
    assert json.loads(meta["lora_adapter_metadata"])["text_encoder.rank_pattern"] == {"encoder.layers.1.mlp.fc1": 4}
    theirs = make_pipe("sd1")
    theirs.load_lora_weights(str(path))
    assert_outputs_close(pipeline_outputs(theirs), expected, pipe)
    short = {k.replace("text_encoder.text_model.", "text_encoder."): t for k, t in tensors.items()}
    save_file(short, tmp_path / "short.safetensors", metadata=meta)
    for f in (path, tmp_path / "short.safetensors"):
        ours = make_pipe("sd1")
        lora_kit.load(ours, f)
        assert_outputs_close(pipeline_outputs(ours), expected, pipe)


def test_alpha_zero_means_scale_zero_and_writes_exactly(sd1, make_pipe, tmp_path):
    """Most modules with alpha 0 (read as scale 0, as diffusers and ComfyUI do): load + save and lora-merge write
    one nonzero alpha and zero ups for those modules, so every file gives the forward of the file without them."""
    from lora_kit import tools

    tensors, _ = files.load(lora_kit.save(sd1, tmp_path / "a.safetensors"))
    stems = sorted(k[: -len(".alpha")] for k in tensors if k.endswith(".alpha"))
    zero = set(stems[: len(stems) * 2 // 3])
    save_file({k: torch.tensor(0.0) if k[: -len(".alpha")] in zero else t for k, t in tensors.items()},
              tmp_path / "zero.safetensors")  # fmt: skip
    save_file({k: t for k, t in tensors.items() if k.split(".")[0] not in zero}, tmp_path / "without.safetensors")
    reference = make_pipe("sd1")
    lora_kit.load(reference, tmp_path / "without.safetensors")
    expected = pipeline_outputs(reference)
    pipe = make_pipe("sd1")
    lora_kit.load(pipe, tmp_path / "zero.safetensors")
    assert_outputs_close(pipeline_outputs(pipe), expected, reference)
    saved = lora_kit.save(pipe, tmp_path / "saved.safetensors")
    merged = tmp_path / "merged.safetensors"
    tools.merge([tmp_path / "zero.safetensors"], merged, [1.0])
    for path in (saved, merged):
        written, _ = files.load(path)
        assert len({float(t) for k, t in written.items() if k.endswith(".alpha")} - {0.0}) == 1
        assert all(not written[f"{stem}.lora_up.weight"].any() for stem in zero)
        again = make_pipe("sd1")
        lora_kit.load(again, path)
        assert_outputs_close(pipeline_outputs(again), expected, reference)


def test_bare_text_encoder_takes_its_own_adapters(make_pipe, tmp_path):
    """A bare SDXL text_encoder_2 (CLIPTextModelWithProjection) takes te2's factors (it took te1's), keeps the name
    for save; SD3's two CLIPs cannot be told apart: refused in one line unless component= says which."""
    from conftest import forward_text

    src = make_pipe("sdxl")
    inject_lora(src.text_encoder, "clip-attn", rank=2, alpha=2.0)
    inject_lora(src.text_encoder_2, "clip-attn", rank=2, alpha=2.0)
    randomize_adapters(src, seed=2)
    both = lora_kit.save(src, tmp_path / "both.safetensors")
    for component in ("text_encoder", "text_encoder_2"):
        bare = getattr(make_pipe("sdxl"), component)
        lora_kit.load(bare, both)
        assert_close_scaled(forward_text(bare), forward_text(getattr(src, component)), reduction=bare)
    again = files.load(lora_kit.save(bare, tmp_path / "te2.safetensors"))[0]
    original = files.load(both)[0]
    assert again.keys() == {k for k in original if k.startswith("lora_te2_")}
    assert all(torch.equal(t, original[k]) for k, t in again.items())
    with pytest.raises(LoraKitError, match=r"te2\.safetensors: holds no adapters for a bare CLIPTextModel \("):
        lora_kit.load(make_pipe("sdxl").text_encoder, tmp_path / "te2.safetensors")

    sd3 = make_pipe("sd3")
    inject_lora(sd3.text_encoder, "clip-attn", rank=2, alpha=2.0)
    inject_lora(sd3.text_encoder_2, "clip-attn", rank=2, alpha=2.0)
    randomize_adapters(sd3, seed=3)
    path = lora_kit.save(sd3, tmp_path / "sd3.safetensors")
    bare = make_pipe("sd3").text_encoder_2
    base = forward_text(bare)
    with pytest.raises(LoraKitError) as info:
        lora_kit.load(bare, path)
    assert "sd3.safetensors" in str(info.value) and "component=" in str(info.value) and "\n" not in str(info.value)
    assert torch.equal(forward_text(bare), base) and not list(lora_modules(bare))
    lora_kit.load(bare, path, component="text_encoder_2")
    assert_close_scaled(forward_text(bare), forward_text(sd3.text_encoder_2), reduction=bare)
    # saved, it is SD3's text_encoder_2 (its class is SDXL's): what the pipeline wrote for it, SD3's names
    header, meta = files.read_header(lora_kit.save(bare, tmp_path / "sd3-te2.safetensors"))
    assert meta["lora_kit.architecture"] == "sd3" and meta["ss_base_model_version"] == "sd3"
    written, original = files.load(tmp_path / "sd3-te2.safetensors")[0], files.load(path)[0]
    assert written.keys() == {k for k in original if k.startswith("text_encoder_2.")}
    assert all(torch.equal(t, original[k]) for k, t in written.items())


def test_sd2_metadata_follows_the_prediction_type(make_pipe, tmp_path):
    """sd-scripts' names: v-prediction SD2 is sd_v2_v / stable-diffusion-v2-768-v, epsilon SD2 is sd_v2 /
    stable-diffusion-v2-512 (every SD2 file said 768-v with sd_v2). lora-resize keeps what its input says."""
    from lora_kit import tools
    from lora_kit.formats.header import describe

    expected = {"v_prediction": ("sd_v2_v", "stable-diffusion-v2-768-v/lora", "v"),
                "epsilon": ("sd_v2", "stable-diffusion-v2-512/lora", "epsilon")}  # fmt: skip
    for prediction, (version, spec, short) in expected.items():
        pipe = make_pipe("sd2")
        pipe.scheduler.register_to_config(prediction_type=prediction)
        inject_lora(pipe.unet, "attn", rank=2)
        randomize_adapters(pipe)
        path = lora_kit.save(pipe, tmp_path / f"{prediction}.safetensors")
        resized = tools.resize(path, tmp_path / f"{prediction}-r1.safetensors", rank=1).path
        for p in (path, resized):
            meta = files.read_header(p)[1]
            assert meta["ss_base_model_version"] == version and meta["modelspec.architecture"] == spec, p
            assert meta["modelspec.prediction_type"] == short and meta["ss_v2"] == "True"
            assert describe(p)["architecture"] == "sd2"
    sd1 = make_pipe("sd1")  # epsilon
    inject_lora(sd1.unet, "attn", rank=2)
    meta = files.read_header(lora_kit.save(sd1, tmp_path / "sd1.safetensors"))[1]
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == ("sd_v1", "stable-diffusion-v1/lora")
