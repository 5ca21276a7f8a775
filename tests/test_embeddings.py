"""Textual-inversion embeddings: every file layout loads as diffusers' own `load_textual_inversion` loads it (same
token ids, same prompt embeddings), unload restores tokenizer and embedding matrix bit-exactly, existing tokens are
refused, pivotal sidecars travel with their LoRA."""

import json

import pytest
import torch
from conftest import assert_close_scaled, assert_outputs_close, pipeline_outputs, randomize_adapters
from safetensors.torch import save_file

import lora_kit
from lora_kit import LoraKitError
from lora_kit.embeddings import add_tokens, get_embedding, set_embedding, token_ids
from lora_kit.formats import embeddings as ti_files
from lora_kit.formats import files
from lora_kit.inject import inject_lora, lora_modules

PROMPT = "a photo of <tok> dog"


def vectors(n, d=32, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def snapshot(pipe):
    """What a TI load may change: tokenizer (its whole JSON) and embedding matrix, per text encoder."""
    out = {}
    for tok_name, te_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        if getattr(pipe, te_name, None) is not None:
            tok, te = getattr(pipe, tok_name), getattr(pipe, te_name)
            weight = te.get_input_embeddings().weight.detach().clone()
            spec = json.loads(tok._tokenizer.to_str())
            for transient in ("padding", "truncation"):  # transformers sets these before every call
                spec.pop(transient)
            out[te_name] = (len(tok), spec, weight, te.config.vocab_size)
    return out


def assert_same_snapshot(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == b[k][0] and a[k][1] == b[k][1] and a[k][3] == b[k][3], k
        assert torch.equal(a[k][2], b[k][2]), k


def prompt_ids_and_embeds(pipe, prompt=PROMPT):
    """Token ids (after diffusers expands multi-vector tokens) and the pipeline's own prompt embeddings."""
    out = {}
    for tok_name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, tok_name, None)
        if tok is not None:
            out[tok_name] = tok(pipe.maybe_convert_prompt(prompt, tok)).input_ids
    embeds = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    return out, [e for e in embeds if e is not None]


def assert_same_prompt(ours, theirs, prompt=PROMPT):
    (ids_a, emb_a), (ids_b, emb_b) = prompt_ids_and_embeds(ours, prompt), prompt_ids_and_embeds(theirs, prompt)
    assert ids_a == ids_b
    assert len(emb_a) == len(emb_b)
    encoder = getattr(ours, "text_encoder_2", None) or ours.text_encoder  # (SDXL's second is the larger)
    for a, b in zip(emb_a, emb_b, strict=True):
        assert_close_scaled(a, b, reduction=encoder)


def write_layout(layout, tmp_path):
    """(path, token argument for diffusers) of a TI file in the given layout; its token is <tok> (2 vectors)."""
    v = vectors(2)
    if layout == "diffusers":
        save_file({"<tok>": v}, tmp_path / "learned_embeds.safetensors")
        return tmp_path / "learned_embeds.safetensors"
    if layout == "a1111":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "<tok>", "step": 500,
                    "sd_checkpoint": "abc", "sd_checkpoint_name": "model"}, tmp_path / "<tok>.pt")  # fmt: skip
        return tmp_path / "<tok>.pt"
    if layout == "kohya":
        save_file({"emb_params": v}, tmp_path / "<tok>.safetensors")
        return tmp_path / "<tok>.safetensors"
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ["diffusers", "a1111", "kohya"])
def test_layouts_load_as_diffusers_loads_them(make_pipe, tmp_path, layout):
    path = write_layout(layout, tmp_path)
    theirs, ours = make_pipe("sd1"), make_pipe("sd1")
    theirs.load_textual_inversion(str(path), token="<tok>")
    lora_kit.load(ours, path, allow_pickle=True)  # A1111 and kohya files are named by the file, as in A1111
    assert torch.equal(get_embedding(ours.tokenizer, ours.text_encoder, "<tok>"), vectors(2))
    assert ours.tokenizer.convert_tokens_to_ids(["<tok>", "<tok>_1"]) == theirs.tokenizer.convert_tokens_to_ids(
        ["<tok>", "<tok>_1"]
    )
    assert_same_prompt(ours, theirs)


