"""lora-train --adapter dora|loha|lokr: fresh adapters start as LyCORIS's (the same numbers from the same seed) with
a delta of 0, every mode trains them, the file holds LyCORIS's names and loads in LyCORIS's own modules with the
forward lora_kit computes, resume is bit-exact, and what a kind does not take is refused in one line."""

import copy
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import Stopped, assert_close_scaled, assert_outputs_close, pipeline_outputs, stop_after
from lora_kit.cli import train as train_cli
from test_train import write_images
from torch import nn

import lora_kit
from lora_kit import kinds
from lora_kit.formats import files
from lora_kit.inject import attach_kind, extract_lora_ups_down, inject_lora, lora_parameters
from lora_kit.train import loop, recipes
from lora_kit.train.config import TrainConfig

pytest.importorskip("lycoris")
from lycoris.functional.general import factorization  # noqa: E402
from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

LYCORIS = {"dora": (LoConModule, {"weight_decompose": True}), "loha": (LohaModule, {}), "lokr": (LokrModule, {})}
SUFFIXES = {
    "dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
}
LAYERS = {"linear": lambda: nn.Linear(64, 48), "conv": lambda: nn.Conv2d(32, 24, 3, padding=1)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("kind_data") / "images")


def config(data, tmp_path, arch="sd1", **kw):
    size = 16 if arch in ("sd3", "flux") else 32
    base = dict(model=f"tiny-{arch}", data=str(data), output=str(tmp_path / "out.safetensors"), steps=2,
                resolution=size, rank=4, batch_size=2, lr=1e-2, save_dtype="fp32")  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def lycoris_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if not k.startswith("org")}


def test_factorization_is_lycoris():
    for dim in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 8, 16):
            assert kinds.factorization(dim, factor) == factorization(dim, factor), (dim, factor)


LOKR_FORMS = {"default": dict(rank=2), "decomposed-w1": dict(rank=2, full_w1=False), "whole-w2": dict(rank=30),
              "factor": dict(rank=2, factor=4)}  # fmt: skip


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("form", ["loha", *(f"lokr-{f}" for f in LOKR_FORMS)])
def test_fresh_loha_lokr_are_lycoris_modules_seeded_alike(layer, form):
    """The same seed gives LyCORIS's module and init_parts the same tensors under the same names (every LoKr form:
    w1 whole or at rank, w2 at rank or whole where the rank is too large, a factor), and the delta is exactly 0."""
    base = LAYERS[layer]()
    kind, _, variant = form.partition("-")
    opts = LOKR_FORMS.get(variant, dict(rank=4))
    theirs = dict(lora_dim=opts["rank"], alpha=2, decompose_both=not opts.get("full_w1", True),
                  factor=opts.get("factor", -1)) if kind == "lokr" else dict(lora_dim=4, alpha=2)  # fmt: skip
    torch.manual_seed(3)
    module = LYCORIS[kind][0]("x", copy.deepcopy(base), 1.0, **theirs)
    torch.manual_seed(3)
    extra = {k: v for k, v in opts.items() if k != "rank"}
    parts = kinds.init_parts(kind, tuple(base.weight.shape), opts["rank"], 2, **extra)
    want = lycoris_state(module)
    assert want.keys() == parts.keys()
    assert all(torch.equal(want[k].float(), parts[k]) for k in want)
    assert torch.equal(kinds.apply(base.weight, [(parts, 1.0)]), base.weight)


