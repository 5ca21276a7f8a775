"""lora-ppim end to end through the CLI (click CliRunner, in-process), with tiny random CLIP, CLIPSeg and GIT models
saved to local folders: validation and rejections, EXIF and colour conversion, crops, every caption mode, masks,
the manifest contract, and bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import clip_tokenizer
from lora_kit.cli.ppim import main
from PIL import Image

SMALL = ["--resolution", "32", "--min-size", "16"]
MANIFEST_KEYS = ["image", "caption", "mask", "source", "width", "height", "sha256"]
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "dog", "cat", "red", "blue", "on"]


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, str]:
    """Tiny random CLIP, CLIPSeg and GIT models with processors, each saved to its own folder."""
    import torch
    from transformers import (
        BertTokenizer,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        GitConfig,
        GitForCausalLM,
        GitProcessor,
        ViTImageProcessor,
    )

    root = tmp_path_factory.mktemp("ppim-models")
    tok = clip_tokenizer(str(root / "clip-tok"))
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4)  # fmt: skip
    square = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    paths = {k: str(root / k) for k in ("clip", "clipseg", "git")}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(paths["clip"])
    CLIPProcessor(image_processor=square, tokenizer=tok).save_pretrained(paths["clip"])
    seg = CLIPSegConfig(
        text_config=text, vision_config=vision, projection_dim=16, reduce_dim=16, extract_layers=[0, 1],
        decoder_num_attention_heads=2, decoder_intermediate_size=37,
    )  # fmt: skip
    CLIPSegForImageSegmentation(seg).save_pretrained(paths["clipseg"])
    stretch = ViTImageProcessor(size={"height": 32, "width": 32})
    CLIPSegProcessor(image_processor=stretch, tokenizer=tok).save_pretrained(paths["clipseg"])
    (root / "bert-tok").mkdir()
    (root / "bert-tok" / "vocab.txt").write_text("\n".join(BERT_WORDS + list("abcdefghijklmnopqrstuvwxyz")) + "\n")
    btok = BertTokenizer.from_pretrained(str(root / "bert-tok"))
    git = GitConfig(
        vision_config=vision,
        vocab_size=len(btok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        bos_token_id=btok.cls_token_id,
        eos_token_id=btok.sep_token_id,
        pad_token_id=btok.pad_token_id,
    )
    GitForCausalLM(git).save_pretrained(paths["git"])
    GitProcessor(image_processor=square, tokenizer=btok).save_pretrained(paths["git"])
    return paths


def _save(path: Path, img: Image.Image, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """One of every awkward input a user's photo folder has."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    _save(root / "good.png", Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)))
    _save(root / "cmyk.jpg", Image.new("CMYK", (64, 48), (0, 255, 255, 0)), quality=95)  # pure red
    ramp = np.tile(np.linspace(0, 65535, 64), (48, 1)).astype(np.uint16)  # 16-bit grey, left dark -> right light
    _save(root / "gray16.png", Image.fromarray(ramp))
    la = np.zeros((48, 64, 2), np.uint8)
    la[:, :32, 1] = 255  # left half opaque black, right half fully transparent
    _save(root / "graya.png", Image.fromarray(la, "LA"))
    stored = np.zeros((48, 64, 3), np.uint8)
    stored[:, :32] = (255, 0, 0)
    stored[:, 32:] = (0, 0, 255)  # stored: red left, blue right; orientation 6 shows it turned 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(root / "rotated.jpg", Image.fromarray(stored), exif=exif, quality=95)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "sub").mkdir()
    (root / "sub" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _save(root / "tiny.png", Image.new("RGB", (1, 1), (9, 9, 9)))
    (root / "notes.jpg").write_text("this is not a picture\n")
    (root / "sub" / "copy_of_good.png").write_bytes((root / "good.png").read_bytes())
    frames = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (root / "readme.txt").write_text("a caption-like file that is not an image and is skipped\n")
    return root


KEPT = {"cmyk.jpg", "good.png", "gray16.png", "graya.png", "rotated.jpg"}
REJECTED = {
    "anim.gif": "animated",
    "notes.jpg": "not an image",
    "sub/truncated.jpg": "truncated",
    "tiny.png": "too small",
}


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def ppim(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def read_manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def check_manifest(out: Path, masks: bool) -> list[dict]:
    """Every entry follows CONTRACTS.md exactly, and the files it names are what it says."""
    entries = read_manifest(out)
    for e in entries:
        assert list(e) == MANIFEST_KEYS
        img_path = out / e["image"]
        assert not Path(e["image"]).is_absolute() and img_path.is_file()
        with Image.open(img_path) as img:
            assert img.mode == "RGB" and img.size == (e["width"], e["height"])
        assert hashlib.sha256(img_path.read_bytes()).hexdigest() == e["sha256"]
        assert img_path.with_suffix(".txt").read_text().strip() == e["caption"]
        assert Path(e["source"]).is_absolute() and Path(e["source"]).is_file()
        if masks:
            with Image.open(out / e["mask"]) as m:
                assert m.mode == "L" and m.size == (e["width"], e["height"])
        else:
            assert e["mask"] is None
    return entries


def by_source(entries: list[dict], photos: Path) -> dict[str, dict]:
    return {Path(e["source"]).relative_to(photos).as_posix(): e for e in entries}


# ----------------------------------------------------------------------------------------- validation, template
@pytest.fixture(scope="session")
def template_run(photos, tmp_path_factory):
    before = _hashes(photos)
    out = tmp_path_factory.mktemp("runs") / "template"
    result = ppim(photos, out, *SMALL, "--token", "sks", "--template", "a photo of {token} {filename}")
    assert result.exit_code == 0, result.output
    assert _hashes(photos) == before  # inputs untouched
    return out, result


def test_kept_rejected_and_duplicates(photos, template_run):
    out, result = template_run
    entries = check_manifest(out, masks=False)
    assert set(by_source(entries, photos)) == KEPT
    report = json.loads((out / "report.json").read_text())
    rejected = {Path(r["source"]).relative_to(photos).as_posix(): r["reason"] for r in report["rejected"]}
    assert rejected == REJECTED
    dups = [(Path(d["source"]).relative_to(photos).as_posix(), Path(d["same_as"]).name) for d in report["duplicates"]]
    assert dups == [("sub/copy_of_good.png", "good.png")]
    assert result.stdout.strip().splitlines() == [
        (
            f"kept 5 of 10 files -> 5 images in {out}; "
            "rejected 4 (animated 1, not an image 1, too small 1, truncated 1); 1 duplicate dropped"
        )
    ]
    assert sorted(p.name for p in out.iterdir()) == ["images", "manifest.jsonl", "report.json"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_template_captions_and_crops(photos, template_run):
    out, _ = template_run
    entries = by_source(read_manifest(out), photos)
    assert entries["good.png"]["caption"] == "a photo of sks good"
    assert entries["gray16.png"]["caption"] == "a photo of sks gray16"
    assert all((e["width"], e["height"]) == (32, 32) for e in entries.values())


def test_pixels_exif_cmyk_16bit_alpha(photos, template_run):
    out, _ = template_run
    entries = by_source(read_manifest(out), photos)

    def pixels(name):
        return np.asarray(Image.open(out / entries[name]["image"]), dtype=np.int32)

    # orientation 6: shown upright the photo is 48x64 with red on top and blue below (stored: red left, blue right)
    rot = pixels("rotated.jpg")
    assert np.abs(rot[2:12] - (255, 0, 0)).max() < 40 and np.abs(rot[20:30] - (0, 0, 255)).max() < 40
    kept = {Path(k["source"]).name: k for k in json.loads((out / "report.json").read_text())["kept"]}
    assert kept["rotated.jpg"]["size"] == [48, 64] and kept["good.png"]["size"] == [64, 48]
    assert np.abs(pixels("cmyk.jpg")[16, 16] - (255, 0, 0)).max() < 10
    # 16-bit: scaled to 8 bits, not clipped. The centre crop maps output column i to source column
    # 8 + 1.5 (i + 0.5) - 0.5 of a ramp that is linear in the column (255 / 63 per column after scaling).
    gray = pixels("gray16.png")
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 0] == gray[..., 2]).all()
    expected = (8 + 1.5 * (np.arange(32) + 0.5) - 0.5) * 255 / 63
    assert np.abs(gray[16, :, 0] - expected).max() <= 2
    # grey + alpha: opaque black on the left, transparent (-> white background) on the right
    la = pixels("graya.png")
    assert (la[:, :12] == 0).all() and (la[:, 20:] == 255).all()


def test_colour_key_transparency_survives_16_bit_and_icc(tmp_path):
    """A PNG tRNS colour key is transparency too: the transparent pixels show --background also where the 16-bit
    rescale or the ICC conversion makes a new image (they came out black, the stored colour)."""
    from PIL import ImageCms

    from lora_kit.preprocess.images import open_image

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    other = srgb.replace("sRGB".encode("utf-16-be"), "xRGB".encode("utf-16-be"))  # not skipped as sRGB
    grey16 = np.full((8, 8), 30000, np.uint16)
    grey16[:, 4:] = 0  # right half: the key
    rgb = Image.new("RGB", (8, 8), (255, 0, 0))
    rgb.paste((0, 0, 0), (4, 0, 8, 8))
    cases = [(Image.fromarray(grey16), {"transparency": 0}, (117, 117, 117)),
             (Image.fromarray((grey16 >> 8).astype(np.uint8)), {"transparency": 0}, (117, 117, 117)),
             (rgb, {"transparency": (0, 0, 0), "icc_profile": other}, (255, 0, 0)),
             (rgb, {"transparency": (0, 0, 0), "icc_profile": srgb}, (255, 0, 0))]  # fmt: skip
    for n, (img, info, left) in enumerate(cases):
        img.save(tmp_path / f"{n}.png", **info)
        out = np.asarray(open_image(tmp_path / f"{n}.png", (0, 128, 255), 1).image, dtype=np.int32)
        assert np.abs(out[:, :4] - left).max() <= 1 and (out[:, 4:] == (0, 128, 255)).all(), n


def test_multi_frame_photos_use_frame_0_and_only_animations_are_rejected(tmp_path):
    """A camera JPEG with an MPF preview (PIL: MPO, 2 frames) and a multi-page TIFF are one photo each (frame 0);
    an APNG and an animated WebP are animations."""
    src = tmp_path / "in"
    src.mkdir()
    photo, extra = Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (64, 48), (30, 30, 200))
    photo.save(src / "DSC_0001.JPG", "MPO", save_all=True, append_images=[extra.resize((16, 12))])
    photo.save(src / "pages.tif", save_all=True, append_images=[extra])
    for name in ("anim.png", "anim.webp"):
        photo.save(src / name, save_all=True, append_images=[extra], duration=100)
    out = tmp_path / "out"
    assert ppim(src, out, *SMALL, "--token", "sks").exit_code == 0
    report = json.loads((out / "report.json").read_text())
    assert {Path(r["source"]).name: r["reason"] for r in report["rejected"]} == {
        "anim.png": "animated",
        "anim.webp": "animated",
    }
    entries = read_manifest(out)
    assert sorted(Path(e["source"]).name for e in entries) == ["DSC_0001.JPG", "pages.tif"]
    for e in entries:  # the first frame: red, not the blue second frame
        assert np.abs(np.asarray(Image.open(out / e["image"]), dtype=np.int32) - (200, 30, 30)).max() < 10


