"""kohya BFL names for FLUX (the default FLUX format): q/k/v (and proj_mlp) fused on write and split on read, both
exactly. diffusers' own loader and the kohya formula on a fused view of the weights are the independent checks.

diffusers 0.42.1's converter hard-codes FLUX.1's sizes for `single_blocks_N_linear1` (3072 x 3 + 12288 rows) and
fails on any other size, and it silently drops the layers outside the blocks (`final_layer_*`, `img_in`, `txt_in`,
`time_in_*`, ...: their converted keys lack the `transformer.` prefix). Those are checked against the formula only.
"""

import pytest
import torch
from conftest import assert_close_scaled, assert_outputs_close, forward_main, pipeline_outputs, randomize_adapters
from safetensors.torch import save_file

import lora_kit
from lora_kit import LoraKitError
from lora_kit.formats import files, kohya_flux
from lora_kit.inject import find_targets, inject_lora, lora_modules
from lora_kit.state import components

HIDDEN, MLP = 32, 128  # the tiny transformer: 2 heads x 16, mlp_ratio 4
LINEAR1 = [f"single_transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
ODD = {  # rank 2 / alpha 3 inside fused groups whose other parts are rank 4 / alpha 1
    "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.ff.net.2",
    "single_transformer_blocks.0.proj_mlp",
}  # fmt: skip


def _adapt(pipe):
    dit = find_targets(pipe.transformer, "dit")
    inject_lora(pipe.transformer, paths=[p for p in dit if p not in ODD], rank=4, alpha=1.0, name="x")
    inject_lora(pipe.transformer, paths=[p for p in dit if p in ODD], rank=2, alpha=3.0, name="x")
    inject_lora(pipe.text_encoder, "clip-all", rank=2, alpha=5.0, name="x")
    randomize_adapters(pipe, seed=5)


def _peft_paths(module, adapter):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n for n, m in module.named_modules() if isinstance(m, BaseTunerLayer) and adapter in m.active_adapters}


@pytest.fixture
def saved(make_pipe, tmp_path):
    pipe = make_pipe("flux")
    _adapt(pipe)
    return pipe, lora_kit.save(pipe, tmp_path / "flux.safetensors")


def test_default_write_is_fused_bfl(saved):
    pipe, path = saved
    tensors, meta = files.load(path)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert tensors[qkv + ".lora_up.weight"].shape == (3 * HIDDEN, 4 + 2 + 4)  # block-diagonal, ranks stacked
    assert tensors[qkv + ".lora_down.weight"].shape == (10, HIDDEN)
    assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * HIDDEN + MLP, 14)
    for stem in ["double_blocks_0_txt_attn_qkv", "double_blocks_0_img_attn_proj", "double_blocks_0_txt_mlp_2",
                 "single_blocks_0_linear2", "te1_text_model_encoder_layers_1_mlp_fc1"]:  # fmt: skip
        assert f"lora_{'' if stem.startswith('te1') else 'unet_'}{stem}.alpha" in tensors, stem
    assert not any("to_q" in k or "transformer_blocks" in k for k in tensors)
    assert len({float(t) for k, t in tensors.items() if k.endswith(".alpha")}) == 1
    assert meta["ss_base_model_version"] == "flux1"
    # every block is the part's own delta at the file's one alpha / fused rank: off-diagonal blocks are zero
    up = tensors[qkv + ".lora_up.weight"]
    assert not up[:HIDDEN, 4:].any() and not up[HIDDEN : 2 * HIDDEN, :4].any() and not up[2 * HIDDEN :, :6].any()


@pytest.mark.conformance(dialect="kohya-bfl", kind="lora", arch="flux", checks="write apply", reference="diffusers")
def test_diffusers_loader_matches_lora_kit(saved, make_pipe, tmp_path):
    pipe, path = saved
    tensors, _ = files.load(path)
    without_linear1 = {k: t for k, t in tensors.items() if "_linear1." not in k}  # see the module docstring
    save_file(without_linear1, tmp_path / "no_linear1.safetensors")
    for p in LINEAR1:
        pipe.transformer.get_submodule(p).adapters["x"].weight = 0.0
    expected = pipeline_outputs(pipe)

    theirs = make_pipe("flux")
    base = pipeline_outputs(theirs)
    theirs.load_lora_weights(str(tmp_path / "no_linear1.safetensors"), adapter_name="x")
    for comp in ("transformer", "text_encoder"):  # the same layers adapted: no key was missed or misnamed
        ours = {p for p, _ in lora_modules(getattr(pipe, comp))} - set(LINEAR1)
        assert _peft_paths(getattr(theirs, comp), "x") == ours, comp
    got = pipeline_outputs(theirs)
    assert_outputs_close(got, expected, pipe)
    assert not torch.allclose(got["main"], base["main"], atol=1e-3)
    assert not torch.allclose(got["text_encoder"], base["text_encoder"], atol=1e-3)


