"""PEFT's DoRA, LoHa and LoKr adapters, read from `save_pretrained` folders and diffusers-style files, and DoRA
written for diffusers' loader: peft and diffusers are the judges. Every case builds the adapter with peft's own
get_peft_model on a tiny SD1 UNet (random non-zero factors: peft starts some at zero), loads peft's files into a
fresh copy with lora_kit.load, and compares the forwards and lora_kit.collapse with peft's merge_and_unload."""

import copy
import json

import pytest
import torch
from conftest import assert_close_scaled, forward_main

import lora_kit
from lora_kit.errors import LoraKitError
from lora_kit.inject import lora_modules

ATTN = ["to_q", "to_k", "to_out.0", "ff.net.2"]  # Linear layers of the tiny UNet: (32 or 64, 32 to 256)
CONVS = ["conv1", "conv_shortcut", "proj_in"]  # 3x3 and 1x1 convs


def _config(kind: str, **kwargs):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    return {"lora": LoraConfig, "loha": LoHaConfig, "lokr": LoKrConfig}[kind](**kwargs)


CASES = {  # id -> (kind, config fields)
    "dora-linear": ("lora", dict(r=2, lora_alpha=3, use_dora=True, target_modules=ATTN)),
    "dora-conv": ("lora", dict(r=2, lora_alpha=5, use_dora=True, target_modules=CONVS)),
    "dora-rslora-patterns": (
        "lora",
        dict(
            r=2,
            lora_alpha=3,
            use_dora=True,
            use_rslora=True,
            target_modules=ATTN + CONVS,
            rank_pattern={"to_k": 4, "^up_blocks.*conv1": 3},
            alpha_pattern={"to_out.0": 7, "conv_shortcut": 1},
        ),
    ),  # fmt: skip
    "loha": ("loha", dict(r=2, alpha=3, target_modules=ATTN + CONVS)),
    "loha-effective-conv": ("loha", dict(r=2, alpha=5, use_effective_conv2d=True, target_modules=ATTN + CONVS)),
    "loha-patterns": (
        "loha",
        dict(
            r=2,
            alpha=3,
            target_modules=ATTN + CONVS,
            use_effective_conv2d=True,
            rank_pattern={"to_k": 4, "^down_blocks.*conv1": 3},
            alpha_pattern={"to_out.0": 7, "conv_shortcut": 1},
        ),
    ),  # fmt: skip
    # r=1 < 4/2: w1 decomposed as well as w2 on the 32-wide layers
    "lokr-decompose-both": ("lokr", dict(r=1, alpha=3, decompose_both=True, target_modules=ATTN + CONVS)),
    # r large: w1 and w2 whole matrices, where PEFT still scales by alpha / r (LyCORIS by 1)
    "lokr-full": ("lokr", dict(r=16, alpha=3, target_modules=ATTN + CONVS)),
    "lokr-effective-conv": (
        "lokr",
        dict(r=2, alpha=5, decompose_both=True, use_effective_conv2d=True, target_modules=ATTN + CONVS),
    ),
    "lokr-patterns": (
        "lokr",
        dict(
            r=2,
            alpha=3,
            target_modules=ATTN + CONVS,
            decompose_both=True,
            rank_pattern={"to_k": 16, "^up_blocks.*conv1": 1},
            alpha_pattern={"to_out.0": 7, "proj_in": 1},
        ),
    ),  # fmt: skip
}


def _randomize(model, seed: int) -> None:
    """Random non-zero adapter tensors; DoRA magnitudes scaled by 0.5 to 1.5 (they start at the rows' norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
            elif any(f in name for f in ("lora_A", "lora_B", "hada_", "lokr_")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _peft_unet(make_pipe, case: str, seed: int = 0):
    """(peft model over a tiny SD1 UNet with adapter `case`, an untouched copy of the UNet)."""
    from peft import get_peft_model

    unet = make_pipe("sd1").unet
    fresh = copy.deepcopy(unet)
    kind, fields = CASES[case]
    model = get_peft_model(unet, _config(kind, **fields))
    _randomize(model, seed)
    model.eval()
    return model, fresh


def _weights(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.state_dict().items()}


def _assert_same_weights(ours: dict, theirs: dict, base: dict) -> None:
    assert ours.keys() == theirs.keys()
    changed = 0
    for name, expected in theirs.items():
        got = ours[name]
        # a merged weight: base + a delta summed over a row (DoRA's norm) at most
        assert_close_scaled(got, expected, reduction=expected[0].numel() if expected.dim() > 1 else 1, msg=name)
        changed += not torch.equal(expected, base[name])
    assert changed > 0  # the adapter does change weights


@pytest.mark.conformance(dialect="peft standalone", kind="{case}", arch="sd1", checks="read apply", reference="peft")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_standalone_kinds_match_peft(make_pipe, tmp_path, case):
    model, fresh = _peft_unet(make_pipe, case, seed=len(case))
    model.save_pretrained(tmp_path / "adapter")
    expected = forward_main(model.base_model.model)
    base_out, base_weights = forward_main(fresh), _weights(fresh)

    lora_kit.load(fresh, tmp_path / "adapter", name="x")
    got = forward_main(fresh)
    assert_close_scaled(got, expected, reduction=fresh)
    assert not torch.allclose(got, base_out, atol=1e-3)  # the adapter does change the output
    adapted = {p for p, _ in lora_modules(fresh)}
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert adapted == {n for n, m in model.base_model.model.named_modules() if isinstance(m, BaseTunerLayer)}

    lora_kit.collapse(fresh)
    merged = model.merge_and_unload()
    _assert_same_weights(_weights(fresh), _weights(merged), base_weights)


def _diffusers_file(folder, out, spelling: str = "") -> None:
    """A save_pretrained folder as a diffusers-style file: `unet.<path>.<name>` keys, the config as
    `lora_adapter_metadata` (diffusers' save_lora_weights layout); `spelling` replaces `.lora_magnitude_vector`."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "adapter_model.safetensors")
    tensors = {"unet." + k.removeprefix("base_model.model."): t for k, t in tensors.items()}
    if spelling:
        tensors = {k.replace(".lora_magnitude_vector", spelling): t for k, t in tensors.items()}
    config = json.loads((folder / "adapter_config.json").read_text())
    meta = {f"unet.{k}": v for k, v in config.items()}
    save_file(tensors, out, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})