def test_train_reads_the_output(photos, template_run):
    """lora-train's data scanner takes the folder as it is: manifest captions, no masks, every image."""
    from lora_kit.train.data import scan

    out, _ = template_run
    examples, skipped = scan(out)
    assert skipped == [] and len(examples) == 5
    assert {ex.caption for ex in examples} >= {"a photo of sks good"} and all(ex.mask is None for ex in examples)


def test_repeat_folders_weigh_the_same_after_lora_ppim(tmp_path):
    """kohya N_name folders: lora-train samples lora-ppim's output of a folder as often as the folder itself."""
    from lora_kit.train.data import Plan, scan

    src, out = tmp_path / "in", tmp_path / "data"
    rng = np.random.default_rng(0)
    for folder, n in (("10_sks dog", 2), ("1_dog", 3), (".", 1)):
        for i in range(n):
            _save(src / folder / f"{i}.png", Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    assert ppim(src, out, *SMALL, "--token", "sks").exit_code == 0

    def draws(folder: Path, base: Path) -> dict[str, int]:
        examples, _ = scan(folder, "sks")
        plan = Plan(examples, 1, 32, 16, 0)
        drawn = [examples[i].image.relative_to(base).parent.as_posix() for n in range(plan.per_epoch)
                 for i in plan.batch(n)]  # fmt: skip
        return {name: drawn.count(name) for name in set(drawn)}

    assert draws(src, src) == draws(out, out / "images") == {"10_sks dog": 20, "1_dog": 3, ".": 1}


# ---------------------------------------------------------------------------------------------- caption modes
@pytest.fixture(scope="session")
def simple_photos(tmp_path_factory) -> Path:
    """Three plain photos of different aspect ratios (wide ones make crop positions matter)."""
    root = tmp_path_factory.mktemp("simple")
    rng = np.random.default_rng(1)
    for name, (h, w) in {"wide.png": (32, 128), "tall.png": (96, 40), "square.png": (48, 48)}.items():
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        a[:, : w // 4] //= 4  # a dark strip so the content is not uniform noise
        _save(root / name, Image.fromarray(a))
    return root


def test_clip_tags(models, simple_photos, tmp_path):
    import torch
    from transformers import CLIPModel, CLIPProcessor

    tags = ["a dog", "a cat", "a red circle", "a painting", "a photo", "the sea", "a person"]
    (tmp_path / "tags.txt").write_text("# my vocabulary\n" + "\n".join(tags) + "\n\n")
    out = tmp_path / "out"
    result = ppim(simple_photos, out, *SMALL, "--caption", "clip-tags", "--clip-model", models["clip"],
                  "--tags", tmp_path / "tags.txt", "--top-k", "3", "--token", "sks", "--batch-size", "2")  # fmt: skip
    assert result.exit_code == 0, result.output
    entries = check_manifest(out, masks=False)
    assert len(entries) == 3
    # independent path: the full CLIP forward's logits_per_image over the same phrases
    model, proc = CLIPModel.from_pretrained(models["clip"]).eval(), CLIPProcessor.from_pretrained(models["clip"])
    for e in entries:
        with Image.open(out / e["image"]) as img, torch.no_grad():
            logits = model(**proc(text=tags, images=img.convert("RGB"), padding=True, return_tensors="pt"))
        best = logits.logits_per_image[0].argsort(descending=True)[:3].tolist()
        assert e["caption"] == "sks, " + ", ".join(tags[i] for i in best)


def test_clip_tags_builtin_vocabulary(models, simple_photos, tmp_path):
    from lora_kit.preprocess.tags import TAGS

    out = tmp_path / "out"
    result = ppim(simple_photos, out, *SMALL, "--caption", "clip-tags", "--clip-model", models["clip"])
    assert result.exit_code == 0, result.output
    for e in read_manifest(out):
        phrases = e["caption"].split(", ")
        assert len(phrases) == 5 and set(phrases) <= set(TAGS)


def test_model_captions(models, simple_photos, tmp_path):
    """GIT through AutoModelForImageTextToText, greedy: the caption equals a direct generate() on the written image."""
    import torch
    from transformers import GitForCausalLM, GitProcessor

    out = tmp_path / "out"
    result = ppim(simple_photos, out, *SMALL, "--caption", "model", "--caption-model", models["git"],
                  "--max-new-tokens", "6", "--batch-size", "2", "--crop", "random:2", "--seed", "3")  # fmt: skip
    assert result.exit_code == 0, result.output
    entries = check_manifest(out, masks=False)
    assert len(entries) == 6  # two random crops each
    model, proc = GitForCausalLM.from_pretrained(models["git"]).eval(), GitProcessor.from_pretrained(models["git"])
    for e in entries:
        with Image.open(out / e["image"]) as img, torch.no_grad():
            ids = model.generate(**proc(images=img.convert("RGB"), return_tensors="pt"), do_sample=False,
                                 max_new_tokens=6)  # fmt: skip
        assert e["caption"] == " ".join(proc.batch_decode(ids, skip_special_tokens=True)[0].split())
    assert any(e["caption"] for e in entries)  # the tiny model does say something
    # deterministic: the same seed gives the same crops and captions
    again = tmp_path / "again"
    assert ppim(simple_photos, again, *SMALL, "--caption", "model", "--caption-model", models["git"],
                "--max-new-tokens", "6", "--crop", "random:2", "--seed", "3").exit_code == 0  # fmt: skip
    assert read_manifest(again) == entries


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="session")
def llava(models, tmp_path_factory) -> str:
    """A tiny LLaVA (CLIP vision tower + Llama) with a chat template: the chat-model path of --caption model."""
    from transformers import (
        BertTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    folder = tmp_path_factory.mktemp("llava")
    tok = BertTokenizer.from_pretrained(models["git"])
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    square = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=square, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE, image_token="<image>",
                   ).save_pretrained(folder)  # fmt: skip
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=4)  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default")  # fmt: skip
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    return str(folder)


