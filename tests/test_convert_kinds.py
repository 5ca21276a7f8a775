"""Any adapter kind -> a plain LoRA (lora-convert --rank, lora-merge --rank), and the ops that must take kind modules.

Judges: LyCORIS's own forward (a file made by its modules, applied by them: test_kinds checks lora_kit's load against
it), the deltas lora_kit's wrapper gives the original file, and Frobenius norms computed here from the written factors.
"""

import math

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_close_scaled, main_model, pipeline_outputs
from lora_kit.cli import convert, merge, resize
from torch import nn

import lora_kit
from lora_kit import functional, ops
from lora_kit.formats import files
from lora_kit.inject import lora_modules
from lora_kit.state import components, modules

pytest.importorskip("lycoris")
from test_kinds import _kohya_file, lycoris_module, lycoris_tensors, parts_of  # noqa: E402


@pytest.fixture
def model_dir(make_pipe, tmp_path):
    """The tiny SD1 pipeline the files are made on, as a folder --model takes."""
    folder = tmp_path / "model"
    make_pipe("sd1").save_pretrained(folder)
    return str(folder)


def _run(cmd, args):
    return CliRunner().invoke(cmd.main, [str(a) for a in args])


def _refused(cmd, args, out, *words):
    result = _run(cmd, args)
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and all(w in line for w in words), line
    assert not out.exists()


def _deltas(pipe, name=None) -> dict[str, torch.Tensor]:
    """{component.path: the fp32 weight delta an adapter gives} as lora_kit's wrapper computes it."""
    return {
        f"{c}.{p}": w.delta_weight(name)
        for c, m in components(pipe).items()
        for p, w in lora_modules(m)
        if name is None or name in w.adapters
    }


def _factors_delta(parts) -> torch.Tensor:
    """A plain pair's delta from the written factors: alpha / rank * up @ down."""
    rank = parts["down"].shape[0]
    return functional.delta(parts["up"], parts["down"], float(parts.get("alpha", rank)) / rank)