@pytest.mark.parametrize(
    "case, spelling",
    [("dora-conv", ""), ("dora-linear", ".lora_magnitude_vector.weight"), ("loha-patterns", ""),
     ("lokr-full", ""), ("lokr-patterns", "")],
)  # fmt: skip
@pytest.mark.conformance(dialect="peft", kind="{case}", arch="sd1", checks="read apply", reference="peft")
def test_diffusers_style_kinds_match_peft(make_pipe, tmp_path, case, spelling):
    """PEFT's tensors under diffusers' component prefix (`unet.`), read without a PEFT folder: the DoRA magnitude
    in each spelling diffusers reads, LoHa/LoKr keys as PEFT names them, scales from the metadata's config."""
    model, _ = _peft_unet(make_pipe, case, seed=7)
    model.save_pretrained(tmp_path / "adapter")
    _diffusers_file(tmp_path / "adapter", tmp_path / "d.safetensors", spelling)
    pipe = make_pipe("sd1")
    lora_kit.load(pipe, tmp_path / "d.safetensors", name="x")
    assert_close_scaled(forward_main(pipe.unet), forward_main(model.base_model.model), reduction=pipe.unet)


@pytest.mark.conformance(dialect="peft", kind="dora", arch="sd1", checks="read apply write", reference="diffusers")
def test_dora_written_for_diffusers_loads_in_diffusers(make_pipe, tmp_path):
    """A DoRA lora_kit writes as format peft (mixed ranks and alphas: rslora + patterns) loads through diffusers'
    own load_lora_weights and computes lora_kit's forward; lora_kit reads its own file back the same."""
    from safetensors import safe_open

    model, _ = _peft_unet(make_pipe, "dora-rslora-patterns", seed=3)
    model.save_pretrained(tmp_path / "adapter")
    ours = make_pipe("sd1")
    lora_kit.load(ours, tmp_path / "adapter", name="x")
    expected = forward_main(ours.unet)
    path = lora_kit.save(ours, tmp_path / "dora.safetensors", format="peft")

    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        conv = f.get_tensor("unet.down_blocks.0.resnets.0.conv1.lora_magnitude_vector")
        linear = f.get_tensor("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector")
    assert conv.shape == (1, 32, 1, 1) and linear.shape == (32,)  # PEFT's shapes
    assert json.loads(meta["lora_adapter_metadata"])["unet.use_dora"] is True
    assert not any("dora_scale" in k for k in keys)

    theirs = make_pipe("sd1")
    theirs.load_lora_weights(str(path), adapter_name="x")
    assert_close_scaled(forward_main(theirs.unet), expected, reduction=ours.unet)

    again = make_pipe("sd1")
    lora_kit.load(again, path, name="x")
    assert_close_scaled(forward_main(again.unet), expected, reduction=ours.unet)


@pytest.mark.parametrize("case", ["loha", "lokr-full"])
def test_loha_lokr_refused_in_a_peft_write(make_pipe, tmp_path, case):
    model, _ = _peft_unet(make_pipe, case)
    model.save_pretrained(tmp_path / "adapter")
    pipe = make_pipe("sd1")
    lora_kit.load(pipe, tmp_path / "adapter", name="x")
    out = tmp_path / "x.safetensors"
    with pytest.raises(LoraKitError) as e:
        lora_kit.save(pipe, out, format="peft")
    message = str(e.value)
    assert "\n" not in message and "PEFT/diffusers files cannot hold" in message and "kohya" in message, message
    assert ("LoHa" if case == "loha" else "LoKr") in message
    assert not out.exists()


def test_column_dora_refused_in_a_peft_write():
    from lora_kit.formats.peft import to_peft

    state = {
        "unet.a.lora_down.weight": torch.randn(2, 8),
        "unet.a.lora_up.weight": torch.randn(6, 2),
        "unet.a.alpha": torch.tensor(2.0),
        "unet.a.dora_scale": torch.rand(1, 8),  # an older LyCORIS file's per-input-column norms
    }
    with pytest.raises(LoraKitError, match="DoRA by input columns.*kohya"):
        to_peft(state)
    state["unet.a.dora_scale"] = torch.rand(6, 1)
    tensors, meta = to_peft(state)
    assert tensors["unet.a.lora_magnitude_vector"].shape == (6,)
    assert json.loads(meta["lora_adapter_metadata"])["unet.use_dora"] is True


def test_peft_standalone_refusals(make_pipe, tmp_path):
    model, fresh = _peft_unet(make_pipe, "dora-linear")
    model.save_pretrained(tmp_path / "adapter")
    folder = tmp_path / "adapter"
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: t for k, t in tensors.items() if "magnitude" not in k}, folder / "adapter_model.safetensors")
    with pytest.raises(LoraKitError, match="no lora_magnitude_vector, but the config says use_dora"):
        lora_kit.load(fresh, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(config, peft_type="OFT")))
    with pytest.raises(LoraKitError, match="a PEFT OFT adapter"):
        lora_kit.load(fresh, folder)
    assert not list(lora_modules(fresh))