def test_chat_model_captions(llava, simple_photos, tmp_path):
    """A chat model gets the instruction inside its chat template; the caption is what it says after the prompt."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / "out"
    result = ppim(simple_photos, out, *SMALL, "--caption", "model", "--caption-model", llava, "--max-new-tokens", "5",
                  "--caption-prompt", "What is in the photo?", "--token", "sks")  # fmt: skip
    assert result.exit_code == 0, result.output
    model = AutoModelForImageTextToText.from_pretrained(llava).eval()
    proc = AutoProcessor.from_pretrained(llava)
    prompt = "user: <image>What is in the photo?\nassistant:"  # CHAT_TEMPLATE written out by hand
    for e in check_manifest(out, masks=False):
        with Image.open(out / e["image"]) as img, torch.no_grad():
            inputs = proc(images=img.convert("RGB"), text=prompt, return_tensors="pt")
            ids = model.generate(**inputs, do_sample=False, max_new_tokens=5)[:, inputs["input_ids"].shape[1] :]
        said = " ".join(proc.batch_decode(ids, skip_special_tokens=True)[0].split())
        assert said and e["caption"] == f"sks, {said}"


def test_causal_lm_fallback(models, simple_photos, tmp_path, monkeypatch):
    """A vision model registered only as a causal LM loads through AutoModelForCausalLM (GIT, with its
    image-text-to-text registration hidden) and captions exactly as before."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto import modeling_auto

    args = [*SMALL, "--caption", "model", "--caption-model", models["git"], "--max-new-tokens", "6"]
    assert ppim(simple_photos, tmp_path / "a", *args).exit_code == 0
    monkeypatch.delitem(modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, "git")
    used, load = [], AutoModelForCausalLM.from_pretrained.__func__
    spy = classmethod(lambda cls, *a, **kw: used.append(cls) or load(cls, *a, **kw))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    assert ppim(simple_photos, tmp_path / "b", *args).exit_code == 0
    assert used == [AutoModelForCausalLM]
    captions = [[e["caption"] for e in read_manifest(tmp_path / d)] for d in "ab"]
    assert captions[0] == captions[1]


