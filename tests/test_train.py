"""lora-train on tiny SD1/SDXL pipelines: every mode writes files diffusers loads, the model learns, the objective
matches its formulas, textual inversion touches only its rows, resume is bit-exact, and bad inputs fail cleanly."""

import collections
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import Stopped, assert_close_scaled, fixed_noise_loss, stop_after
from lora_kit.cli import train as train_cli
from PIL import Image

import lora_kit
from lora_kit import LoraKitError
from lora_kit.formats import files
from lora_kit.train import loop, objective
from lora_kit.train.config import TrainConfig

COLORS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 30)]


def write_images(folder: Path, caption: str = "a photo of sks dog", n: int = 4, size=(40, 32)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", size, (20, 20, 20))
        img.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), COLORS[i % 4]), (size[0] // 4, size[1] // 4))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from conftest import build_pipeline

    root = tmp_path_factory.mktemp("train_models")
    out = {}
    for arch in ("sd1", "sdxl"):
        build_pipeline(arch, str(root / f"tok_{arch}")).save_pretrained(root / arch)
        out[arch] = str(root / arch)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("data") / "images")


def config(models, data, tmp_path, arch="sd1", **kw):
    base = dict(model=models[arch], data=str(data), output=str(tmp_path / "out.safetensors"), steps=3,
                resolution=32, rank=4, batch_size=2, lr=1e-3, validation_steps=2, num_class_images=2)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