CONFIGS = ["loha", "lokr", "dora", "ia3", "locon-tucker", "doha"]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.conformance(
    dialect="peft (converted)", kind="{config} -> lora", arch="sd1", checks="write apply", reference="lycoris-lora"
)
def test_full_rank_convert_is_exact(make_pipe, model_dir, tmp_path, config):
    """--rank as large as any layer: the peft file (plain LoRA pairs only) gives LyCORIS's own forward."""
    judged = make_pipe("sd1")
    path = _kohya_file(judged, config, tmp_path / f"{config}.safetensors")
    expected = pipeline_outputs(judged)
    out = tmp_path / "out.safetensors"
    result = _run(convert, [path, "--to", "peft", "--rank", 4096, "--model", model_dir, "-o", out])
    assert result.exit_code == 0, result.output
    assert "relative error: total" in result.output
    written, _ = files.load(out)
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in written)  # plain LoRA only
    pipe = make_pipe("sd1")
    base = pipeline_outputs(pipe)
    lora_kit.load(pipe, out)
    got = pipeline_outputs(pipe)
    for k in ("main", "text_encoder"):
        assert not torch.allclose(expected[k], base[k])
        model = main_model(pipe) if k == "main" else pipe.text_encoder
        assert_close_scaled(got[k], expected[k], reduction=model, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("config", ["loha", "lokr", "dora"])
def test_reported_error_is_the_true_error(make_pipe, model_dir, tmp_path, config):
    """At a low rank each module's reported error is ||d - d_lora|| / ||d|| of its exact delta, and the total is the
    same ratio over all modules; a higher rank gives smaller errors."""
    path = _kohya_file(make_pipe("sd1"), config, tmp_path / "in.safetensors")
    pipe = make_pipe("sd1")
    lora_kit.load(pipe, path, name="a")
    exact = _deltas(pipe, "a")
    totals = []
    for rank in (2, 4):
        out = tmp_path / f"r{rank}.safetensors"
        report = lora_kit.tools.convert(path, out, to="kohya", model=model_dir, rank=rank)
        fresh = make_pipe("sd1")
        state, _ = lora_kit.formats.read(out, fresh)
        mods = modules(state)
        assert mods.keys() == exact.keys() == report.errors.keys()
        res2 = norm2 = 0.0
        for stem, d in exact.items():
            parts = mods[stem]
            assert set(parts) == {"down", "up", "alpha"} and parts["down"].shape[0] <= rank
            residual = (d - _factors_delta(parts).reshape(d.shape)).norm()
            true = float(residual / d.norm())
            size = max(functional.flat(d).shape)
            assert_close_scaled(torch.tensor(report.errors[stem]), torch.tensor(true), reduction=size, scale=1)
            assert true > 1e-3  # (a rank this low does lose something: the comparison is not of zeros)
            res2, norm2 = res2 + float(residual) ** 2, norm2 + float(d.norm()) ** 2
        total = math.sqrt(res2 / norm2)
        assert_close_scaled(torch.tensor(report.total_error), torch.tensor(total), reduction=4096, scale=1)
        totals.append(report.total_error)
    assert totals[1] < totals[0]
    # --dynamic sv_fro=0.9 keeps at least 0.9 of each delta's Frobenius norm: each error is at most sqrt(1 - 0.81)
    report = lora_kit.tools.convert(path, tmp_path / "dyn.safetensors", to="kohya", model=model_dir,
                                    dynamic=("sv_fro", 0.9))  # fmt: skip
    bound = math.sqrt(1 - 0.9**2) + 8 * torch.finfo(torch.float32).eps * math.sqrt(4096)
    assert report.errors.keys() == exact.keys() and all(e <= bound for e in report.errors.values())


def test_convert_refusals(make_pipe, model_dir, tmp_path):
    """One line naming the file, exit 2, nothing written: DoRA without --model; other kinds to peft without --rank; a
    bias delta to peft; lora-resize of a kind file (it has no model to take layer shapes from)."""
    out = tmp_path / "out.safetensors"
    dora = _kohya_file(make_pipe("sd1"), "dora", tmp_path / "dora.safetensors")
    _refused(convert, [dora, "--to", "peft", "--rank", 4, "-o", out], out, str(dora), "--model", "base weight")
    ia3 = _kohya_file(make_pipe("sd1"), "ia3", tmp_path / "ia3.safetensors")
    _refused(convert, [ia3, "--to", "kohya", "--rank", 4, "-o", out], out, str(ia3), "--model")
    loha = _kohya_file(make_pipe("sd1"), "loha", tmp_path / "loha.safetensors")
    _refused(convert, [loha, "--to", "peft", "--model", model_dir, "-o", out], out, str(loha), "--rank", "LoHa")
    full = _kohya_file(make_pipe("sd1"), "full", tmp_path / "full.safetensors")
    args = [full, "--to", "peft", "--rank", 4, "--model", model_dir, "-o", out]
    _refused(convert, args, out, str(full), "diff_b", "bias")
    _refused(convert, [loha, "--to", "comfyui", "--model", model_dir, "-o", out], out, str(loha), "--rank")
    _refused(convert, [loha, "--to", "peft", "--conv-rank", 2, "-o", out], out, "--rank")
    _refused(resize, [loha, "--rank", "2", "-o", out], out, str(loha), "lora-convert --rank")


def test_kinds_keep_as_they_are_in_native_and_dora_in_peft(make_pipe, model_dir, tmp_path):
    """Without --rank, native files keep every kind (LoHa and a full diff's diff_b too) and peft files a DoRA by
    output rows (PEFT's lora_magnitude_vector): each reads back to the same forward."""
    for config, to in (("loha", "native"), ("full", "native"), ("dora", "peft")):
        judged = make_pipe("sd1")
        path = _kohya_file(judged, config, tmp_path / f"{config}.safetensors")
        out = tmp_path / f"{config}-{to}.safetensors"
        assert _run(convert, [path, "--to", to, "--model", model_dir, "-o", out]).exit_code == 0
        pipe = make_pipe("sd1")
        lora_kit.load(pipe, out)
        assert_close_scaled(pipeline_outputs(pipe)["main"], pipeline_outputs(judged)["main"], reduction=pipe.unet)


def test_tucker_locon_to_peft_needs_no_rank(make_pipe, model_dir, tmp_path):
    """A Tucker LoCon is a plain pair once its core is folded into down: written to peft exactly, without --rank."""
    judged = make_pipe("sd1")
    path = _kohya_file(judged, "locon-tucker", tmp_path / "t.safetensors")
    out = tmp_path / "out.safetensors"
    assert _run(convert, [path, "--to", "peft", "--model", model_dir, "-o", out]).exit_code == 0
    pipe = make_pipe("sd1")
    lora_kit.load(pipe, out)
    assert_close_scaled(pipeline_outputs(pipe)["main"], pipeline_outputs(judged)["main"], reduction=pipe.unet)


def test_merge_of_kinds(make_pipe, model_dir, tmp_path):
    """lora-merge LOHA LORA: refused without --rank; at full rank the merged LoRA's delta is 0.3 dA + 0.7 dB exactly
    (--model: these tiny files neither name nor fit a shipped architecture); DoRA is refused without --model."""
    loha = _kohya_file(make_pipe("sd1"), "loha", tmp_path / "loha.safetensors", seed=0)
    locon = _kohya_file(make_pipe("sd1"), "locon", tmp_path / "locon.safetensors", seed=50)
    out = tmp_path / "out.safetensors"
    _refused(merge, [loha, locon, "--alpha", 0.3, "-o", out], out, str(loha), "--rank")
    dora = _kohya_file(make_pipe("sd1"), "dora", tmp_path / "dora.safetensors", seed=9)
    _refused(merge, [dora, locon, "--rank", 4, "-o", out], out, str(dora), "--model")
    result = _run(merge, [loha, locon, "--alpha", 0.3, "--rank", 4096, "--model", model_dir, "-o", out])
    assert result.exit_code == 0, result.output
    pipe = make_pipe("sd1")
    lora_kit.load(pipe, loha, name="a")
    lora_kit.load(pipe, locon, name="b")
    da, db = _deltas(pipe, "a"), _deltas(pipe, "b")
    state, _ = lora_kit.formats.read(out, make_pipe("sd1"))
    mods = modules(state)
    assert mods.keys() == da.keys()
    for stem, parts in mods.items():
        assert set(parts) == {"down", "up", "alpha"}
        expected = 0.3 * da[stem] + 0.7 * db[stem]
        size = max(functional.flat(expected).shape)
        scale = torch.linalg.matrix_norm(functional.flat(expected), ord=2)
        assert_close_scaled(_factors_delta(parts).reshape(expected.shape), expected, reduction=size, scale=scale)
    # with --model a DoRA merges too: its delta is taken against the model's weights
    out2 = tmp_path / "out2.safetensors"
    result = _run(merge, [dora, locon, "--rank", 4096, "--model", model_dir, "-o", out2])
    assert result.exit_code == 0, result.output
    pipe = make_pipe("sd1")
    lora_kit.load(pipe, dora, name="a")
    dora_delta = _deltas(pipe, "a")
    state, _ = lora_kit.formats.read(out2, make_pipe("sd1"))
    stem = next(iter(dora_delta))
    expected = 0.5 * dora_delta[stem] + 0.5 * db[stem]
    scale = torch.linalg.matrix_norm(functional.flat(expected), ord=2)
    got = _factors_delta(modules(state)[stem]).reshape(expected.shape)
    assert_close_scaled(got, expected, reduction=max(functional.flat(expected).shape), scale=scale)


def test_merge_into_model_is_exact_for_a_full_diff(make_pipe, model_dir, tmp_path):
    """lora-merge MODEL FULL -o DIR: the weight gets diff, the bias gets diff_b."""
    from diffusers import StableDiffusionPipeline

    judged = make_pipe("sd1")
    path = _kohya_file(judged, "full", tmp_path / "full.safetensors")
    out = tmp_path / "merged"
    result = _run(merge, [model_dir, path, "-o", out])
    assert result.exit_code == 0, result.output
    merged = StableDiffusionPipeline.from_pretrained(out)
    base = make_pipe("sd1")
    tensors, _ = files.load(path)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    got, was = merged.unet.get_submodule(layer), base.unet.get_submodule(layer)
    assert torch.equal(got.weight, was.weight + tensors[f"{stem}.diff"])
    assert torch.equal(got.bias, was.bias + tensors[f"{stem}.diff_b"])


def test_ops_take_kind_modules():
    """uniform_alpha leaves other kinds as they are and keeps a DoRA LoRA's delta; cast leaves alpha and on_input;
    merge refuses kinds in one line; resize/rerank need the layer's shape for LoHa and its values for IA3."""
    torch.manual_seed(0)
    dora = parts_of(lycoris_tensors(lycoris_module("dora", nn.Linear(16, 12))))
    loha = parts_of(lycoris_tensors(lycoris_module("loha", nn.Linear(16, 12))))
    ia3 = parts_of(lycoris_tensors(lycoris_module("ia3-in", nn.Linear(16, 12))))
    plain = {"down": torch.randn(2, 16), "up": torch.randn(12, 2), "alpha": torch.tensor(1.0)}
    state = {f"unet.{n}.{s}": t for n, p in (("d", dora), ("h", loha), ("i", ia3), ("p", plain)) for s, t in
             {**{k: v for k, v in p.items() if k not in ("down", "up", "mid")},
              **{f"lora_{k}.weight": v for k, v in p.items() if k in ("down", "up")}}.items()}  # fmt: skip
    same = ops.uniform_alpha(state)
    mods, new = modules(state), modules(same)
    for stem in ("unet.h", "unet.i"):
        assert (
            all(torch.equal(new[stem][k], mods[stem][k]) for k in mods[stem]) and new[stem].keys() == mods[stem].keys()
        )
    assert float(new["unet.d"]["alpha"]) == float(new["unet.p"]["alpha"])
    for stem in ("unet.d", "unet.p"):
        assert_close_scaled(_factors_delta(new[stem]), _factors_delta(mods[stem]), reduction=8)
    assert torch.equal(new["unet.d"]["dora_scale"], mods["unet.d"]["dora_scale"])
    half = ops.cast(state, "fp16")
    for key, t in half.items():
        kept = key.endswith((".alpha", ".on_input"))
        assert t.dtype == (state[key].dtype if kept else torch.float16), key
    with pytest.raises(lora_kit.LoraKitError, match="unet.d is a DoRA .* not a LoRA pair"):
        ops.merge([state], [1.0])
    with pytest.raises(lora_kit.LoraKitError, match="unet.d: .* depends on the base weight"):
        ops.rerank(state, 2)
    with pytest.raises(lora_kit.LoraKitError, match="unet.h: .* needs its layer's shape"):
        ops.rerank({k: t for k, t in state.items() if k.startswith("unet.h")}, 2)
    w = torch.randn(12, 16)
    out, errors, _ = ops.rerank(state, 12, bases={"unet.d": w, "unet.h": w, "unet.i": w, "unet.p": w})
    assert all(e == 0 for e in errors.values())  # (full rank: no singular value left out)
    assert all(set(p) == {"down", "up", "alpha"} for p in modules(out).values())
    ia3_delta = w * ia3["weight"].reshape(1, -1)  # IA3 on the input: every column scaled by its weight
    assert_close_scaled(_factors_delta(modules(out)["unet.i"]), ia3_delta, reduction=16, scale=ia3_delta.norm())


def test_full_diff_keeps_its_bias_delta(make_pipe, model_dir, tmp_path, to="kohya"):
    """A full diff at full rank: the weight delta becomes a pair, diff_b stays beside it, and the file gives
    LyCORIS's forward (bias included)."""
    judged = make_pipe("sd1")
    path = _kohya_file(judged, "full", tmp_path / "full.safetensors")
    out = tmp_path / "out.safetensors"
    result = _run(convert, [path, "--to", to, "--rank", 4096, "--model", model_dir, "-o", out])
    assert result.exit_code == 0, result.output
    written, _ = files.load(out)
    assert any(k.endswith(".diff_b") for k in written) and not any(k.endswith(".diff") for k in written)
    pipe = make_pipe("sd1")
    lora_kit.load(pipe, out)
    assert_close_scaled(pipeline_outputs(pipe)["main"], pipeline_outputs(judged)["main"], reduction=pipe.unet)
