"""merge / rerank / resize / extract / convert: exact where they claim to be, against independent references."""

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_close_scaled, assert_outputs_close, pipeline_outputs, randomize_adapters
from lora_kit.cli import convert, extract, merge, resize

import lora_kit
from lora_kit import functional, ops
from lora_kit.formats import files
from lora_kit.formats.stored import read_lora
from lora_kit.inject import inject_lora
from lora_kit.state import modules


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    from conftest import build_pipeline

    folder = tmp_path_factory.mktemp("sd1_model")
    pipe = build_pipeline("sd1", str(folder / "tok"))
    pipe.save_pretrained(folder / "model")
    return folder / "model"


def _run(cmd, args):
    result = CliRunner().invoke(cmd.main, [str(a) for a in args])
    return result


def _deltas(path):
    return {stem: ops.delta(parts) for stem, parts in modules(read_lora(path)[0]).items()}


def test_merge_equals_diffusers_set_adapters(make_pipe, two_loras, tmp_path):
    a, b = two_loras
    out = tmp_path / "m.safetensors"
    result = _run(merge, [a, b, "--alpha", "0.6", "-o", out])
    assert result.exit_code == 0, result.output
    theirs = make_pipe("sd1")
    theirs.load_lora_weights(str(a), adapter_name="a")
    theirs.load_lora_weights(str(b), adapter_name="b")
    theirs.set_adapters(["a", "b"], [0.6, 0.4])
    expected = pipeline_outputs(theirs)
    ours = make_pipe("sd1")
    lora_kit.load(ours, out)
    assert_outputs_close(pipeline_outputs(ours), expected, ours)
    in_diffusers = make_pipe("sd1")
    in_diffusers.load_lora_weights(str(out))
    assert_outputs_close(pipeline_outputs(in_diffusers), expected, ours)


def test_merge_identities_and_rerank(two_loras, tmp_path):
    a, b = two_loras
    da = _deltas(a)
    assert _run(merge, [a, a, "--alpha", "0.5", "-o", tmp_path / "aa.safetensors"]).exit_code == 0
    assert _run(merge, [a, b, "--alpha", "1", "-o", tmp_path / "a1.safetensors"]).exit_code == 0
    for name in ("aa", "a1"):
        d = _deltas(tmp_path / f"{name}.safetensors")
        assert d.keys() == da.keys()
        merged = modules(read_lora(tmp_path / f"{name}.safetensors")[0])
        ranks = {stem: parts["down"].shape[0] for stem, parts in merged.items()}
        for k in da:
            assert_close_scaled(d[k], da[k], reduction=ranks[k])  # concatenated ranks: one up @ down
    # A+A has concatenated rank 2r but true rank r: re-ranking to r by SVD is lossless, to the SVD's rounding (of
    # an m x n matrix: eps * sqrt(max(m, n)) relative to its spectral norm)
    state = read_lora(tmp_path / "aa.safetensors")[0]
    reranked, errors, total = ops.rerank(state, 4, conv_rank=2)
    size = max(max(functional.flat(d).shape) for d in da.values())
    assert_close_scaled(torch.tensor([total, *errors.values()]), torch.zeros(len(errors) + 1), reduction=size, scale=1)
    assert {p["down"].shape[0] for p in modules(reranked).values()} == {2, 4}
    for stem, parts in modules(reranked).items():
        flat = functional.flat(da[stem])
        spectral = torch.linalg.matrix_norm(flat, 2)
        assert_close_scaled(ops.delta(parts), da[stem], reduction=max(flat.shape), scale=spectral)
    # a real truncation reports the error the discarded singular values imply (a sum of every delta's squares)
    small, _, err = ops.rerank(state, 1)
    direct = sum((ops.delta(p) - da[s]).square().sum() for s, p in modules(small).items())
    implied = (direct / sum(d.square().sum() for d in da.values())).sqrt()
    assert_close_scaled(torch.tensor(err), implied, reduction=sum(d.numel() for d in da.values()))


def test_merge_cli_reports_rank_error_and_weights(two_loras, tmp_path):
    a, b = two_loras
    result = _run(merge, [a, b, a, "--weights", "0.5,0.3,0.2", "--rank", "2", "-o", tmp_path / "w.safetensors"])
    assert result.exit_code == 0, result.output
    assert "relative error" in result.output
    meta = files.read_header(tmp_path / "w.safetensors")[1]
    assert meta["lora_kit.merge_weights"] == "[0.5, 0.3, 0.2]"