MODES = {
    "lora": dict(text_encoder_rank=2),
    "dreambooth": dict(class_prompt="a photo of a dog"),
    "textual-inversion": dict(token="<sks>", init_token="dog", num_vectors=2),
    "pivotal": dict(token="<sks>", ti_steps=1, instance_prompt=None),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_writes_files_diffusers_loads(models, data, tmp_path, arch, mode):
    from diffusers import DiffusionPipeline

    cfg = config(models, data, tmp_path, arch, mode=mode, **MODES[mode])
    written = loop.train(cfg)
    out = Path(cfg.output)
    assert out in written and out.with_name("out.config.toml") in written
    pipe = DiffusionPipeline.from_pretrained(models[arch])
    if mode == "textual-inversion":
        tensors, _ = files.load(out)
        if arch == "sdxl":
            for key, te, tok in (("clip_l", pipe.text_encoder, pipe.tokenizer), ("clip_g", pipe.text_encoder_2,
                                                                                  pipe.tokenizer_2)):  # fmt: skip
                pipe.load_textual_inversion(tensors[key], token="<sks>", text_encoder=te, tokenizer=tok)
        else:
            pipe.load_textual_inversion(str(out), token="<sks>")
        assert "<sks>_1" in pipe.tokenizer.get_vocab()
        return
    pipe.load_lora_weights(str(out))
    meta = files.read_header(out)[1]
    assert meta["lora_kit.mode"] == mode
    if mode == "pivotal":
        assert (tmp_path / "out.emb.safetensors").exists() and "<sks>" in meta["lora_kit.trigger_words"]
        ours = DiffusionPipeline.from_pretrained(models[arch])
        lora_kit.load(ours, out)  # the LoRA and the sidecar's token
        assert "<sks>" in ours.tokenizer.get_vocab()
    if mode == "dreambooth":
        assert len(list((tmp_path / "out-class-images").glob("*.png"))) == 2


@pytest.mark.slow
def test_pivotal_takes_prior_preservation_when_given_a_class_prompt(models, data, tmp_path):
    trained = {}
    for name, extra in (("plain", {}), ("prior", {"class_prompt": "a photo of a dog"})):
        (tmp_path / name).mkdir()
        cfg = config(models, data, tmp_path / name, mode="pivotal", token="<sks>", ti_steps=1, **extra)
        loop.train(cfg)
        trained[name] = files.load(cfg.output)[0]
    assert len(list((tmp_path / "prior" / "out-class-images").glob("*.png"))) == 2
    assert not (tmp_path / "plain" / "out-class-images").exists()
    plain, prior = trained["plain"], trained["prior"]
    assert plain.keys() == prior.keys() and any(not torch.equal(plain[k], prior[k]) for k in plain)


def test_several_class_prompts_and_the_class_guidance(make_pipe, models, data, tmp_path):
    from accelerate import Accelerator

    from lora_kit.train.prior import class_examples

    pipe = make_pipe("sd1")
    made = {}
    for name, guidance in (("default", None), ("g1", 1.0)):
        cfg = config(models, data, tmp_path, mode="dreambooth", class_prompt="a photo of a dog | a red cat|",
                     num_class_images=3, class_guidance=guidance, class_data=str(tmp_path / name))  # fmt: skip
        examples = class_examples(cfg, pipe, Accelerator(cpu=True))
        assert [ex.caption for ex in examples] == ["a photo of a dog", "a red cat", "a photo of a dog"]
        assert [(tmp_path / name / f"class-{i:05d}.txt").read_text() for i in range(3)] == [
            ex.caption for ex in examples
        ]
        made[name] = [np.asarray(Image.open(ex.image)) for ex in examples]
    # guidance 1 is the conditional prediction alone: other images than the pipeline's default 7.5
    assert not np.array_equal(made["default"][0], made["g1"][0])


def test_class_images_drawn_with_other_settings_are_refused(make_pipe, models, data, tmp_path):
    """The class folder records what drew its images: another class prompt, resolution or model is one error naming
    the folder and what differs (nothing deleted); the same settings reuse the images."""
    import shutil

    from accelerate import Accelerator

    from lora_kit.train.prior import class_examples

    folder = tmp_path / "classes"
    pipe, acc = make_pipe("sd1"), Accelerator(cpu=True)
    cfg = config(models, data, tmp_path, mode="dreambooth", class_prompt="a photo of a dog", class_data=str(folder))
    class_examples(cfg, pipe, acc)
    made = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert sorted(made) == ["class-00000.png", "class-00000.txt", "class-00001.png", "class-00001.txt",
                            "class-images.json"]  # fmt: skip
    other_model = tmp_path / "other-model"
    shutil.copytree(models["sd1"], other_model)
    (other_model / "unet" / "config.json").write_text((other_model / "unet" / "config.json").read_text() + " ")
    for change, message in (
        (dict(class_prompt="a red cat"), "drawn with --class-prompt 'a photo of a dog', not 'a red cat'"),
        (dict(resolution=64), "drawn with --resolution 32, not 64"),
        (dict(model=str(other_model)), f"drawn by --model {models['sd1']}, not {other_model}"),
    ):
        with pytest.raises(LoraKitError, match=f"^{folder}: its class images were {message}; move them away"):
            class_examples(replace(cfg, **change), pipe, acc)
    with pytest.raises(LoraKitError, match="its class images were drawn with --class-prompt"):  # before any loading
        loop.train(replace(cfg, class_prompt="a red cat"), pipe=None)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == made
    assert [ex.caption for ex in class_examples(cfg, pipe, acc)] == ["a photo of a dog"] * 2


def test_the_users_own_class_images_are_used_and_only_the_shortfall_drawn(make_pipe, models, data, tmp_path):
    """--class-data with the user's own images (any name; captioned by their .txt, else the class prompt): they are
    the first class images, and the base model draws only the rest up to --num-class-images."""
    from accelerate import Accelerator

    from lora_kit.train.prior import class_examples

    folder = write_images(tmp_path / "my-dogs", caption="my dog on grass", n=2)
    (folder / "img1.txt").unlink()
    cfg = config(models, data, tmp_path, mode="dreambooth", class_prompt="a photo of a dog", class_data=str(folder),
                 num_class_images=3)  # fmt: skip
    examples = class_examples(cfg, make_pipe("sd1"), Accelerator(cpu=True))
    assert [(ex.image.name, ex.caption) for ex in examples] == [
        ("img0.png", "my dog on grass"), ("img1.png", "a photo of a dog"), ("class-00000.png", "a photo of a dog")
    ]  # fmt: skip
    assert sorted(p.name for p in folder.glob("class-0*")) == ["class-00000.png", "class-00000.txt"]
    enough = class_examples(replace(cfg, num_class_images=2), None, Accelerator(cpu=True))  # nothing to draw
    assert [ex.image.name for ex in enough] == ["img0.png", "img1.png"]


def test_class_drawing_killed_midway_leaves_no_caption_without_its_image(make_pipe, models, data, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    """A run killed while saving class image 1 leaves no class-00001.txt without its PNG (the .txt was written first:
    the next scan failed with "caption file without an image"); a PNG left without its .txt gets it next run."""
    from accelerate import Accelerator
    from PIL import Image as PILImage

    from lora_kit.train.prior import class_examples

    folder, acc, pipe = tmp_path / "classes", Accelerator(cpu=True), make_pipe("sd1")
    cfg = config(models, data, tmp_path, mode="dreambooth", class_prompt="a photo of a dog | a red cat",
                 num_class_images=2, class_data=str(folder))  # fmt: skip
    real = PILImage.Image.save

    def killed_at_1(self, fp, *args, **kwargs):
        if "00001" in str(fp):
            raise KeyboardInterrupt
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(PILImage.Image, "save", killed_at_1)
    with pytest.raises(KeyboardInterrupt):
        class_examples(cfg, pipe, acc)
    monkeypatch.setattr(PILImage.Image, "save", real)
    assert not (folder / "class-00001.txt").exists()
    assert [ex.caption for ex in class_examples(replace(cfg, num_class_images=1), pipe, acc)] == ["a photo of a dog"]
    class_examples(cfg, pipe, acc)
    (folder / "class-00001.txt").unlink()  # killed after the PNG was renamed into place
    assert [ex.caption for ex in class_examples(cfg, None, acc)] == ["a photo of a dog", "a red cat"]


def test_pivotal_class_images_keep_their_own_captions(models, data, tmp_path, monkeypatch):
    """The new token goes in front of instance captions only: a class image trained as '<sks> a photo of a dog'
    would teach the token to be a plain dog and leave the class prompt itself unprotected."""
    from lora_kit.train.backbone import Backbone

    seen = []
    real = Backbone.encode_text
    monkeypatch.setattr(Backbone, "encode_text", lambda self, captions: seen.extend(captions) or real(self, captions))
    cfg = config(models, data, tmp_path, mode="pivotal", token="<sks>", ti_steps=1, class_prompt="a photo of a dog")
    loop.train(cfg)
    assert "a photo of a dog" in seen and "<sks> a photo of a dog" not in seen
    assert all("<sks>" in c for c in seen if "dog" in c and c != "a photo of a dog")


def test_prior_target_base_is_the_base_models_own_prediction(make_pipe, models, data, tmp_path):
    """prior_target='base': the class loss is the distance to what the base model (every adapter off, text encoder
    too) predicts on the same noisy latents and caption; the adapters are back on afterwards."""
    from conftest import randomize_adapters

    from lora_kit.train.backbone import Backbone
    from lora_kit.train.data import Plan, scan

    pipe, base = make_pipe("sd1"), make_pipe("sd1")
    lora_kit.inject_lora(pipe.unet, "kohya", rank=4)
    lora_kit.inject_lora(pipe.text_encoder, "clip-attn", rank=4)
    randomize_adapters(pipe.unet)
    randomize_adapters(pipe.text_encoder, seed=1)
    cfg = config(models, data, tmp_path, mode="dreambooth", class_prompt="a photo of a dog", prior_target="base")
    backbone, base_backbone = Backbone(pipe), Backbone(base)
    examples, _ = scan(cfg.data)
    batcher = loop.Batcher(cfg, backbone, examples, Plan(examples, 2, 32, backbone.size_step, 0), cache_text=False)
    batch = batcher.batch([0, 1], [0, 1], (3, 0), prior=True)
    with torch.no_grad():
        got = loop.per_sample_loss(cfg, backbone, batcher, batch, base_target=True)
        noisy, t, noise = backbone.noising(batch["x0"], batch["noise"], batch["timesteps"])
        adapted = backbone.predict(noisy, t, backbone.encode_text(batch["captions"]), batch["size"])
        want = base_backbone.predict(noisy, t, base_backbone.encode_text(batch["captions"]), batch["size"])
        classic = loop.per_sample_loss(cfg, backbone, batcher, batch)
    # means of squared residuals of the models' outputs: rounding relative to the outputs' squares
    reduction, scale = (pipe.text_encoder, pipe.unet, adapted[0].numel()), adapted.abs().max() ** 2
    assert_close_scaled(got, (adapted - want).square().flatten(1).mean(1), reduction=reduction, scale=scale)
    assert_close_scaled(classic, (adapted - noise).square().flatten(1).mean(1), reduction=reduction, scale=scale)
    assert not torch.allclose(adapted, want, atol=1e-3)  # the adapters matter, so the test could fail
    with pytest.raises(LoraKitError, match="prior_target"):
        config(models, data, tmp_path, prior_target="noise")


def test_init_sets_the_initial_down_factors_of_every_adapter(make_pipe, models, data, tmp_path):
    """init='gaussian' (peft's init_lora_weights='gaussian'): every down factor, UNet and text encoder, drawn with std
    1/rank; 'kaiming' (the default): uniform within 1/sqrt(fan_in); up starts at zero either way."""
    import math

    from lora_kit.inject import extract_lora_ups_down, lora_modules
    from lora_kit.train import recipes

    def factors(init):
        pipe = make_pipe("sd1")
        pipe.unet.eval(), pipe.text_encoder.eval()  # as from_pretrained leaves them
        torch.manual_seed(0)
        recipes.build(config(models, data, tmp_path, rank=8, text_encoder_rank=2, init=init), pipe)
        for model in (pipe.unet, pipe.text_encoder):  # the adapters train (dropout on), the frozen model does not
            wrappers = [w for _, w in lora_modules(model)]
            assert wrappers and all(m.training for w in wrappers for m in w.modules())
            assert not model.training and sum(m.training for m in model.modules()) == sum(
                len(list(w.modules())) for w in wrappers
            )
        return [list(extract_lora_ups_down(m)) for m in (pipe.unet, pipe.text_encoder)]

    for init in ("gaussian", "kaiming"):
        for pairs, rank in zip(factors(init), (8, 2), strict=True):
            assert pairs and all(torch.count_nonzero(up) == 0 and down.shape[0] == rank for up, down in pairs)
            downs = torch.cat([down.detach().flatten() for _, down in pairs])
            if init == "gaussian":
                assert abs(downs.std().item() - 1 / rank) < 0.1 / rank and abs(downs.mean().item()) < 0.1 / rank
            else:
                assert all(down.abs().max() <= 1 / math.sqrt(down[0].numel()) for _, down in pairs)
    with pytest.raises(LoraKitError, match="init"):
        config(models, data, tmp_path, init="orthogonal")


def _eval_loss(cfg, pipe) -> float:
    """The loss on the training images at fixed timesteps and noise (independent of the training RNG)."""
    return fixed_noise_loss(cfg, pipe, [(t, t) for t in (100, 300, 500, 700)])


def test_loss_decreases_when_overfitting(make_pipe, data, tmp_path, models):
    pipe = make_pipe("sd1")
    cfg = config(models, data, tmp_path, steps=60, lr=3e-3, rank=8, targets="locon", batch_size=2)
    before = _eval_loss(cfg, pipe)
    loop.train(cfg, pipe=pipe)
    after = _eval_loss(cfg, pipe)
    assert after < 0.8 * before, (before, after)


def test_objective_formulas_on_a_fixed_batch():
    g = torch.Generator().manual_seed(0)
    ac = torch.linspace(0.999, 0.01, 1000)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    noisy = objective.add_noise(x0, noise, t, ac)
    for i in range(3):
        a = ac[t[i]]
        torch.testing.assert_close(noisy[i], a.sqrt() * x0[i] + (1 - a).sqrt() * noise[i])
        v = objective.target(x0, noise, t, ac, "v_prediction")[i]
        torch.testing.assert_close(v, a.sqrt() * noise[i] - (1 - a).sqrt() * x0[i])
    snr = objective.snr(t, ac)
    torch.testing.assert_close(snr, torch.tensor([float(ac[k] / (1 - ac[k])) for k in t]))
    w_eps = objective.min_snr_weight(snr, 5.0, "epsilon")
    w_v = objective.min_snr_weight(snr, 5.0, "v_prediction")
    for i, s in enumerate(snr.tolist()):
        assert abs(w_eps[i].item() - min(s, 5.0) / s) < 1e-6 and abs(w_v[i].item() - min(s, 5.0) / (s + 1)) < 1e-6
    # the same weights as diffusers' training scripts give with --snr_gamma 5 (compute_snr), at every timestep
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    every = torch.arange(1000)
    theirs = compute_snr(sched, every)
    ours = objective.snr(every, sched.alphas_cumprod)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)  # elementwise, no sums: a few ulps (SNR spans decades)
    torch.testing.assert_close(objective.min_snr_weight(ours, 5.0, "epsilon"), theirs.clamp(max=5.0) / theirs)
    per = torch.tensor([1.0, 3.0, 10.0, 20.0])
    prior = torch.tensor([False, False, True, True])
    assert objective.combine(per, prior, 0.5).item() == pytest.approx(2.0 + 0.5 * 15.0)
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1.0
    w = objective.mask_weights([mask, None], (2, 4, 4, 4), 0.1)
    assert torch.allclose(w[0, 0, :, :2], torch.tensor(1.0)) and torch.allclose(w[0, 0, :, 2:], torch.tensor(0.1))
    assert torch.equal(w[1], torch.ones(1, 4, 4))


def test_textual_inversion_changes_only_its_rows(make_pipe, data, tmp_path, models, monkeypatch):
    """The new rows start at --init-token's embedding, the mean of its pieces ("dogs" is do + g + s</w> in the tiny
    tokenizer, pieces named here by hand), every vector alike; training moves them and no other row."""
    pipe = make_pipe("sd1")
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    n_before = len(pipe.tokenizer)
    start = []
    real = loop.make_optimizer

    def spy(cfg, recipe):  # the rows as the first step finds them
        start.append(recipe.rows["text_encoder"].param.detach().clone())
        return real(cfg, recipe)

    monkeypatch.setattr(loop, "make_optimizer", spy)
    cfg = config(models, data, tmp_path, mode="textual-inversion", token="<sks>", init_token="dogs", num_vectors=2,
                 steps=4, ti_lr=0.1)  # fmt: skip
    loop.train(cfg, pipe=pipe)
    after = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert after.shape[0] == n_before + 2
    assert torch.equal(after[:n_before], before)  # every old row bit-identical (AdamW weight decay included)
    pieces = before[pipe.tokenizer.convert_tokens_to_ids(["do", "g", "s</w>"])].double()
    want = ((pieces[0] + pieces[1] + pieces[2]) / 3).float()
    assert_close_scaled(start[0], torch.stack([want, want]), reduction=3)
    assert not torch.allclose(want, before[:n_before].mean(0), atol=1e-3)  # not the default start: could fail
    assert not torch.allclose(after[n_before:], start[0], atol=1e-3)  # trained


@pytest.mark.parametrize("extra", [{}, {"dropout": 0.5}], ids=["plain", "dropout"])
def test_resume_is_bit_exact(make_pipe, data, tmp_path, models, extra):
    """Stopped at step 2 and resumed == uninterrupted, bit for bit; adapter dropout included (its masks come from
    torch's global RNG, which the loop seeds from (seed, step, process) at every step)."""
    common = dict(steps=4, lr_scheduler="cosine", warmup_steps=1, text_encoder_rank=2, flip=True, caption_dropout=0.3,
                  **extra)  # fmt: skip
    (tmp_path / "a").mkdir()
    loop.train(config(models, data, tmp_path / "a", **common), pipe=make_pipe("sd1"))
    (tmp_path / "b").mkdir()
    with pytest.raises(Stopped):
        loop.train(config(models, data, tmp_path / "b", save_every=2, **common), callbacks=[stop_after(2)],
                   pipe=make_pipe("sd1"))  # fmt: skip
    assert (tmp_path / "b" / "out-checkpoints" / "step-2" / "state.json").exists()
    torch.manual_seed(1234)  # whatever the global RNG holds when the resumed run starts
    loop.train(config(models, data, tmp_path / "b", save_every=2, resume="latest", **common), pipe=make_pipe("sd1"))
    a, _ = files.load(tmp_path / "a" / "out.safetensors")
    b, _ = files.load(tmp_path / "b" / "out.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


GC_CASES = {"sd1": dict(text_encoder_rank=2), "sd3": dict(model="tiny-sd3", resolution=16, text_encoder_rank=2),
            "flux": dict(model="tiny-flux", resolution=16)}  # fmt: skip
IN_BLOCK = re.compile(r"\.(transformer_blocks|single_transformer_blocks|layers)\.\d+\.")  # what checkpointing wraps


@pytest.mark.parametrize("arch", list(GC_CASES))
def test_gradient_checkpointing_gives_the_same_adapter(make_pipe, data, tmp_path, models, arch):
    """--gradient-checkpointing is active: every adapter inside a transformer block (UNet, SD3/FLUX transformer) or a
    trained text encoder's layer runs twice per step (the backward recomputes it), the others once; and the adapters
    trained (dropout included: the recompute draws the same masks) are those of a run without it."""
    from lora_kit.inject import lora_modules
    from lora_kit.state import components

    outs, calls = [], []
    for gc in (False, True):
        folder = tmp_path / str(gc)
        folder.mkdir()
        counts = collections.Counter()

        def count_step_2(step, loss, context, counts=counts):  # hooks on after step 1: step 2's forwards are counted
            if step == 1:
                for comp, module in components(context["pipe"]).items():
                    for path, wrapper in lora_modules(module):
                        wrapper.register_forward_pre_hook(lambda m, args, k=f"{comp}.{path}": counts.update([k]))

        cfg = config(models, data, folder, steps=2, batch_size=1, gradient_checkpointing=gc, save_dtype="fp32",
                     dropout=0.2, **GC_CASES[arch])  # fmt: skip
        loop.train(cfg, callbacks=[count_step_2], pipe=make_pipe(arch))
        outs.append(files.load(folder / "out.safetensors")[0])
        calls.append(counts)
    plain, checkpointed = calls
    assert plain.keys() == checkpointed.keys() and set(plain.values()) == {1}
    want = {k: 2 if IN_BLOCK.search(k) else 1 for k in plain}
    assert checkpointed == want
    trained = {"sd1": {"unet", "text_encoder"}, "sd3": {"transformer", "text_encoder", "text_encoder_2"},
               "flux": {"transformer"}}  # fmt: skip
    assert {k.split(".")[0] for k in plain if IN_BLOCK.search(k)} == trained[arch]
    # the same kernels rerun in the backward: equal here to the bit; 1e-6 is a thousandth of one AdamW step (lr 1e-3)
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.allclose(outs[0][k], outs[1][k], atol=1e-6) for k in outs[0])


def test_nan_loss_stops_and_keeps_the_checkpoint(make_pipe, data, tmp_path, models, monkeypatch):
    real = loop.per_sample_loss
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        out = real(*args)
        return out * float("nan") if calls["n"] > 2 else out

    monkeypatch.setattr(loop, "per_sample_loss", poisoned)
    cfg = config(models, data, tmp_path, steps=4, save_every=2)
    with pytest.raises(LoraKitError, match="loss became nan at step 3.*step-2"):
        loop.train(cfg, pipe=make_pipe("sd1"))
    assert not Path(cfg.output).exists() and (tmp_path / "out-checkpoints" / "step-2").is_dir()


def test_cli_bad_inputs(models, data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    orphan = write_images(tmp_path / "orphan", n=1)
    (orphan / "lonely.txt").write_text("a caption")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    base = ["--model", models["sd1"], "--resolution", "32", "--steps", "1", "-o", str(tmp_path / "o.safetensors")]
    cases = [
        (["--data", str(tmp_path / "missing")], "no such data folder"),
        (["--data", str(empty)], "no images"),
        (["--data", str(orphan)], "caption file without an image"),
        (["--data", str(broken)], "none of the 1 images could be read"),
        (["--data", str(data), "--mode", "dreambooth"], "needs --class-prompt"),
        (["--data", str(data), "--mode", "dreambooth", "--class-prompt", " | "], "names no prompt"),
        (["--data", str(data), "--mode", "textual-inversion", "--token", "dog</w>"], "already exists"),
        (["--data", str(data), "--mode", "bogus"], "--mode is 'bogus'"),
        (["--data", str(data), "--resume", str(tmp_path)], "not a lora-train checkpoint"),
    ]
    for extra, message in cases:
        result = CliRunner().invoke(train_cli.main, base + extra)
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output and result.output.strip().count("\n") == 0, (extra, result.output)
        assert not (tmp_path / "o.safetensors").exists()
    result = CliRunner().invoke(train_cli.main, ["--model", models["sd1"], "--data", str(data), "-o", str(existing)])
    assert result.exit_code == 2 and "already exists" in result.output and existing.read_bytes() == b"keep me"


def test_resume_refuses_a_different_config(make_pipe, data, tmp_path, models):
    cfg = config(models, data, tmp_path, steps=2, save_every=1)
    loop.train(cfg, pipe=make_pipe("sd1"))
    other = config(models, data, tmp_path, steps=4, rank=8, resume="latest", force=True)
    with pytest.raises(LoraKitError, match="step-1: the checkpoint was made with a different training config"):
        loop.train(other, pipe=make_pipe("sd1"))


def test_resume_refuses_changed_data_or_model(make_pipe, models, tmp_path):
    """CONTRACTS: --resume refuses a checkpoint whose model or data differ, not only their paths: an edited caption,
    an added image or an edited model config are refused (before the model loads), the unchanged run resumes."""
    import shutil

    model, data = tmp_path / "model", write_images(tmp_path / "data", n=2)
    shutil.copytree(models["sd1"], model)
    cfg = config({"sd1": str(model)}, data, tmp_path, steps=2, save_every=1)
    with pytest.raises(Stopped):
        loop.train(cfg, callbacks=[stop_after()], pipe=make_pipe("sd1"))
    resume = replace(cfg, resume="latest")
    caption, unet_config = (data / "img0.txt").read_text(), (model / "unet" / "config.json").read_text()
    edits = [
        (lambda: (data / "img0.txt").write_text("a drawing of a cat"), "data"),
        (lambda: write_images(data, n=3), "data"),
        (lambda: (model / "unet" / "config.json").write_text(unet_config + " "), "model"),
    ]
    for edit, what in edits:
        edit()
        with pytest.raises(LoraKitError, match=f"step-1: the checkpoint was made with a different {what} "):
            loop.train(resume, pipe=None)  # refused before the model loads
        (data / "img0.txt").write_text(caption)
        (data / "img2.png").unlink(missing_ok=True), (data / "img2.txt").unlink(missing_ok=True)
        (model / "unet" / "config.json").write_text(unet_config)
    loop.train(resume, pipe=make_pipe("sd1"))
    assert Path(cfg.output).exists()


def test_force_replaces_an_earlier_runs_checkpoints(make_pipe, models, data, tmp_path):
    """--force without --resume clears the earlier run's step-N checkpoints once the new run starts, so --save-limit
    keeps this run's newest and --resume latest finds this run's; a checkpoint beyond --steps is refused."""
    import json

    loop.train(config(models, data, tmp_path, steps=4, save_every=1), pipe=make_pipe("sd1"))
    folder = tmp_path / "out-checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-1", "step-2", "step-3"]
    with pytest.raises(LoraKitError, match="step-3: the checkpoint is at step 3, beyond --steps 2"):
        loop.train(config(models, data, tmp_path, steps=2, save_every=1, resume="latest", force=True))
    (folder / "mine.txt").write_text("not lora-train's")  # what lora-train did not write stays
    loop.train(config(models, data, tmp_path, steps=3, save_every=1, save_limit=1, force=True), pipe=make_pipe("sd1"))
    assert sorted(p.name for p in folder.iterdir()) == ["mine.txt", "step-2"]
    assert json.loads((folder / "step-2" / "state.json").read_text())["steps"] == 3


def test_checkpoints_keep_the_fp16_loss_scale(make_pipe, models, data, tmp_path):
    """The GradScaler's state (fp16 on a GPU) is saved with the optimizer and restored on resume."""
    from diffusers.optimization import get_scheduler

    from lora_kit.train import checkpoints, recipes

    cfg = config(models, data, tmp_path, save_every=1)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**16) for _ in range(2)]
    for scaler in scalers:
        scaler.scale(torch.ones(()))  # the scale exists once a loss was scaled
    scalers[0].update(new_scale=512.0)
    prints = checkpoints.fingerprints(cfg)
    for i, scaler in enumerate(scalers):
        pipe = make_pipe("sd1")
        recipe = recipes.build(cfg, pipe)
        optimizer = torch.optim.AdamW(recipe.groups)
        scheduler = get_scheduler("constant", optimizer)
        if i == 0:
            checkpoints.save_checkpoint(cfg, 1, recipe, pipe, optimizer, scheduler, scaler, prints)
        else:
            resumed = replace(cfg, resume="latest")
            assert checkpoints.load_checkpoint(resumed, recipe, pipe, optimizer, scheduler, scaler, prints) == 1
    assert scalers[1].get_scale() == 512.0