# ------------------------------------------------------------------------------------------ masks and crops
def test_masks_and_subject_crops(models, simple_photos, tmp_path):
    import torch
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    out = tmp_path / "out"
    result = ppim(simple_photos, out, *SMALL, "--mask", "face", "--mask-model", models["clipseg"], "--crop", "subject",
                  "--mask-threshold", "0.5", "--mask-blur", "1", "--token", "sks")  # fmt: skip
    assert result.exit_code == 0, result.output
    entries = check_manifest(out, masks=True)
    report = {Path(k["source"]).name: k for k in json.loads((out / "report.json").read_text())["kept"]}
    seg = CLIPSegForImageSegmentation.from_pretrained(models["clipseg"]).eval()
    proc = CLIPSegProcessor.from_pretrained(models["clipseg"])
    moved = 0
    for e in entries:
        mask = np.asarray(Image.open(out / e["mask"]))
        assert mask.dtype == np.uint8 and 0 < mask.max() <= 255 and len(np.unique(mask)) > 2  # blurred edges
        # the subject: pixels the model gives >= 0.5 on the whole source, computed here independently
        with Image.open(e["source"]) as src, torch.no_grad():
            src = src.convert("RGB")
            logits = seg(**proc(text=["face"], images=src, return_tensors="pt")).logits
        keep = torch.sigmoid(logits).reshape(logits.shape[-2:]).numpy() >= 0.5
        ys, xs = np.nonzero(keep)
        cx, cy = (xs.mean() + 0.5) / keep.shape[1] * src.width, (ys.mean() + 0.5) / keep.shape[0] * src.height
        left, top, right, bottom = report[Path(e["source"]).name]["outputs"][0]["crop"]
        assert left <= cx <= right and top <= cy <= bottom  # the crop contains the mask's centre
        side = min(src.size)
        # centred on it, except where the image edge stops the window
        assert abs((left + right) / 2 - np.clip(cx, side / 2, src.width - side / 2)) < 0.01
        assert abs((top + bottom) / 2 - np.clip(cy, side / 2, src.height - side / 2)) < 0.01
        moved += abs((left + right) / 2 - src.width / 2) + abs((top + bottom) / 2 - src.height / 2) > 1
    assert moved >= 1  # at least one crop is not simply the centre crop
    from lora_kit.train.data import scan

    examples, _ = scan(out)  # lora-train finds every mask the manifest names
    assert len(examples) == 3 and all(ex.mask is not None and ex.mask.is_file() for ex in examples)