def test_resize_keeps_strength_and_dynamic_rules(two_loras, tmp_path):
    a, _ = two_loras
    da = _deltas(a)
    assert _run(merge, [a, a, "--alpha", "0.5", "-o", tmp_path / "aa.safetensors"]).exit_code == 0
    result = _run(
        resize, [tmp_path / "aa.safetensors", "--rank", "4", "--conv-rank", "2", "-o", tmp_path / "r.safetensors"]
    )
    assert result.exit_code == 0, result.output
    for stem, d in _deltas(tmp_path / "r.safetensors").items():  # an SVD's rounding, as in rerank above
        flat = functional.flat(da[stem])
        assert_close_scaled(d, da[stem], reduction=max(flat.shape), scale=torch.linalg.matrix_norm(flat, 2))
    # the rules, on singular values worked by hand
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5])
    assert ops.dynamic_rank(s, "sv_ratio", 4) == 2  # S > 2.5
    assert ops.dynamic_rank(s, "sv_cumulative", 0.9) == 3  # cumsum/sum = .54 .81 .92 -> first >= .9 is index 2, +1
    assert ops.dynamic_rank(s, "sv_fro", 0.95) == 2  # cum S^2/sum = .768 .960 -> first >= .9025 is index 1, +1
    assert ops.dynamic_rank(s, "sv_ratio", 1000) == 4  # clamped to len(S) - 1
    result = _run(resize, [a, "--dynamic", "sv_fro=0.9", "--rank", "3", "-o", tmp_path / "d.safetensors"])
    assert result.exit_code == 0, result.output


def test_extract_known_low_rank_change(make_pipe, sd1_folder, tmp_path):
    from diffusers import DiffusionPipeline

    tuned = DiffusionPipeline.from_pretrained(sd1_folder)
    inject_lora(tuned.unet, "locon", rank=3, conv_rank=2)
    inject_lora(tuned.text_encoder, "clip-all", rank=3)
    randomize_adapters(tuned, seed=9, std=0.3)
    lora_kit.collapse(tuned)
    tuned.save_pretrained(tmp_path / "tuned")
    expected = pipeline_outputs(tuned)
    out = tmp_path / "x.safetensors"
    args = [sd1_folder, tmp_path / "tuned", "--rank", "3", "--conv-rank", "2", "--text-encoder", "-o", out]
    result = _run(extract, args)
    assert result.exit_code == 0, result.output
    assert "relative error: total" in result.output
    base = DiffusionPipeline.from_pretrained(sd1_folder)
    lora_kit.load(base, out)
    assert_outputs_close(pipeline_outputs(base), expected, tuned)


def test_collapse_into_model_and_convert(two_loras, sd1_folder, tmp_path):
    from diffusers import DiffusionPipeline

    a, _ = two_loras
    out = tmp_path / "merged_model"
    result = _run(merge, [sd1_folder, a, "--alpha", "0.8", "-o", out])
    assert result.exit_code == 0, result.output
    reference = DiffusionPipeline.from_pretrained(sd1_folder)
    lora_kit.load(reference, a, weight=0.8)
    merged = DiffusionPipeline.from_pretrained(out)
    assert_outputs_close(pipeline_outputs(merged), pipeline_outputs(reference), reference)
    # kohya -> peft -> kohya: the deltas survive, and diffusers reads the peft file identically
    peft_file, back = tmp_path / "a_peft.safetensors", tmp_path / "a_back.safetensors"
    assert _run(convert, [a, "--to", "peft", "--model", sd1_folder, "-o", peft_file]).exit_code == 0
    assert _run(convert, [peft_file, "--to", "kohya", "--model", sd1_folder, "-o", back]).exit_code == 0
    da, db = _deltas(a), _deltas(back)
    assert da.keys() == db.keys()
    for k in da:
        assert_close_scaled(db[k], da[k], reduction=4)  # up @ down, rank 4 at most
    theirs = DiffusionPipeline.from_pretrained(sd1_folder)
    theirs.load_lora_weights(str(peft_file))
    ours = DiffusionPipeline.from_pretrained(sd1_folder)
    lora_kit.load(ours, a)
    assert_outputs_close(pipeline_outputs(theirs), pipeline_outputs(ours), ours)