@pytest.mark.conformance(dialect="kohya-bfl", kind="lora", arch="flux", checks="read", reference="round trip")
def test_lora_kit_reads_its_bfl_file(saved, make_pipe):
    pipe, path = saved
    fresh = make_pipe("flux")
    lora_kit.load(fresh, path)
    assert_outputs_close(pipeline_outputs(fresh), pipeline_outputs(pipe), pipe)
    for comp, module in components(pipe).items():  # every delta, fused or not, to the rounding of up @ down
        loaded = dict(lora_modules(getattr(fresh, comp)))
        assert loaded.keys() == dict(lora_modules(module)).keys(), comp
        for layer, wrapper in lora_modules(module):
            d0, d1 = wrapper.delta_weight("x"), loaded[layer].delta_weight("flux")
            rank = max(wrapper.adapters["x"].rank, loaded[layer].adapters["flux"].rank)
            assert_close_scaled(d1, d0, reduction=rank, msg=lambda m, at=f"{comp} {layer}": f"{at}: {m}")


def test_partial_group_writes_zero_rows_and_loads_only_its_layers(make_pipe, tmp_path):
    pipe = make_pipe("flux")
    inject_lora(pipe.transformer, "attn", rank=3, alpha=6.0)  # single block: q, k, v without proj_mlp
    randomize_adapters(pipe, seed=8)
    path = lora_kit.save(pipe, tmp_path / "attn.safetensors")
    tensors, _ = files.load(path)
    up = tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert up.shape == (3 * HIDDEN + MLP, 9) and not up[3 * HIDDEN :].any()
    assert not any("txt_attn_qkv" in k for k in tensors)
    fresh = make_pipe("flux").transformer
    lora_kit.load(fresh, path)
    assert {p for p, _ in lora_modules(fresh)} == {p for p, _ in lora_modules(pipe.transformer)}
    assert_close_scaled(forward_main(fresh), forward_main(pipe.transformer), reduction=fresh)


def _hand_fused_file(path, diffusers_can_load=False):
    """Random fused factors with a dense (not block-diagonal) up, per-module alphas."""
    g = torch.Generator().manual_seed(9)
    modules = {  # stem: (rank, in, out, alpha)
        "lora_unet_double_blocks_0_img_attn_qkv": (5, HIDDEN, 3 * HIDDEN, 2.0),
        "lora_unet_double_blocks_0_txt_attn_qkv": (3, HIDDEN, 3 * HIDDEN, 0.5),
        "lora_unet_double_blocks_0_img_mod_lin": (2, HIDDEN, 6 * HIDDEN, 1.0),
        "lora_unet_single_blocks_0_linear2": (4, HIDDEN + MLP, HIDDEN, 8.0),
    }
    if not diffusers_can_load:  # see the module docstring
        modules["lora_unet_single_blocks_0_linear1"] = (6, HIDDEN, 3 * HIDDEN + MLP, 3.0)
        modules["lora_unet_final_layer_adaLN_modulation_1"] = (2, HIDDEN, 2 * HIDDEN, 0.7)
    tensors = {}
    for stem, (rank, fan_in, fan_out, alpha) in modules.items():
        tensors[stem + ".lora_down.weight"] = torch.randn(rank, fan_in, generator=g) * 0.3
        tensors[stem + ".lora_up.weight"] = torch.randn(fan_out, rank, generator=g) * 0.3
        tensors[stem + ".alpha"] = torch.tensor(alpha)
    save_file(tensors, path)
    return tensors