def test_crop_geometry():
    """Sizes are exact and windows keep the requested centre, for every mode and shape."""
    from lora_kit.preprocess import crop

    for size in [(4000, 3000), (300, 1200), (512, 512), (513, 700)]:
        for target in [(512, 512), (768, 512)]:
            for centre in [(0.0, 0.0), (0.9, 0.2), (0.5, 0.5), (1.0, 1.0)]:
                (c,) = crop.plan(size, target, "subject", centre=centre, upscale=True)
                left, top, right, bottom = c.box
                assert c.size == target and abs((right - left) / (bottom - top) - target[0] / target[1]) < 1e-9
                assert 0 <= left <= centre[0] * size[0] <= right <= size[0]
                assert 0 <= top <= centre[1] * size[1] <= bottom <= size[1]
            for c in crop.plan(size, target, "random", count=4, upscale=True, seed="x"):
                assert c.size == target and 0 <= c.box[0] and c.box[2] <= size[0] + 1e-9
    for size in [(4000, 3000), (300, 1200), (512, 512), (513, 700), (20000, 300)]:
        for res, step in [(512, 64), (1024, 32), (64, 16)]:  # none: the image's bucket, centre-cropped to its aspect
            (n,) = crop.plan(size, (res, res), "none", upscale=True, step=step)
            left, top, right, bottom = n.box
            assert n.size == crop.bucket(size, res, step)
            assert abs((right - left) / (bottom - top) - n.size[0] / n.size[1]) < 1e-9
    (n,) = crop.plan((20000, 300), (64, 64), "none", step=16)  # a panorama: its centre 4:1, lora-train's bucket
    assert n.size == (128, 32) and n.box == (9400.0, 0.0, 10600.0, 300.0)
    img = Image.new("RGB", (640, 480))
    assert crop.apply(img, crop.plan((640, 480), (256, 256), "center")[0], "lanczos").size == (256, 256)
    with pytest.raises(Exception, match="too small"):
        crop.plan((300, 300), (512, 512), "center")


