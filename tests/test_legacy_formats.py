"""Legacy and standalone LoRA files: cloneofsimo `.pt` lists and "safeloras" `.safetensors`, and PEFT's own
`save_pretrained` adapters. Expected outputs come from independent paths: cloneofsimo's module walk replayed here
with the deltas added to the base weights by hand, and peft's own forward."""

import json

import pytest
import torch
from conftest import assert_close_scaled, assert_outputs_close, forward_main, forward_text, pipeline_outputs
from safetensors.torch import save_file

import lora_kit
from lora_kit import LoraKitError
from lora_kit.inject import lora_modules
from lora_kit.state import components

UNET_TARGETS = ["CrossAttention", "Attention", "GEGLU"]
UNET_EXTENDED = UNET_TARGETS + ["ResnetBlock2D"]
TE_TARGETS = ["CLIPAttention"]


def cloneofsimo_walk(model, ancestor_class, search_class):
    """cloneofsimo/lora's `_find_modules_v2` (lora.py) in substance: the independent reference for module order."""
    ancestors = (m for m in model.modules() if m.__class__.__name__ in ancestor_class)
    for ancestor in ancestors:
        for fullname, module in ancestor.named_modules():
            if any(isinstance(module, c) for c in search_class):
                yield fullname, module


def random_pairs(model, classes, search_class, seed):
    """[(module, up, down)] in cloneofsimo's order, ranks alternating 2 and 3."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (_, module) in enumerate(cloneofsimo_walk(model, classes, search_class)):
        r = 2 + i % 2
        w = module.weight
        down = torch.randn(r, *w.shape[1:], generator=g) * 0.2
        up = torch.randn(w.shape[0], r, *([1] * (w.dim() - 2)), generator=g) * 0.2
        out.append((module, up, down))
    return out


def add_by_hand(pairs, scale=1.0):
    """W += scale * up @ down on the base modules: what the adapters must compute."""
    with torch.no_grad():
        for module, up, down in pairs:
            w = module.weight
            w += scale * (up.flatten(1).float() @ down.flatten(1).float()).reshape(w.shape)


def safeloras(path, parts, embeds=None):
    """Write a cloneofsimo `.safetensors`: parts = {component: (target classes, [(module, up, down)])}."""
    tensors, metadata = {}, {}
    for component, (classes, pairs) in parts.items():
        metadata[component] = json.dumps(classes)
        for i, (_, up, down) in enumerate(pairs):
            tensors[f"{component}:{i}:up"] = up.clone()
            tensors[f"{component}:{i}:down"] = down.clone()
            metadata[f"{component}:{i}:rank"] = str(down.shape[0])
    for token, vector in (embeds or {}).items():
        tensors[token] = vector
        metadata[token] = "<embed>"
    save_file(tensors, path, metadata=metadata)


def no_adapters(pipe):
    return not any(True for m in components(pipe).values() for _ in lora_modules(m))


@pytest.mark.parametrize("unet_targets", [UNET_TARGETS, UNET_EXTENDED], ids=["default", "extended"])
@pytest.mark.conformance(
    dialect="cloneofsimo safeloras", kind="lora", arch="sd1", checks="read apply", reference="by hand"
)
def test_safeloras_matches_hand_computed_deltas(make_pipe, tmp_path, unet_targets):
    expected_pipe = make_pipe("sd1")
    convs = unet_targets == UNET_EXTENDED  # the extended (LoCon-like) targets include ResnetBlock2D convs
    unet_pairs = random_pairs(expected_pipe.unet, unet_targets, [torch.nn.Linear, torch.nn.Conv2d], seed=1)
    te_pairs = random_pairs(expected_pipe.text_encoder, TE_TARGETS, [torch.nn.Linear], seed=2)
    assert len(unet_pairs) == 4 * 9 + (29 if convs else 0)  # 4 transformer blocks x 9 linears (+ resnet layers)
    path = tmp_path / "old.safetensors"
    safeloras(path, {"unet": (unet_targets, unet_pairs), "text_encoder": (TE_TARGETS, te_pairs)})

    ours = make_pipe("sd1")
    base = pipeline_outputs(ours)
    lora_kit.load(ours, path)
    add_by_hand(unet_pairs + te_pairs)
    expected = pipeline_outputs(expected_pipe)
    assert not torch.allclose(expected["main"], base["main"], atol=1e-3)
    assert_outputs_close(pipeline_outputs(ours), expected, expected_pipe)
    wrapped = {p for p, w in lora_modules(ours.unet) for a in w.adapters.values() if a.alpha.item() == a.rank}
    assert len(wrapped) == len(unet_pairs)  # scale 1: alpha = rank everywhere
    lora_kit.unload(ours, "old")
    assert_outputs_close(pipeline_outputs(ours), base, exact=True)


def test_safeloras_embed_tokens_and_bare_module(make_pipe, tmp_path):
    ref = make_pipe("sd1")
    unet_pairs = random_pairs(ref.unet, UNET_TARGETS, [torch.nn.Linear], seed=3)
    te_pairs = random_pairs(ref.text_encoder, TE_TARGETS, [torch.nn.Linear], seed=4)
    vectors = {"<s1>": torch.randn(32), "<s2>": torch.randn(32)}
    path = tmp_path / "pti.safetensors"
    safeloras(path, {"unet": (UNET_TARGETS, unet_pairs), "text_encoder": (TE_TARGETS, te_pairs)}, vectors)

    pipe = make_pipe("sd1")
    n = len(pipe.tokenizer)
    lora_kit.load(pipe, path)
    ids = pipe.tokenizer.convert_tokens_to_ids(["<s1>", "<s2>"])
    assert ids == [n, n + 1]
    rows = pipe.text_encoder.get_input_embeddings().weight[ids]
    assert torch.equal(rows, torch.stack([vectors["<s1>"], vectors["<s2>"]]))

    unet = make_pipe("sd1").unet  # a bare UNet takes the UNet part and ignores the rest
    lora_kit.load(unet, path)
    add_by_hand(unet_pairs)
    assert_close_scaled(forward_main(unet), forward_main(ref.unet), reduction=unet)


@pytest.mark.conformance(dialect="cloneofsimo .pt", kind="lora", arch="sd1", checks="read apply", reference="by hand")
def test_pt_lists_need_allow_pickle_and_match_hand_computed_deltas(make_pipe, tmp_path):
    ref = make_pipe("sd1")
    unet_pairs = random_pairs(ref.unet, UNET_TARGETS, [torch.nn.Linear], seed=5)
    te_pairs = random_pairs(ref.text_encoder, TE_TARGETS, [torch.nn.Linear], seed=6)
    unet_pairs = [(m, u.half(), d.half()) for m, u, d in unet_pairs]  # cloneofsimo saves fp16
    path, te_path = tmp_path / "lora_weight.pt", tmp_path / "lora_weight.text_encoder.pt"
    torch.save([t for _, up, down in unet_pairs for t in (up, down)], path)
    torch.save([t for _, up, down in te_pairs for t in (up, down)], te_path)
    token_vector = torch.randn(32)
    torch.save({"<krk>": token_vector}, tmp_path / "lora_weight.ti.pt")  # cloneofsimo's {token: (d,)}

    pipe = make_pipe("sd1")
    base = pipeline_outputs(pipe)
    before = path.read_bytes()
    with pytest.raises(LoraKitError) as info:
        lora_kit.load(pipe, path)
    message = str(info.value)
    assert "lora_weight.pt" in message and "allow_pickle" in message and "--allow-pickle" in message
    assert "\n" not in message and path.read_bytes() == before and no_adapters(pipe)

    assert lora_kit.load(pipe, path, allow_pickle=True) == "lora_weight"  # brings .text_encoder.pt and .ti.pt
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[-1], token_vector)
    assert pipe.tokenizer.convert_tokens_to_ids("<krk>") == len(pipe.tokenizer) - 1
    add_by_hand(unet_pairs + te_pairs)
    assert_outputs_close(pipeline_outputs(pipe), pipeline_outputs(ref), ref)
    lora_kit.unload(pipe, "lora_weight")
    assert_outputs_close(pipeline_outputs(pipe), base, exact=True)

    te = make_pipe("sd1").text_encoder  # a bare text encoder reads a list with the CLIPAttention walk
    lora_kit.load(te, te_path, allow_pickle=True)
    assert_close_scaled(forward_text(te), forward_text(ref.text_encoder), reduction=te)


def test_legacy_mismatches_are_one_line_errors(make_pipe, tmp_path):
    ref = make_pipe("sd1")
    pairs = random_pairs(ref.unet, UNET_TARGETS, [torch.nn.Linear], seed=7)
    torch.save([t for _, up, down in pairs[:-1] for t in (up, down)], tmp_path / "short.pt")
    swapped = [(m, down.T.contiguous(), up.T.contiguous()) for m, up, down in pairs]
    torch.save([t for _, up, down in swapped for t in (up, down)], tmp_path / "shape.pt")
    torch.save([pairs[0][1]], tmp_path / "odd.pt")
    safeloras(tmp_path / "extra.safetensors", {"unet": (UNET_TARGETS, pairs + pairs[:1])})
    safeloras(tmp_path / "sd1_on_sdxl.safetensors", {"unet": (UNET_TARGETS, pairs)})
    n = len(pairs)
    cases = {
        "short.pt": f"has {n - 1} unet modules but the model has more layers",
        "shape.pt": "do not fit its weight",
        "odd.pt": "[up0, down0, up1, down1, ...]",
        "extra.safetensors": f"has {n + 1} unet modules but the model has {n} layers",
    }
    pipe = make_pipe("sd1")
    base = pipeline_outputs(pipe)
    for name, expected in cases.items():
        with pytest.raises(LoraKitError) as info:
            lora_kit.load(pipe, tmp_path / name, allow_pickle=True)
        text = str(info.value)
        assert expected in text and name in text and "\n" not in text, (name, text)
        assert no_adapters(pipe)
    assert_outputs_close(pipeline_outputs(pipe), base, exact=True)
    with pytest.raises(LoraKitError, match="made for another architecture"):
        lora_kit.load(make_pipe("sdxl"), tmp_path / "sd1_on_sdxl.safetensors")


def _peft_text_encoder(te, tmp_path, **config):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=4, lora_alpha=2, target_modules=["q_proj", "v_proj", "fc1"], rank_pattern={"fc1": 2},
        alpha_pattern={"v_proj": 6}, init_lora_weights=False, **config,
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(te, cfg)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.conformance(
    dialect="peft standalone", kind="lora, rslora", arch="sd1", checks="read apply", reference="peft"
)
def test_peft_standalone_text_encoder_matches_peft_forward(make_pipe, tmp_path, rslora):
    theirs = make_pipe("sd1").text_encoder
    base = forward_text(theirs)
    model = _peft_text_encoder(theirs, tmp_path / "adapter", use_rslora=rslora)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    with torch.no_grad():
        expected = model(torch.tensor([[1, 5, 9, 20, 40, 60, 2]]) % 552).last_hidden_state
    assert not torch.allclose(expected, base, atol=1e-3)

    for path in (tmp_path / "adapter", tmp_path / "adapter" / "adapter_model.safetensors"):
        ours = make_pipe("sd1").text_encoder
        lora_kit.load(ours, path, name="p")
        assert_close_scaled(forward_text(ours), expected, reduction=ours)
        alphas = {p.split(".")[-1]: w.adapters["p"].alpha.item() for p, w in lora_modules(ours)}
        root = (lambda r: r**0.5) if rslora else (lambda r: 1.0)  # rsLoRA's alpha/sqrt(r) reads as alpha*sqrt(r)/r
        assert alphas["v_proj"] == pytest.approx(6 * root(4)) and alphas["fc1"] == pytest.approx(2 * root(2))

    pipe = make_pipe("sd1")  # into a pipeline: the component whose module paths the adapter names
    lora_kit.load(pipe, tmp_path / "adapter")
    assert_close_scaled(forward_text(pipe.text_encoder), expected, reduction=pipe.text_encoder)
    assert not list(lora_modules(pipe.unet))


def test_peft_standalone_unet_into_pipeline_and_ambiguity(make_pipe, tmp_path):
    from peft import LoraConfig, get_peft_model

    theirs = make_pipe("sd1")
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"],
                     init_lora_weights=False)  # fmt: skip
    model = get_peft_model(theirs.unet, cfg)
    model.save_pretrained(tmp_path / "unet_adapter")
    expected = forward_main(model.get_base_model())

    ours = make_pipe("sd1")
    lora_kit.load(ours, tmp_path / "unet_adapter")
    assert_close_scaled(forward_main(ours.unet), expected, reduction=ours.unet)

    _peft_text_encoder(make_pipe("sdxl").text_encoder, tmp_path / "te")
    xl = make_pipe("sdxl")  # the tiny SDXL's two CLIPs have the same layers: the user must say which
    with pytest.raises(LoraKitError, match="matches several"):
        lora_kit.load(xl, tmp_path / "te")
    assert no_adapters(xl)
    lora_kit.load(xl.text_encoder_2, tmp_path / "te")
    assert len(list(lora_modules(xl.text_encoder_2))) == 6