def _kohya_formula(transformer, tensors):
    """W + alpha/r * up @ down on BFL's fused weights, built here from diffusers' layers and split back."""
    fused = {  # BFL module -> its diffusers layers, in BFL's row order
        "double_blocks_0_img_attn_qkv": [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"],
        "double_blocks_0_txt_attn_qkv": [f"transformer_blocks.0.attn.add_{x}_proj" for x in "qkv"],
        "double_blocks_0_img_mod_lin": ["transformer_blocks.0.norm1.linear"],
        "single_blocks_0_linear1": LINEAR1,
        "single_blocks_0_linear2": ["single_transformer_blocks.0.proj_out"],
        "final_layer_adaLN_modulation_1": ["norm_out.linear"],
    }  # fmt: skip
    with torch.no_grad():
        for name, layers in fused.items():
            stem = "lora_unet_" + name
            if stem + ".alpha" not in tensors:
                continue
            down, up = tensors[stem + ".lora_down.weight"], tensors[stem + ".lora_up.weight"]
            weights = [transformer.get_submodule(p).weight for p in layers]
            view = torch.cat(list(weights))
            if name.startswith("final_layer"):  # BFL (shift, scale) rows are diffusers' (scale, shift)
                view = torch.cat(view.chunk(2)[::-1])
            view += float(tensors[stem + ".alpha"]) / down.shape[0] * up @ down
            if name.startswith("final_layer"):
                view = torch.cat(view.chunk(2)[::-1])
            for w, rows in zip(weights, view.split([w.shape[0] for w in weights]), strict=True):
                w.copy_(rows)
    return forward_main(transformer)


def test_hand_written_fused_file(make_pipe, tmp_path):
    full, partial = tmp_path / "fused.safetensors", tmp_path / "fused_for_diffusers.safetensors"
    tensors = _hand_fused_file(full)
    partial_tensors = _hand_fused_file(partial, diffusers_can_load=True)
    for path, expected in [(full, tensors), (partial, partial_tensors)]:
        ours = make_pipe("flux").transformer
        lora_kit.load(ours, path)
        assert "transformer_blocks.0.attn.add_v_proj" in {p for p, _ in lora_modules(ours)}
        formula = _kohya_formula(make_pipe("flux").transformer, expected)
        assert_close_scaled(forward_main(ours), formula, reduction=ours)
        if path == partial:  # diffusers' loader on the same file
            theirs = make_pipe("flux")
            theirs.load_lora_weights(str(path))
            assert_close_scaled(forward_main(theirs.transformer), formula, reduction=ours)
    # a dense fused up splits into parts sharing the file's down; writing them fuses them back at the file's ranks
    # (not stacked again), with one alpha, to the same deltas
    pipe = make_pipe("flux")
    lora_kit.load(pipe.transformer, full)
    again = lora_kit.save(pipe, tmp_path / "again.safetensors")
    written = files.load(again)[0]
    assert written.keys() == tensors.keys() and all(written[k].shape == tensors[k].shape for k in tensors)
    assert len({float(t) for k, t in written.items() if k.endswith(".alpha")}) == 1
    fresh = make_pipe("flux").transformer
    lora_kit.load(fresh, again)
    assert_close_scaled(forward_main(fresh), forward_main(pipe.transformer), reduction=fresh)


def test_bad_bfl_files_one_line_error(make_pipe, tmp_path):
    pipe = make_pipe("flux")
    base = forward_main(pipe.transformer)
    g = torch.Generator().manual_seed(1)

    def pair(stem, rank, rows):
        return {f"lora_unet_{stem}.lora_down.weight": torch.randn(rank, HIDDEN, generator=g),
                f"lora_unet_{stem}.lora_up.weight": torch.randn(rows, rank, generator=g)}  # fmt: skip

    bad = {
        "block.safetensors": (pair("double_blocks_7_img_attn_qkv", 2, 96), "name no layer of this flux model"),
        "rows.safetensors": (pair("double_blocks_0_img_attn_qkv", 2, 64), "need a 2-d down and an up of 96 rows"),
        "half.safetensors": (
            {"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(2, HIDDEN, generator=g)},
            "needs both lora_down and lora_up",
        ),
    }
    for name, (tensors, message) in bad.items():
        save_file(tensors, tmp_path / name)
        with pytest.raises(LoraKitError) as info:
            lora_kit.load(pipe, tmp_path / name)
        text = str(info.value)
        assert message in text and name in text and "\n" not in text, (name, text)
    assert not list(lora_modules(pipe.transformer))
    assert torch.equal(forward_main(pipe.transformer), base)
    # a layer BFL has no name for cannot be written under a BFL name
    with pytest.raises(LoraKitError, match=r"transformer\.extra\.layer has no name in kohya's FLUX"):
        kohya_flux.to_bfl({"extra.layer": {}}, pipe.transformer)


def test_bfl_file_converts_to_peft_and_native(make_pipe, tmp_path):
    """A read gives q/k/v (and proj_mlp) one shared down tensor; every writer must copy shared tensors (safetensors
    refuses shared memory). The peft file in diffusers' loader and the native file in lora_kit == the BFL file."""
    from lora_kit import formats

    full = tmp_path / "fused.safetensors"
    _hand_fused_file(full, diffusers_can_load=True)
    ref = make_pipe("flux")
    lora_kit.load(ref, full)
    expected = forward_main(ref.transformer)
    pipe = make_pipe("flux")
    state, _ = formats.read(full, pipe)
    peft_file = formats.write(tmp_path / "p.safetensors", state, pipe, format="peft")
    native = formats.write(tmp_path / "n.safetensors", state, pipe, format="native")
    theirs = make_pipe("flux")
    theirs.load_lora_weights(str(peft_file))
    assert_close_scaled(forward_main(theirs.transformer), expected, reduction=ref.transformer)
    ours = make_pipe("flux")
    lora_kit.load(ours, native)
    assert_close_scaled(forward_main(ours.transformer), expected, reduction=ref.transformer)


def test_convert_cli_on_a_real_size_bfl_file(tmp_path):
    """lora-convert without --model (FLUX.1 built on the meta device): q/k/v split exactly, nothing shared."""
    from click.testing import CliRunner
    from lora_kit.cli.convert import main as convert

    g = torch.Generator().manual_seed(0)
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    down, up = torch.randn(2, 3072, generator=g), torch.randn(9216, 2, generator=g)
    save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(2.0)},
              tmp_path / "k.safetensors", metadata={"ss_base_model_version": "flux1"})  # fmt: skip
    result = CliRunner().invoke(convert, [str(tmp_path / "k.safetensors"), "--to", "peft", "-o", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    tensors, _ = files.load(tmp_path / "p")
    for i, x in enumerate("qkv"):
        key = f"transformer.transformer_blocks.0.attn.to_{x}"
        assert torch.equal(tensors[f"{key}.lora_A.weight"], down)
        assert torch.equal(tensors[f"{key}.lora_B.weight"], up[i * 3072 : (i + 1) * 3072])


def test_peft_rank_pattern_is_anchored(make_pipe, tmp_path):
    """The final `proj_out` at another rank than single_transformer_blocks.0.proj_out: the rank_pattern key is
    anchored ("^proj_out", as diffusers writes it), or PEFT gives both layers that rank and diffusers fails."""
    import json

    from lora_kit.formats.peft_config import alpha_for

    pipe = make_pipe("flux")
    inject_lora(pipe.transformer, "dit", rank=4, alpha=4.0, name="x")
    inject_lora(pipe.transformer, paths=["proj_out"], rank=2, alpha=4.0, name="x")
    randomize_adapters(pipe, seed=1)
    path = lora_kit.save(pipe, tmp_path / "p.safetensors", format="peft")
    config = json.loads(files.read_header(path)[1]["lora_adapter_metadata"])
    assert config["transformer.rank_pattern"] == {"^proj_out": 2}
    expected = forward_main(pipe.transformer)
    theirs = make_pipe("flux")
    theirs.load_lora_weights(str(path), adapter_name="x")
    assert_close_scaled(forward_main(theirs.transformer), expected, reduction=pipe.transformer)
    ours = make_pipe("flux")
    lora_kit.load(ours, path)
    assert_close_scaled(forward_main(ours.transformer), expected, reduction=pipe.transformer)
    # patterns are read as PEFT reads them, anchored or not
    for pattern, inner in (("^proj_out", 4.0), ("proj_out", 1.0)):
        cfg = {"lora_alpha": 4.0, "alpha_pattern": {pattern: 1.0}}
        assert alpha_for("proj_out", 2, cfg) == 1.0
        assert alpha_for("single_transformer_blocks.0.proj_out", 2, cfg) == inner