def test_a_bucket_is_its_own_bucket():
    """lora-train takes an image that has the size of a bucket as it is, so nothing lora-ppim --crop none writes is
    resized a second time (rounding each side of the image's bucket again moved 1 in 5 of them)."""
    from lora_kit.train.data import bucket

    for res in (32, 100, 512, 768, 1024):
        for step in (8, 16, 32, 64):
            for w in range(1, 5000, 7):
                b = bucket((w, 1000), res, step)
                assert bucket(b, res, step) == b and b[0] % step == 0 and b[1] % step == 0, (w, res, step)


def test_a_coarse_bucket_is_its_own_bucket_at_finer_steps():
    """lora-ppim --crop none at its default step (64) writes what lora-train takes as it is for SDXL (32) and SD3,
    FLUX, the toy model (16) too: at 1024, 22 of the 49 step-64 buckets were resized again at step 32, 32 at 16."""
    from lora_kit.preprocess import crop

    for res in (512, 768, 1024, 1536):
        for w in range(100, 8000, 13):
            (c,) = crop.plan((w, 1000), (res, res), "none", upscale=True, step=64)
            for step in (64, 32, 16, 8):
                assert crop.bucket(c.size, res, step) == c.size, (w, res, step)


def test_no_crop_writes_lora_trains_bucket_and_small_images_need_upscale(simple_photos, tmp_path):
    """--crop none: every image at its lora-train bucket (--resolution, --bucket-step), which lora-train then loads
    without resizing; photos smaller than their bucket are "too small" without --upscale, as in the other modes."""
    from lora_kit.train.data import Plan, load, scan

    out = tmp_path / "none"
    assert ppim(simple_photos, out, *SMALL, "--token", "sks", "--crop", "none", "--bucket-step", "8").exit_code == 0
    sizes = {Path(e["source"]).name: (e["width"], e["height"]) for e in read_manifest(out)}
    assert sizes == {"wide.png": (64, 16), "tall.png": (24, 48), "square.png": (32, 32)}  # 4:1, 5:12 -> 1:2, 1:1
    examples, _ = scan(out)
    plan = Plan(examples, 1, 32, 8, 0)
    for ex, size in zip(examples, plan.sizes, strict=True):
        assert size == ex.size
        pixels, _ = load(ex, size, flip=False)  # the written pixels exactly: no second resampling
        written = np.asarray(Image.open(ex.image), dtype=np.float32) / 127.5 - 1.0
        assert np.array_equal(pixels.permute(1, 2, 0).numpy(), written)
    # at 64 the 48x48 square cannot fill its 64x64 bucket without --upscale; the others fill theirs exactly
    fit = {"wide.png": (128, 32), "tall.png": (40, 96)}
    for extra, kept in (([], fit), (["--upscale"], {"square.png": (64, 64)})):
        again = tmp_path / f"none64{len(extra)}"
        args = ["--resolution", "64", "--min-size", "16", "--token", "sks", "--crop", "none", "--bucket-step", "8"]
        assert ppim(simple_photos, again, *args, *extra).exit_code == 0
        sizes = {Path(e["source"]).name: (e["width"], e["height"]) for e in read_manifest(again)}
        assert kept.items() <= sizes.items() and ("square.png" in sizes) == bool(extra)
    # 64x64 crops: too small without --upscale, exact size with it
    small = ppim(simple_photos, tmp_path / "small", "--resolution", "64", "--min-size", "16", "--token", "sks")
    assert small.exit_code == 2 and "too small" in small.output and not (tmp_path / "small").exists()
    up = tmp_path / "up"
    assert (
        ppim(simple_photos, up, "--resolution", "64", "--min-size", "16", "--upscale", "--token", "sks").exit_code == 0
    )
    assert {(e["width"], e["height"]) for e in read_manifest(up)} == {(64, 64)}