@pytest.mark.parametrize("layer", LAYERS)
def test_fresh_dora_holds_the_row_norms_and_starts_at_the_base(layer):
    base = LAYERS[layer]()
    module = LoConModule("x", copy.deepcopy(base), 1.0, lora_dim=4, alpha=2, weight_decompose=True)
    parts = kinds.init_parts("dora", tuple(base.weight.shape), 4, 2, weight=base.weight)
    want = lycoris_state(module)
    assert want.keys() == {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"}
    assert torch.equal(parts["dora_scale"], want["dora_scale"]) and torch.equal(parts["alpha"], want["alpha"])
    assert parts["down"].shape == want["lora_down.weight"].shape and parts["up"].shape == want["lora_up.weight"].shape
    assert not parts["up"].any() and parts["down"].abs().max() <= 1 / base.weight[0].numel() ** 0.5
    # W * |W| / (|W| + eps): the base up to the eps of the norm's division (LyCORIS's and ComfyUI's formula)
    assert_close_scaled(kinds.apply(base.weight, [(parts, 1.0)]), base.weight, reduction=base)  # (the row norms' sums)


def test_lora_parameters_give_every_kind_its_tensors():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    inject_lora(model, paths=["0"], rank=2, name="a")
    parts = kinds.init_parts("loha", (8, 8), 2)
    attach_kind(model, "1", "a", parts)
    got = list(lora_parameters(model, "a"))
    loha = model[1].adapters["a"]
    assert len(got) == 6 and got[:2] == [model[0].adapters["a"].down, model[0].adapters["a"].up]
    assert {id(p) for p in got[2:]} == {id(p) for p in loha.parameters()}
    assert list(extract_lora_ups_down(model)) == [(model[0].adapters["a"].up, model[0].adapters["a"].down)]


def _kohya_name(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def _lycoris_judge(kind: str, layer: nn.Module, tensors: dict[str, torch.Tensor], rank: int) -> nn.Module:
    """LyCORIS's own module for `layer`, loaded with the file's tensors for it (their names unchanged)."""
    cls, options = LYCORIS[kind]
    module = cls("x", layer, 1.0, lora_dim=rank, alpha=float(tensors["alpha"]), **options)
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    assert not unexpected and not [k for k in missing if not k.startswith("org")]
    module.apply_to()
    return module


@pytest.mark.parametrize("kind", list(LYCORIS))
@pytest.mark.conformance(
    dialect="kohya", kind="{kind} (trained)", arch="sd1", checks="write apply", reference="lycoris-lora"
)
def test_kind_trains_into_a_file_lycoris_reads(make_pipe, data, tmp_path, kind):
    """SD1 with locon targets (3x3 convs too) and text-encoder adapters: at init the pipeline computes exactly what
    the base does (DoRA: up to its norm's eps); two steps change it; the file has kohya names and LyCORIS's tensor
    names, loads in lora_kit with the trained forward, and a linear and a 3x3 conv of it load in LyCORIS's module
    classes, whose forward is lora_kit's."""
    cfg = config(data, tmp_path, adapter=kind, targets="locon", text_encoder_rank=2)
    base = pipeline_outputs(make_pipe("sd1"))
    fresh = make_pipe("sd1")
    torch.manual_seed(0)
    recipes.build(cfg, fresh)
    fresh.unet.eval(), fresh.text_encoder.eval()
    started = pipeline_outputs(fresh)
    assert_outputs_close(started, base, fresh, exact=kind != "dora")  # (DoRA: a rounding of the weights away)

    trained = make_pipe("sd1")
    loop.train(cfg, pipe=trained)
    tensors, meta = files.load(cfg.output)
    assert meta["ss_network_module"] == "lycoris.kohya"
    stems = {k.rsplit(".", 1)[0].removesuffix(".lora_down").removesuffix(".lora_up") for k in tensors}
    assert all(s.startswith(("lora_unet_", "lora_te_text_model_")) for s in stems)
    assert any(s.startswith("lora_te_") for s in stems) and any(s.endswith("resnets_0_conv1") for s in stems)
    assert {k[len(s) + 1 :] for s in stems for k in tensors if k.startswith(s + ".")} <= SUFFIXES[kind]

    loaded = make_pipe("sd1")
    lora_kit.load(loaded, cfg.output)
    outs = pipeline_outputs(loaded)
    assert_outputs_close(outs, pipeline_outputs(trained), trained)
    assert not torch.allclose(outs["main"], base["main"], atol=1e-4)  # trained: the adapters moved

    judged_pipe = make_pipe("sd1")
    for path, shape in (("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (2, 16, 32)),
                        ("down_blocks.0.resnets.0.conv1", (2, 32, 8, 8))):  # fmt: skip
        stem = _kohya_name(path)
        mine = {k[len(stem) + 1 :]: t for k, t in tensors.items() if k.startswith(stem + ".")}
        judge = _lycoris_judge(kind, judged_pipe.unet.get_submodule(path), mine, cfg.rank)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ours, theirs = loaded.unet.get_submodule(path)(x), judge.org_module[0](x)
        assert not torch.allclose(theirs, judge.org_forward(x), atol=1e-5)  # the adapter is not nothing
        layer = judge.org_module[0]
        assert_close_scaled(ours, theirs, reduction=layer.weight[0].numel() + cfg.rank)  # (layer + delta sums)


@pytest.mark.parametrize(("mode", "kind"), [("dreambooth", "dora"), ("pivotal", "lokr")])
def test_every_mode_trains_the_kind(make_pipe, data, tmp_path, mode, kind):
    extra = {"dreambooth": dict(class_prompt="a photo of a dog", num_class_images=2, validation_steps=2),
             "pivotal": dict(token="<sks>", ti_steps=1, lokr_full_w1=False, rank=2)}[mode]  # fmt: skip
    cfg = config(data, tmp_path, mode=mode, adapter=kind, **extra)
    trained = make_pipe("sd1")
    loop.train(cfg, pipe=trained)
    tensors, meta = files.load(cfg.output)
    suffixes = {k.split(".", 1)[1] for k in tensors}
    assert suffixes <= SUFFIXES[kind] and meta["lora_kit.mode"] == mode
    if kind == "lokr":
        assert {"lokr_w1_a", "lokr_w2_a"} <= suffixes  # (--no-lokr-full-w1 at rank 2: both decomposed somewhere)
    loaded = make_pipe("sd1")
    lora_kit.load(loaded, cfg.output)  # (pivotal: the sidecar's token too)
    assert_outputs_close(pipeline_outputs(loaded), pipeline_outputs(trained), trained)


@pytest.mark.parametrize("kind", list(LYCORIS))
def test_resume_is_bit_exact(make_pipe, data, tmp_path, kind):
    """Stopped at step 2 and resumed == 4 steps in one go: the same adapter tensors, bit for bit."""
    common = dict(steps=4, adapter=kind, lr_scheduler="cosine", warmup_steps=1, text_encoder_rank=2, flip=True)
    (tmp_path / "a").mkdir()
    loop.train(config(data, tmp_path / "a", **common), pipe=make_pipe("sd1"))
    (tmp_path / "b").mkdir()
    with pytest.raises(Stopped):
        loop.train(
            config(data, tmp_path / "b", save_every=2, **common), callbacks=[stop_after(2)], pipe=make_pipe("sd1")
        )
    saved, _ = files.load(tmp_path / "b" / "out-checkpoints" / "step-2" / "trainable.safetensors")
    own = SUFFIXES[kind] - {"alpha", "lora_down.weight", "lora_up.weight"}  # (the kind's own tensors are kept)
    assert any(k.endswith("." + suffix) for k in saved for suffix in own)
    torch.manual_seed(1234)
    loop.train(config(data, tmp_path / "b", save_every=2, resume="latest", **common), pipe=make_pipe("sd1"))
    a, _ = files.load(tmp_path / "a" / "out.safetensors")
    b, _ = files.load(tmp_path / "b" / "out.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["loha", "dora"])
@pytest.mark.conformance(
    dialect="lycoris", kind="{kind} (trained)", arch="flux", checks="write read apply", reference="round trip"
)
def test_flux_trains_a_kind(make_pipe, data, tmp_path, kind):
    """FLUX: a trained LoHa or DoRA is written under LyCORIS's own names for a diffusers transformer (`lycoris_<path>`,
    which ComfyUI reads with q/k/v as slices of its fused qkv; the BFL names fuse q/k/v, across which LoHa factors
    cannot be fused); lora_kit loads it with the trained forward, and the DoRA one, converted to PEFT's DoRA
    (lora-convert --to peft), loads in diffusers with the same forward."""
    cfg = config(data, tmp_path, "flux", adapter=kind)
    base = pipeline_outputs(make_pipe("flux"))["main"]
    trained = make_pipe("flux")
    loop.train(cfg, pipe=trained)
    tensors, meta = files.load(cfg.output)
    main = [k for k in tensors if not k.startswith("lora_te")]
    assert main and all(k.startswith("lycoris_") for k in main) and meta["ss_network_module"] == "lycoris.kohya"
    assert {k.rsplit(".", 1)[1] for k in main} >= (SUFFIXES["loha"] if kind == "loha" else {"dora_scale"})
    want = pipeline_outputs(trained)
    loaded = make_pipe("flux")
    lora_kit.load(loaded, cfg.output)
    got = pipeline_outputs(loaded)
    assert_outputs_close(got, want, trained)
    assert not torch.allclose(got["main"], base, atol=1e-4)
    if kind == "dora":  # (PEFT's DoRA divides by the norm without LyCORIS's eps: a rounding apart)
        peft_file = tmp_path / "peft.safetensors"
        lora_kit.convert(cfg.output, peft_file, to="peft")
        theirs = make_pipe("flux")
        theirs.load_lora_weights(peft_file)
        got = pipeline_outputs(theirs)["main"]
        assert_close_scaled(got, want["main"], reduction=trained.transformer, factor=64)


def test_cli_documents_and_refuses(data, tmp_path):
    help_text = CliRunner().invoke(train_cli.main, ["--help"]).output
    for option in ("--adapter", "--lokr-factor", "--lokr-full-w1 / --no-lokr-full-w1"):
        assert option in help_text
    base = ["--model", "tiny-sd1", "--data", str(data), "--steps", "1", "-o", str(tmp_path / "o.safetensors")]
    cases = [
        (["--adapter", "boft"], "--adapter is 'boft'; choose one of lora, dora, loha, lokr"),
        (
            ["--adapter", "loha", "--mode", "textual-inversion", "--token", "<x>"],
            "textual-inversion trains no adapters",
        ),
        (["--adapter", "lokr", "--dropout", "0.1"], "input dropout applies to lora adapters only"),
        (["--adapter", "loha", "--init", "gaussian"], "--init is 'gaussian'"),
        (["--adapter", "loha", "--lokr-factor", "4"], "--lokr-factor is 4; it applies to --adapter lokr"),
        (["--adapter", "dora", "--no-lokr-full-w1"], "--lokr-full-w1 is False; it applies to --adapter lokr"),
        (["--adapter", "lokr", "--lokr-factor", "0"], "--lokr-factor is 0; it must be -1"),
    ]
    for extra, message in cases:
        result = CliRunner().invoke(train_cli.main, base + extra)
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output and result.output.strip().count("\n") == 0, (extra, result.output)
        assert not Path(tmp_path / "o.safetensors").exists()