def test_sdxl_clip_l_clip_g_loads_as_diffusers_two_calls(make_pipe, tmp_path):
    sd = {"clip_l": vectors(2, seed=1), "clip_g": vectors(2, seed=2)}
    save_file(sd, tmp_path / "<tok>.safetensors")
    theirs, ours = make_pipe("sdxl"), make_pipe("sdxl")
    theirs.load_textual_inversion(sd["clip_l"], token="<tok>", text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)  # fmt: skip
    theirs.load_textual_inversion(sd["clip_g"], token="<tok>", text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)  # fmt: skip
    lora_kit.load(ours, tmp_path / "<tok>.safetensors")
    assert torch.equal(get_embedding(ours.tokenizer, ours.text_encoder, "<tok>"), sd["clip_l"])
    assert torch.equal(get_embedding(ours.tokenizer_2, ours.text_encoder_2, "<tok>"), sd["clip_g"])
    assert_same_prompt(ours, theirs)


def test_unload_restores_tokenizers_and_matrices_exactly(make_pipe, tmp_path):
    for arch in ("sd1", "sdxl"):
        pipe = make_pipe(arch)
        before = snapshot(pipe)
        save_file({"<a>": vectors(3, seed=3)}, tmp_path / "a.safetensors")
        if arch == "sdxl":  # both text encoders
            save_file({"clip_l": vectors(1, seed=4), "clip_g": vectors(1, seed=5)}, tmp_path / "b.safetensors")
        else:
            save_file({"emb_params": vectors(1, seed=4)}, tmp_path / "b.safetensors")
        lora_kit.load(pipe, tmp_path / "a.safetensors")
        lora_kit.load(pipe, tmp_path / "b.safetensors", token="<b>")
        b_rows = get_embedding(pipe.tokenizer, pipe.text_encoder, "<b>")
        lora_kit.unload(pipe, "a")  # not the last one loaded: <b> moves down and keeps its vectors
        assert token_ids(pipe.tokenizer, ["<b>"]) == [before["text_encoder"][0]]
        assert torch.equal(get_embedding(pipe.tokenizer, pipe.text_encoder, "<b>"), b_rows)
        lora_kit.unload(pipe, "b")
        assert_same_snapshot(snapshot(pipe), before)
        with pytest.raises(LoraKitError, match="no adapter named 'a'"):
            lora_kit.unload(pipe, "a")


def test_existing_token_is_refused_and_nothing_changes(make_pipe, tmp_path):
    pipe = make_pipe("sd1")
    save_file({"<tok>": vectors(2)}, tmp_path / "first.safetensors")
    lora_kit.load(pipe, tmp_path / "first.safetensors")
    state = snapshot(pipe)
    save_file({"<tok>_1": vectors(1)}, tmp_path / "suffix.safetensors")  # clashes with <tok>'s second vector
    save_file({"<|endoftext|>": vectors(1)}, tmp_path / "special.safetensors")
    save_file({"emb_params": vectors(1, d=7)}, tmp_path / "width.safetensors")
    cases = {"first.safetensors": "'<tok>' already exists", "suffix.safetensors": "'<tok>_1' already exists",
             "special.safetensors": "already exists", "width.safetensors": "width 7"}  # fmt: skip
    for name, message in cases.items():
        with pytest.raises(LoraKitError) as info:
            lora_kit.load(pipe, tmp_path / name, name="other")
        text = str(info.value)
        assert message in text and name in text and "\n" not in text, (name, text)
        assert_same_snapshot(snapshot(pipe), state)
    with pytest.raises(LoraKitError, match="already exists"):  # the core function says the same
        add_tokens(pipe.tokenizer, pipe.text_encoder, {"<tok>": vectors(1)})
    torch.save({"string_to_param": {"*": vectors(1)}}, tmp_path / "a1111.pt")
    raw = (tmp_path / "a1111.pt").read_bytes()
    with pytest.raises(LoraKitError, match=r"a1111\.pt: .*allow_pickle=True \(--allow-pickle\)"):
        lora_kit.load(pipe, tmp_path / "a1111.pt")
    assert (tmp_path / "a1111.pt").read_bytes() == raw
    assert_same_snapshot(snapshot(pipe), state)