# ---------------------------------------------------------------------------------------------- bad input
def _bad(args, match, *, written: Path | None = None):
    result = ppim(*args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    # what a terminal shows: a progress bar (if any) erases itself with carriage returns
    lines = [line.rsplit("\r", 1)[-1] for line in result.stderr.split("\n")]
    lines = [line for line in lines if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.output
    if written is not None:
        assert not written.exists() and not [p for p in written.parent.iterdir() if p.name.startswith(".")]


def test_bad_input(models, photos, tmp_path):
    before = _hashes(photos)
    out = tmp_path / "out"
    ok = [*SMALL, "--token", "sks"]
    _bad([tmp_path / "missing", out, *ok], "no such input folder", written=out)
    (tmp_path / "empty").mkdir()
    _bad([tmp_path / "empty", out, *ok], "no image files", written=out)
    _bad([photos, photos, *ok], "is the input folder")
    _bad([photos, photos / "out", *ok], "inside the input folder")
    _bad([photos / "sub", photos, *ok], "contains the input folder")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    _bad([photos, full, *ok], "not empty")
    _bad([photos, full, *ok, "--force"], "not a lora-ppim output")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    _bad([photos, out, *ok, "--caption", "clip-tags", "--clip-model", models["clipseg"]], "not a CLIP model",
         written=out)  # fmt: skip
    _bad([photos, out, *ok, "--caption", "clip-tags", "--clip-model", tmp_path / "nope"], "no such folder")
    _bad([photos, out, *ok, "--caption", "model", "--caption-model", models["clip"]], "not an image-to-text model",
         written=out)  # fmt: skip
    _bad([photos, out, *ok, "--caption", "model", "--caption-model", tmp_path / "empty"], "no config.json")
    _bad([photos, out, *ok, "--mask", "face", "--mask-model", models["clip"]], "not CLIPSeg", written=out)
    _bad([photos, out, *ok, "--crop", "subject"], "--crop subject needs --mask")
    _bad([photos, out, *ok, "--crop", "random:0"], "--crop 'random:0'")
    _bad([photos, out, *ok, "--resolution", "big"], "--resolution 'big'")
    _bad([photos, out, *ok, "--crop", "none", "--resolution", "64x32"], "with --crop none give one number")
    _bad([photos, out, *ok, "--crop", "none", "--bucket-step", "0"], "--bucket-step 0 is not allowed")
    _bad([photos, out, *SMALL, "--template", "a photo of {token}"], "give token")
    _bad([photos, out, *ok, "--background", "nocolour"], "--background 'nocolour'", written=out)
    assert _hashes(photos) == before


def test_a_lora_ppim_output_is_not_an_input(simple_photos, tmp_path):
    """Its masks/ would be taken as photos: refused in one line, as the input or inside it; its images/ alone work."""
    prepared = tmp_path / "in" / "prepared"
    assert ppim(simple_photos, prepared, *SMALL, "--token", "sks").exit_code == 0
    again = tmp_path / "again"
    _bad([prepared, again, *SMALL, "--token", "sks"], "is a lora-ppim output (manifest.jsonl)", written=again)
    _bad([tmp_path / "in", again, *SMALL, "--token", "sks"], "holds, in prepared/, a lora-ppim output", written=again)
    assert ppim(prepared / "images", again, *SMALL, "--token", "sks").exit_code == 0
    assert sorted(Path(e["source"]).name for e in read_manifest(again)) == ["square.png", "tall.png", "wide.png"]


def test_template_placeholders_and_float_flags_are_checked(photos, tmp_path):
    """Only plain {token} and {filename} in --template ({token.upper} wrote '<built-in method upper ...>' into every
    caption); nan and inf are refused where they passed the range checks (--mask-blur inf, nan)."""
    out = tmp_path / "out"
    ok = [*SMALL, "--token", "sks"]
    for template in ("photo of {token.upper}", "{token[0]}", "{token!r}", "{token:>9}", "{0}", "{}", "{other}", "a {"):
        _bad([photos, out, *ok, "--template", template], f"--template {template!r} is not allowed", written=out)
    for name in ("--mask-blur", "--mask-threshold"):
        for value in ("nan", "inf", "-inf"):
            message = f"{name} {float(value)!r} is not allowed; it must be a finite number"
            _bad([photos, out, *ok, name, value], message, written=out)
    _bad([photos, out, *SMALL, "--token", " "], "--token ' ' is not allowed; it must not be blank", written=out)


def test_model_with_missing_weights_is_refused(models, photos, tmp_path):
    """A folder whose weights do not fit its config (CLIPSeg weights beside a GIT config) is refused, not filled
    with random values."""
    import shutil

    broken = tmp_path / "broken-git"
    shutil.copytree(models["git"], broken)
    shutil.copy(Path(models["clipseg"]) / "model.safetensors", broken / "model.safetensors")
    out = tmp_path / "out"
    _bad([photos, out, *SMALL, "--caption", "model", "--caption-model", broken], "missing or mismatched",
         written=out)  # fmt: skip


def test_failure_midway_leaves_nothing(photos, tmp_path, monkeypatch):
    """An error while writing removes the staging folder; an earlier output survives a failed --force run."""
    from lora_kit.preprocess import caption

    out = tmp_path / "deep" / "out"
    assert ppim(photos, out, *SMALL, "--token", "sks").exit_code == 0
    first = _hashes(out)

    def boom(self, images, sources):
        raise caption.LoraKitError("captioner failed")

    monkeypatch.setattr(caption.TemplateCaptioner, "__call__", boom)
    _bad([photos, out, *SMALL, "--token", "sks", "--force"], "captioner failed")
    assert _hashes(out) == first and sorted(p.name for p in out.parent.iterdir()) == ["out"]
    fresh = tmp_path / "new" / "dir" / "out"
    _bad([photos, fresh, *SMALL, "--token", "sks"], "captioner failed")
    assert not (tmp_path / "new").exists()  # parents it created are gone too
    monkeypatch.undo()
    replaced = ppim(photos, out, *SMALL, "--token", "ohwx", "--force")
    assert replaced.exit_code == 0 and read_manifest(out)[0]["caption"] == "a photo of ohwx"


def test_sigterm_removes_the_staging_folder(simple_photos, tmp_path):
    """kill/timeout (SIGTERM) end a run as Ctrl-C does: no hidden folder is left beside the output (a real process:
    the signal is sent to itself in the middle of the run)."""
    import signal
    import subprocess
    import sys

    code = (
        "import os, signal, sys, time\n"
        "from lora_kit.preprocess import caption\n"
        "from lora_kit.cli.ppim import main\n"
        "def killed(self, images, sources):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "caption.TemplateCaptioner.__call__ = killed\n"
        "main(sys.argv[1:])\n"
    )
    args = [simple_photos, tmp_path / "out", *SMALL, "--token", "sks"]
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, timeout=120)
    assert done.returncode == 128 + signal.SIGTERM and list(tmp_path.iterdir()) == [], done.stderr


def test_a_killed_runs_staging_folder_is_swept_by_the_next_run(simple_photos, tmp_path):
    """What a SIGKILLed run left (its process is gone) goes when lora-ppim next writes that output; the staging
    folder of a running process and those of other outputs stay."""
    import subprocess
    import sys

    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              check=True).stdout)  # fmt: skip
    stale = tmp_path / f".out.{gone}-k3_x9abc.ppim-tmp"
    (stale / "images").mkdir(parents=True)
    (stale / "images" / "a.png").write_bytes(b"half written")
    kept = [tmp_path / f".out.{os.getppid()}-abcd1234.ppim-tmp", tmp_path / f".other.{gone}-abcd1234.ppim-tmp"]
    for p in kept:
        p.mkdir()
    assert ppim(simple_photos, tmp_path / "out", *SMALL, "--token", "sks").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *(p.name for p in kept)])