def test_cli_bad_inputs_exit_2_and_write_nothing(two_loras, make_pipe, tmp_path):
    a, b = two_loras
    xl = make_pipe("sdxl")
    inject_lora(xl.unet, "attn", rank=2)
    randomize_adapters(xl)
    xl_file = lora_kit.save(xl, tmp_path / "xl.safetensors")
    peft_file = lora_kit.save(make_pipe_with_lora(make_pipe), tmp_path / "p.safetensors", format="peft")
    out = tmp_path / "out.safetensors"
    cases = [
        (merge, [a, tmp_path / "nope.safetensors", "-o", out], "no such file"),
        (merge, [a, xl_file, "-o", out], "different base models"),
        (merge, [a, peft_file, "-o", out], "different formats"),
        (merge, [a, b, a, "-o", out], "give --weights"),
        (merge, [a, b, "--alpha", "0.5", "--weights", "1,2", "-o", out], "not both"),
        (merge, [a, b, "-o", a], "is the input"),
        (resize, [a, "--dynamic", "sv_magic=2", "-o", out], "sv_magic"),
        (resize, [a, "-o", out], "give a rank"),
        (extract, [tmp_path / "missing_model", tmp_path / "other", "-o", out], "no such folder"),
    ]
    before = a.read_bytes()
    for cmd, args, message in cases:
        result = _run(cmd, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and result.output.strip().count("\n") == 0, (args, result.output)
        assert not out.exists()
    assert a.read_bytes() == before


def make_pipe_with_lora(make_pipe):
    pipe = make_pipe("sd1")
    inject_lora(pipe.unet, "attn", rank=2)
    randomize_adapters(pipe)
    return pipe


def test_convert_without_model_uses_the_shipped_architecture(tmp_path):
    """A kohya SD1.5 file with no metadata: the architecture is recognised from the cross-attention width, the names
    are mapped through SD1.5's real module list (built on the meta device), and the round trip is exact."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    shapes = {  # stem: (down shape, up shape), real SD1.5 sizes
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((4, 320), (320, 4)),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ((4, 768), (320, 4)),
        "lora_unet_up_blocks_3_resnets_2_conv1": ((2, 640, 3, 3), (320, 2, 1, 1)),
        "lora_te_text_model_encoder_layers_11_mlp_fc2": ((4, 3072), (768, 4)),
    }
    tensors = {}
    for stem, (down, up) in shapes.items():
        tensors[f"{stem}.lora_down.weight"] = torch.randn(down, generator=g)
        tensors[f"{stem}.lora_up.weight"] = torch.randn(up, generator=g)
        tensors[f"{stem}.alpha"] = torch.tensor(2.0)
    save_file(tensors, tmp_path / "k.safetensors")
    to_peft = _run(convert, [tmp_path / "k.safetensors", "--to", "peft", "-o", tmp_path / "p.safetensors"])
    assert to_peft.exit_code == 0, to_peft.output
    header, meta = files.read_header(tmp_path / "p.safetensors")
    assert "unet.up_blocks.3.resnets.2.conv1.lora_A.weight" in header
    assert "text_encoder.text_model.encoder.layers.11.mlp.fc2.lora_B.weight" in header
    assert meta["lora_kit.architecture"] == "sd1"
    back = _run(convert, [tmp_path / "p.safetensors", "--to", "kohya", "-o", tmp_path / "k2.safetensors"])
    assert back.exit_code == 0, back.output
    again, _ = files.load(tmp_path / "k2.safetensors")
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    save_file({k: v for k, v in tensors.items() if "attn2" not in k}, tmp_path / "vague.safetensors")
    vague = _run(convert, [tmp_path / "vague.safetensors", "--to", "peft", "-o", tmp_path / "v.safetensors"])
    assert vague.exit_code == 2 and "pass --model" in vague.output


def test_merge_carries_pivotal_embeddings_and_refuses_a_shared_token(two_loras, tmp_path):
    from lora_kit.formats import embeddings as ti_files

    a, b = two_loras
    g = torch.Generator().manual_seed(0)
    ea, eb = torch.randn(2, 32, generator=g), torch.randn(1, 32, generator=g)
    ti_files.write(ti_files.sidecar(a), {"text_encoder": {"<a>": ea}})
    ti_files.write(ti_files.sidecar(b), {"text_encoder": {"<b>": eb}})
    out = tmp_path / "ab.safetensors"
    result = _run(merge, [a, b, "-o", out])
    assert result.exit_code == 0, result.output
    merged, _ = files.load(ti_files.sidecar(out))
    assert merged.keys() == {"<a>", "<b>"} and torch.equal(merged["<a>"], ea) and torch.equal(merged["<b>"], eb)
    ti_files.write(ti_files.sidecar(b), {"text_encoder": {"<a>": eb}}, force=True)
    clash = _run(merge, [a, b, "-o", tmp_path / "clash.safetensors"])
    assert clash.exit_code == 2 and "'<a>'" in clash.output and "rename" in clash.output
    assert not (tmp_path / "clash.safetensors").exists()
    # tokens of one encoder in two widths: refused once (ti_files.file_tensors), naming both sidecars
    ti_files.write(ti_files.sidecar(b), {"text_encoder": {"<b>": torch.ones(1, 16)}}, force=True)
    wide = _run(merge, [a, b, "-o", tmp_path / "wide.safetensors"])
    assert wide.exit_code == 2 and "'<b>' is 16 wide but '<a>' in" in wide.output, wide.output
    assert str(ti_files.sidecar(a)) in wide.output and str(ti_files.sidecar(b)) in wide.output
    assert (
        not (tmp_path / "wide.safetensors").exists() and not ti_files.sidecar(tmp_path / "wide.safetensors").exists()
    )


def test_merge_sums_two_spellings_of_one_module(make_pipe, tmp_path):
    """A: lora_kit's SD1 file (`lora_te_text_model_...`); B: the same layers as diffusers' convert_state_dict_to_kohya
    spells them (`lora_te1_`, no `text_model_`). The merge names each module once and loads as A and B together;
    a file holding both spellings (what merge wrote before) merges alone into one that sums them."""
    from safetensors.torch import save_file

    from lora_kit import tools

    a = make_pipe("sd1")
    inject_lora(a.unet, "attn", rank=2, alpha=1.0)
    inject_lora(a.text_encoder, "clip-attn", rank=2, alpha=2.0)
    randomize_adapters(a, seed=1)
    pa = lora_kit.save(a, tmp_path / "a.safetensors")
    b = make_pipe("sd1")
    inject_lora(b.text_encoder, "clip-attn", rank=3, alpha=1.5)
    randomize_adapters(b, seed=2)
    tensors, _ = files.load(lora_kit.save(b, tmp_path / "b0.safetensors"))
    pb = tmp_path / "b.safetensors"
    save_file({k.replace("lora_te_text_model_", "lora_te1_"): t for k, t in tensors.items()}, pb)
    ref = make_pipe("sd1")
    lora_kit.load(ref, pa, name="a")
    lora_kit.load(ref, pb, name="b")
    expected = pipeline_outputs(ref)
    both = tmp_path / "both.safetensors"
    save_file(files.load(pa)[0] | files.load(pb)[0], both)
    for inputs, weights in (([pa, pb], [1.0, 1.0]), ([both], [1.0])):
        out = tmp_path / f"m{len(inputs)}.safetensors"
        tools.merge(inputs, out, weights)
        merged = files.load(out)[0]
        assert not any(k.startswith("lora_te1_") for k in merged)
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in merged
        pipe = make_pipe("sd1")
        lora_kit.load(pipe, out)
        assert_outputs_close(pipeline_outputs(pipe), expected, ref)


def test_merge_maps_sdxl_block_names_without_a_model(tmp_path):
    """SGM (`input_blocks_4_1`) and diffusers (`down_blocks_1_attentions_0`) names of one real SDXL layer, and te2
    with and without `text_model_`: the merged file has each module once (SGM names) with delta_A + delta_B."""
    from safetensors.torch import save_file

    from lora_kit import tools

    g = torch.Generator().manual_seed(0)
    sgm = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    diffusers = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    te, te_short = "lora_te2_text_model_encoder_layers_0_mlp_fc1", "lora_te2_encoder_layers_0_mlp_fc1"
    shapes = {sgm: (640, 640), diffusers: (640, 640), te: (1280, 5120), te_short: (1280, 5120)}

    def lora(path, stems, alpha):
        t = {}
        for stem in stems:
            fan_in, fan_out = shapes[stem]
            t[f"{stem}.lora_down.weight"] = torch.randn(2, fan_in, generator=g)
            t[f"{stem}.lora_up.weight"] = torch.randn(fan_out, 2, generator=g)
            t[f"{stem}.alpha"] = torch.tensor(alpha)
        save_file(t, path, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
        return path

    pa, pb = (
        lora(tmp_path / "a.safetensors", [sgm, te], 1.0),
        lora(tmp_path / "b.safetensors", [diffusers, te_short], 2.0),
    )
    tools.merge([pa, pb], tmp_path / "m.safetensors", [0.6, 0.4])
    got, da, db = _deltas(tmp_path / "m.safetensors"), _deltas(pa), _deltas(pb)
    assert got.keys() == {sgm, te}
    assert_close_scaled(got[sgm], 0.6 * da[sgm] + 0.4 * db[diffusers], reduction=4)  # up @ down of ranks 2 + 2
    assert_close_scaled(got[te], 0.6 * da[te] + 0.4 * db[te_short], reduction=4)