def test_config_file_and_flags(models, data, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(f'model = "{models["sd1"]}"\ndata = "{data}"\nsteps = 2\nresolution = 32\nrank = 2\n')
    out = tmp_path / "f.safetensors"
    result = CliRunner().invoke(train_cli.main, ["--config", str(toml), "--rank", "3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    saved = (tmp_path / "f.config.toml").read_text()
    assert "rank = 3" in saved and "steps = 2" in saved
    assert files.read_header(out)[1]["ss_network_dim"] == "3"


@pytest.mark.slow
def test_two_processes_match_one(models, data, tmp_path):
    """accelerate launch with 2 CPU processes (gloo): each takes half of every batch; the adapter equals one
    process's on the same global batch. Tolerance: 3 AdamW steps at lr 1e-3 move a parameter by up to 3e-3; AdamW
    normalises every gradient element, so float summation-order noise in near-zero gradients shows up as ~2e-5. We
    allow 1e-4 (3% of a full update); a different batch split or unsynchronised gradients differ by ~1e-3."""
    import subprocess
    import sys

    common = ["--model", models["sd1"], "--data", str(data), "--steps", "3", "--resolution", "32", "--rank", "4",
              "--batch-size", "2", "--lr", "1e-3", "--save-dtype", "fp32"]  # fmt: skip
    cmd = [sys.executable, "-m", "lora_kit.cli.train", *common, "-o", str(tmp_path / "one.safetensors")]
    one = subprocess.run(cmd, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    env = dict(os.environ, ACCELERATE_USE_CPU="1")
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "-m",
         "lora_kit.cli.train", *common, "-o", str(tmp_path / "two.safetensors")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a, _ = files.load(tmp_path / "one.safetensors")
    b, _ = files.load(tmp_path / "two.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4, rtol=0) for k in a)
    assert "2 processes" in two.stderr  # the run really was data-parallel


def test_validation_grid_loss_log_and_manifest_masks(make_pipe, tmp_path, models):
    """A lora-ppim style manifest with a mask trains; validation grids are PNGs; the loss log has every step."""
    import json

    data = write_images(tmp_path / "ds", n=2)
    mask = Image.new("L", (40, 32), 0)
    mask.paste(255, (10, 8, 30, 24))
    mask.save(data / "img0_mask.png")
    lines = [
        {"image": "img0.png", "caption": "a photo of sks dog", "mask": "img0_mask.png", "source": "x", "width": 40,
         "height": 32, "sha256": "0"},
        {"image": "img1.png", "caption": "a photo of sks dog", "mask": None, "source": "y", "width": 40, "height": 32,
         "sha256": "1"},
    ]  # fmt: skip
    (data / "manifest.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    cfg = config(models, data, tmp_path, steps=2, validation_prompt="a photo of sks dog", validate_every=1,
                 logdir=str(tmp_path / "logs"))  # fmt: skip
    loop.train(cfg, pipe=make_pipe("sd1"))
    grids = sorted((tmp_path / "out-samples").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-1.png", "step-2.png"]
    assert Image.open(grids[0]).size == (64, 64)  # 2x2 samples of 32 px
    rows = (tmp_path / "logs" / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr" and [r.split(",")[0] for r in rows[1:]] == ["1", "2"]


def test_validation_samples_in_eval_mode_and_restores_every_module(make_pipe, models, data, tmp_path):
    """Samples with every adapter in eval mode (no dropout), in every component; afterwards each module is back in
    its own mode: the adapters training, the frozen models not."""
    from lora_kit.inject import lora_modules
    from lora_kit.state import components
    from lora_kit.train import callbacks, recipes

    pipe = make_pipe("sd1")
    cfg = config(models, data, tmp_path, rank=4, text_encoder_rank=2, dropout=0.5, validation_prompt="a dog",
                 validate_every=1, validation_steps=1)  # fmt: skip
    recipes.build(cfg, pipe)
    before = {m: m.training for c in components(pipe).values() for m in c.modules()}
    seen = []

    def record(module, args):
        seen.append(module.training or module.adapters[recipes.ADAPTER].training)

    for comp in components(pipe).values():
        next(lora_modules(comp))[1].register_forward_pre_hook(record)
    callbacks.Validation(cfg, n=1)(1, 0.0, {"pipe": pipe})
    assert len(seen) >= 2 and not any(seen)
    assert {m: m.training for c in components(pipe).values() for m in c.modules()} == before
    assert any(before.values()) and not all(before.values())


def test_ti_token_is_found_next_to_punctuation():
    """The token is a whole word wherever punctuation touches it (lora-ppim --token writes '<sks>, a dog'): it is
    expanded in place to its entries, never put in front a second time."""
    import random

    cfg = TrainConfig(model="toy", data="x", output="x.safetensors", mode="textual-inversion", token="<sks>",
                      num_vectors=2)  # fmt: skip
    batcher = loop.Batcher(cfg, None, [], None, cache_text=False)
    cases = {
        "<sks>, a dog on grass": "<sks> <sks>_1, a dog on grass",
        "a photo of <sks>.": "a photo of <sks> <sks>_1.",
        "a photo of <sks> dog": "a photo of <sks> <sks>_1 dog",
        "a dog": "<sks> <sks>_1 a dog",
    }
    assert {text: batcher.caption(text, random.Random(0)) for text in cases} == cases


def test_warmup_steps_warm_up_the_constant_schedule():
    """--warmup-steps with the default constant scheduler warms up as constant_with_warmup (diffusers' 'constant'
    ignores num_warmup_steps): after step 1 of 3 warmup steps the LR is lr / 3."""
    from lora_kit.train.config import TrainConfig

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    scheduler = loop.make_scheduler(TrainConfig(steps=2, warmup_steps=3, lr_scheduler="constant"), optimizer)
    seen = []
    for _ in range(2):
        optimizer.step(), scheduler.step()
        seen.append(optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([1e-3, 2e-3])


def test_train_twice_in_one_process_in_two_precisions(make_pipe, models, data, tmp_path):
    """accelerate's process-wide state would refuse the second precision ('AcceleratorState has already been
    initialized'); train() resets it, so a notebook can compare precisions."""
    for precision in ("bf16", "no"):
        (tmp_path / precision).mkdir()
        cfg = config(models, data, tmp_path / precision, steps=1, mixed_precision=precision)
        assert Path(cfg.output) in loop.train(cfg, pipe=make_pipe("sd1"))


def test_textual_inversion_trains_fp32_rows_in_a_bf16_model(make_pipe, models, data, tmp_path, monkeypatch):
    """--mixed-precision bf16 (fp16 alike, on a GPU): the new token rows train as an fp32 tensor, so updates far
    below a bf16 step still move every element, as in an fp32 run; the bf16 matrix's old rows stay bit-identical."""
    seen = {}
    real = loop.make_optimizer

    def spy(cfg, recipe):
        params = recipe.groups[0]["params"]
        seen[cfg.mixed_precision] = ({p.dtype for p in params}, params[0].detach()[-2:].float().clone())
        return real(cfg, recipe)

    monkeypatch.setattr(loop, "make_optimizer", spy)
    moves = {}
    for precision in ("no", "bf16"):
        pipe = make_pipe("sd1").to(torch.bfloat16 if precision == "bf16" else torch.float32)
        before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
        (tmp_path / precision).mkdir()
        cfg = config(models, data, tmp_path / precision, mode="textual-inversion", token="<sks>", init_token="dog",
                     num_vectors=2, steps=3, ti_lr=1e-4, max_grad_norm=0.0, mixed_precision=precision)  # fmt: skip
        loop.train(cfg, pipe=pipe)
        after = pipe.text_encoder.get_input_embeddings().weight.detach()
        assert after.dtype == before.dtype and torch.equal(after[: len(before)], before)
        trained = next(iter(files.load(cfg.output)[0].values()))
        assert seen[precision][0] == {torch.float32} and trained.dtype == torch.float32
        moves[precision] = trained - seen[precision][1]
    assert torch.count_nonzero(moves["bf16"]) == moves["bf16"].numel()
    # bf16 arithmetic in the forward and backward passes changes a few gradient signs (measured: 3% off on average)
    assert (moves["bf16"] - moves["no"]).abs().mean() < 0.2 * moves["no"].abs().mean()


def test_sdxl_time_ids_are_each_samples_original_size_and_crop(make_pipe, tmp_path):
    """SDXL's size conditioning as diffusers' SDXL trainer builds it: (original height, original width, crop top,
    crop left, target height, target width) per sample, the crop being where the bucket was cut from the resized
    image; a flip does not change them. Read from the UNet's forward."""
    from lora_kit.train.backbone import Backbone
    from lora_kit.train.data import Plan, scan

    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (50, 24), (200, 30, 30)).save(folder / "wide.png")  # bucket 48x24: 1 px cut on the left
    Image.new("RGB", (18, 36), (30, 200, 30)).save(folder / "tall.png")  # bucket 24x44, resized to 24x48: 2 px on top
    for name in ("wide", "tall"):
        (folder / f"{name}.txt").write_text("a photo")
    pipe = make_pipe("sdxl")
    backbone = Backbone(pipe)
    cfg = TrainConfig(model="x", data=str(folder), output=str(tmp_path / "o.safetensors"), resolution=32, flip=True)
    examples, _ = scan(folder)
    plan = Plan(examples, 1, 32, backbone.size_step, 0)
    by_name = {ex.image.stem: i for i, ex in enumerate(examples)}
    assert plan.sizes[by_name["wide"]] == (48, 24) and plan.sizes[by_name["tall"]] == (24, 44)
    batcher = loop.Batcher(cfg, backbone, examples, plan, cache_text=False)
    seen = []
    pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True
    )
    want = {"wide": [24.0, 50, 0, 1, 24, 48], "tall": [36.0, 18, 2, 0, 44, 24]}
    for name, ids in want.items():
        for key in range(4):  # flips drawn both ways over these steps
            with torch.no_grad():
                loop.per_sample_loss(cfg, backbone, batcher, batcher.batch([by_name[name]], [0], (key, 0)))
            torch.testing.assert_close(seen[-1].float(), torch.tensor([ids]))


def test_an_fp16_vae_that_must_upcast_encodes_in_fp32(make_pipe):
    """SDXL's VAE overflows in fp16 (config force_upcast): training encodes with it in fp32, as diffusers' pipelines
    and its SDXL trainer do, and leaves it in fp16 afterwards. The dtype is read from the encoder's forward."""
    from lora_kit.train.backbone import Backbone

    pipe = make_pipe("sdxl")
    pipe.vae.to(torch.float16)
    pipe.vae.register_to_config(force_upcast=True)
    seen = []
    pipe.vae.encoder.register_forward_pre_hook(lambda m, args: seen.append((args[0].dtype, m.conv_in.weight.dtype)))
    mean, std = Backbone(pipe).latent_dist(torch.zeros(1, 3, 16, 16))
    assert seen == [(torch.float32, torch.float32)]
    assert pipe.vae.dtype == torch.float16 and mean.isfinite().all() and std.isfinite().all()