def test_help_is_fast_and_light():
    import subprocess
    import sys

    code = "import sys; from lora_kit.cli.ppim import main; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
    result = ppim("--help")
    assert result.exit_code == 0 and "--mask-threshold" in result.output


def test_output_names_are_unique():
    from lora_kit.preprocess.manifest import Staging

    stage = Staging(Path("unused"))
    names = [stage.name(Path(p)) for p in ["a.jpg", "a.png", "A.PNG", "sub/a.jpg", "b.jpg"]]
    assert names == ["images/a.png", "images/a-png.png", "images/A-2.png", "images/sub/a.png", "images/b.png"]
    assert [stage.name(Path("c.jpg"), i) for i in range(2)] == ["images/c-0.png", "images/c-1.png"]


def test_token_and_filename_words():
    from lora_kit.preprocess.caption import apply_token, filename_words

    assert apply_token("a man on a beach", "sks", ["man", "person"]) == "a sks on a beach"
    assert apply_token("a dog on a beach", "sks", ["man"]) == "sks, a dog on a beach"
    assert apply_token("sks dog", "sks") == "sks dog"
    assert apply_token("", "sks") == "sks"
    assert apply_token("a cat", None) == "a cat"
    # the token is inserted as written, never read as a regex replacement template (backslashes, \g<0>)
    assert apply_token("a photo of a man", r"\g<0>_sks", ["man"]) == r"a photo of a \g<0>_sks"
    assert apply_token("a Man", r"ohwx\style", ["man"]) == r"a ohwx\style"
    assert apply_token("a woman", "C:\\x", ["man"]) == "C:\\x, a woman"
    assert filename_words(Path("dir/red_dog-01.final.jpg")) == "red dog final"
    assert filename_words(Path("IMG_0042.JPG")) == "IMG"