def test_pivotal_sidecar_travels_with_its_lora(make_pipe, tmp_path):
    trained = make_pipe("sd1")
    inject_lora(trained.unet, "attn", rank=2, alpha=1.0)
    inject_lora(trained.text_encoder, "clip-attn", rank=2)
    randomize_adapters(trained, seed=5)
    lora = lora_kit.save(trained, tmp_path / "pti.safetensors")
    sidecar = ti_files.write(
        tmp_path / "pti.emb.safetensors", {"text_encoder": {"<s0>": vectors(1), "<s1>": vectors(1, seed=1)}}
    )
    assert sidecar == ti_files.sidecar(lora)

    ours = make_pipe("sd1")
    before, base = snapshot(ours), pipeline_outputs(ours)
    assert lora_kit.load(ours, lora) == "pti"
    theirs = make_pipe("sd1")  # diffusers: the LoRA and the embeddings loaded separately
    theirs.load_lora_weights(str(lora))
    sd, _ = files.load(sidecar)  # diffusers takes a multi-token dict as a list of tensors plus their tokens
    theirs.load_textual_inversion([sd["<s0>"], sd["<s1>"]], token=["<s0>", "<s1>"])
    assert_same_prompt(ours, theirs, "a <s0><s1> dog")
    assert_outputs_close(pipeline_outputs(ours), pipeline_outputs(theirs), ours)
    lora_kit.unload(ours, "pti")
    assert_same_snapshot(snapshot(ours), before)
    assert_outputs_close(pipeline_outputs(ours), base, exact=True)
    assert not list(lora_modules(ours.unet))

    save_file({"<s0>": vectors(1)}, tmp_path / "clash.safetensors")  # a sidecar clash leaves the LoRA out too
    lora_kit.load(ours, tmp_path / "clash.safetensors")
    with pytest.raises(LoraKitError, match="'<s0>' already exists"):
        lora_kit.load(ours, lora)
    assert not list(lora_modules(ours.unet))


def test_write_layouts_and_read_back(make_pipe, tmp_path):
    xl = make_pipe("sdxl")
    embeds = {"text_encoder": {"<s0>": vectors(2), "<s1>": vectors(1, seed=1)},
              "text_encoder_2": {"<s0>": vectors(2, seed=2), "<s1>": vectors(1, seed=3)}}  # fmt: skip
    path = ti_files.write(tmp_path / "xl.safetensors", embeds)
    tensors, meta = files.load(path)
    assert set(tensors) == {"clip_l", "clip_g"} and tensors["clip_g"].shape == (3, 32)
    assert json.loads(meta["lora_kit.tokens"]) == [["<s0>", 2], ["<s1>", 1]]
    back = ti_files.read(path, xl)
    assert {c: {t: v.tolist() for t, v in e.items()} for c, e in back.items()} == {
        c: {t: v.tolist() for t, v in e.items()} for c, e in embeds.items()
    }
    one = ti_files.write(tmp_path / "one.safetensors", {"text_encoder": {"<x>": vectors(3)}})
    assert set(files.load(one)[0]) == {"<x>"}
    with pytest.raises(LoraKitError, match="already exists"):
        ti_files.write(one, {"text_encoder": {"<x>": vectors(3)}})
    with pytest.raises(LoraKitError, match="same tokens"):
        ti_files.write(tmp_path / "bad.safetensors", {"text_encoder": {"<a>": vectors(1)},
                                                       "text_encoder_2": {"<b>": vectors(1)}})  # fmt: skip


def test_get_and_set_embedding(make_pipe):
    pipe = make_pipe("sd1")
    tok, te = pipe.tokenizer, pipe.text_encoder
    entries = add_tokens(tok, te, {"<t>": vectors(2)})
    assert entries == ["<t>", "<t>_1"]
    set_embedding(tok, te, "<t>", vectors(2, seed=9))
    assert torch.equal(get_embedding(tok, te, "<t>"), vectors(2, seed=9))
    with pytest.raises(LoraKitError, match="has 2 vectors"):
        set_embedding(tok, te, "<t>", vectors(3))
