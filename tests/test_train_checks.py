"""lora-train computes what its options say, each checked so that it could fail (issue 30): the mask weights the
loss as CONTRACTS.md defines it, SD2 trains on v, the noise offset is a per-channel constant, gradient accumulation
equals the larger batch, caption shuffling keeps the first tags, caching changes nothing, pivotal tuning keeps the
LoRA frozen while the embeddings train alone, textual inversion and pivotal tuning resume bit-exactly, tensorboard
gets the logged values, adamw8bit trains with 8-bit states, and a missing optional package is refused first."""

import json
import platform
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import Stopped, assert_close_scaled, stop_after
from lora_kit.cli import train as train_cli
from PIL import Image
from test_train import config as train_config
from test_train import write_images

from lora_kit import LoraKitError
from lora_kit.formats import files
from lora_kit.inject import lora_modules
from lora_kit.state import components
from lora_kit.train import data as train_data
from lora_kit.train import loop
from lora_kit.train.backbone import Backbone

CAPTION = "sks dog, red, blue, green, on grass, photo"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("checks_data") / "images")


def config(data, tmp_path, arch="sd1", **kw):
    """test_train's config on a tiny pipeline passed to train() (the model is only named)."""
    return train_config({arch: f"tiny-{arch}"}, data, tmp_path, arch, **kw)


def adapters(pipe) -> dict[str, torch.Tensor]:
    """Every trained factor of a pipeline, by component and module path (copies)."""
    out = {}
    for comp, module in components(pipe).items():
        for path, wrapper in lora_modules(module):
            for name, t in wrapper.adapters["trained"].named_parameters():
                out[f"{comp}.{path}.{name}"] = t.detach().clone()
    return out


class FirstStep:
    """What the loop computed in its first step: the batch it drew, the loss it reported, and what the UNet saw and
    returned (read with hooks on the UNet, as CONTRACTS.md asks)."""

    def __init__(self, monkeypatch, pipe):
        self.batch = self.loss = self.unet_in = self.pred = None
        real = loop.Batcher.batch

        def spy(batcher, *args, **kwargs):
            out = real(batcher, *args, **kwargs)
            self.batch = self.batch or out
            return out

        monkeypatch.setattr(loop.Batcher, "batch", spy)

        def seen_in(module, args):
            self.unet_in = self.unet_in or (args[0].detach().clone(), args[1].clone())

        def seen_out(module, args, out):
            self.pred = self.pred if self.pred is not None else out[0].detach().clone()

        pipe.unet.register_forward_pre_hook(seen_in)
        pipe.unet.register_forward_hook(seen_out)

    def callback(self, step, loss, context):
        if step == 1:
            self.loss = torch.tensor(loss, dtype=torch.float64)


def one_image(folder: Path, n: int = 1, captions=("a photo of sks dog", "a red cat")) -> Path:
    """n 32x32 images (a coloured square left of centre, on grey: a flip changes them): each image's bucket at
    resolution 32 is the image itself, uncropped."""
    folder.mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (32, 32), (90, 90, 90))
        img.paste(Image.new("RGB", (14, 18), (220, 30 + 60 * i, 30)), (4 + 2 * i, 7))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(captions[i % len(captions)])
    return folder


def test_the_mask_weights_the_loss_as_contracts_say(make_pipe, tmp_path, monkeypatch):
    """The loss of a step on a masked image is the weighted mean of the squared error with weight floor + (1 -
    floor) * mask per latent pixel, the mask averaged over each latent pixel's 2x2 image pixels (computed here with
    numpy from the PNG); the same image without its mask gives the plain mean, another number."""
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[3:26, 5:21] = 255  # odd edges: latent pixels half inside get 0.5
    mask[26:29, 5:21] = 128
    floor, area = 0.25, (mask / 255.0).reshape(16, 2, 16, 2).mean(axis=(1, 3))  # the VAE halves each side
    weight = torch.from_numpy(floor + (1 - floor) * area)
    losses = {}
    for masked in (True, False):
        folder = one_image(tmp_path / f"ds-{masked}")
        if masked:
            Image.fromarray(mask).save(folder / "img0_mask.png")
            line = {"image": "img0.png", "caption": "a photo of sks dog", "mask": "img0_mask.png", "source": "x",
                    "width": 32, "height": 32, "sha256": "0"}  # fmt: skip
            (folder / "manifest.jsonl").write_text(json.dumps(line))
        pipe = make_pipe("sd1")
        seen = FirstStep(monkeypatch, pipe)
        loop.train(config(folder, folder.parent, steps=1, batch_size=1, mask_floor=floor, force=True),
                   callbacks=[seen.callback], pipe=pipe)  # fmt: skip
        err = (seen.pred.double() - seen.batch["noise"].double()).square()  # epsilon prediction: the target is noise
        weighted, plain = (err * weight).sum() / (weight.sum() * err.shape[1]), err.mean()
        assert_close_scaled(seen.loss, weighted if masked else plain, reduction=err.numel(), dtype=torch.float32)
        assert abs(weighted - plain) > 0.01 * plain  # this mask matters: the test could fail
        losses[masked] = seen.loss
    assert abs(losses[True] - losses[False]) > 0.01 * losses[False]


def test_sd2_trains_on_v(make_pipe, tmp_path, monkeypatch):
    """SD2 (v-prediction): the UNet sees x_t = alpha x0 + sigma eps and the loss is the mean squared distance to
    v = alpha eps - sigma x0, with alpha^2 = prod(1 - beta) over the scaled-linear schedule computed here in float64
    (not read from the scheduler); the distance to eps is another number."""
    folder = one_image(tmp_path / "ds")
    pipe = make_pipe("sd2")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    seen = FirstStep(monkeypatch, pipe)
    loop.train(config(folder, tmp_path, "sd2", steps=1, batch_size=1), callbacks=[seen.callback], pipe=pipe)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    t = int(seen.unet_in[1][0])
    abar = torch.cumprod(1 - betas, 0)[t]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x0, noise = seen.batch["x0"].double(), seen.batch["noise"].double()
    assert_close_scaled(seen.unet_in[0].double(), alpha * x0 + sigma * noise, reduction=2, dtype=torch.float32,
                        scale=x0.abs().max() + noise.abs().max())  # fmt: skip
    v = alpha * noise - sigma * x0
    err = (seen.pred.double() - v).square()
    assert_close_scaled(seen.loss, err.mean(), reduction=err.numel(), dtype=torch.float32)
    eps_loss = (seen.pred.double() - noise).square().mean()
    assert abs(seen.loss - eps_loss) > 0.01 * eps_loss


def test_noise_offset_is_a_per_channel_constant(make_pipe, data, tmp_path):
    """--noise-offset 0.1 adds 0.1 * N(0, 1) per sample and channel, the same over every pixel, to the noise the
    sample would draw without it; the epsilon target is that noise. (The offset is drawn from the sample's noise
    generator before its timestep, so the timesteps differ from a run without it.)"""
    backbone = Backbone(make_pipe("sd1"))
    examples, _ = train_data.scan(data)
    plan = train_data.Plan(examples, 1, 32, backbone.size_step, 0)
    batchers = {
        offset: loop.Batcher(config(data, tmp_path, noise_offset=offset), backbone, examples, plan, cache_text=False)
        for offset in (0.0, 0.1)
    }
    offsets = []
    for step in range(16):
        positions = [0, 1, 2, 3]
        plain, shifted = (batchers[o].batch([0, 1, 2, 3], positions, (step, 0)) for o in (0.0, 0.1))
        diff = shifted["noise"] - plain["noise"]
        const = diff[:, :, :1, :1]
        # n + c rounds once: within an ulp of the noise
        assert_close_scaled(diff, const.expand_as(diff), reduction=1, scale=plain["noise"].abs().max())
        assert torch.equal(shifted["x0"], plain["x0"])
        offsets.append(const.flatten() / 0.1)
        _, _, target = backbone.noising(shifted["x0"], shifted["noise"], shifted["timesteps"])
        assert torch.equal(target, shifted["noise"])
    z = torch.cat(offsets)  # 256 draws of N(0, 1): mean within 4 standard errors, std within 20%
    assert abs(z.mean()) < 4 / 16 and 0.8 < z.std() < 1.2, (z.mean(), z.std())


def test_gradient_accumulation_equals_the_larger_batch(make_pipe, tmp_path, monkeypatch):
    """grad_accum 2 of batch 1 takes the gradient of the mean loss of batch 2: with each sample's noise keyed the same
    (micro-batch m of the one run draws what position m of the other draws), the gradients at the optimizer step and
    the reported loss agree within float rounding (the UNet's forward and backward, a batch of one against two)."""
    folder = one_image(tmp_path / "ds")
    real_generator = loop.torch_generator
    monkeypatch.setattr(loop, "torch_generator", lambda seed, step, micro, pos, prior, k: real_generator(
        seed, step, micro + pos, prior, k))  # fmt: skip
    grads, losses = {}, {}

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            grads[name] = [p.grad.clone() for g in self.param_groups for p in g["params"]]
            return super().step(closure)

    monkeypatch.setattr(loop, "make_optimizer", lambda cfg, recipe: Recording(recipe.groups, lr=cfg.lr))
    pipe = None
    for name, batch, accum in (("accumulated", 1, 2), ("batch", 2, 1)):
        (tmp_path / name).mkdir()
        pipe = make_pipe("sd1")
        cfg = config(folder, tmp_path / name, steps=1, batch_size=batch, grad_accum=accum, max_grad_norm=0.0)
        loop.train(cfg, callbacks=[lambda step, loss, ctx, n=name: losses.__setitem__(n, torch.tensor(loss))],
                   pipe=pipe)  # fmt: skip
    scale = max(g.abs().max() for g in grads["batch"])
    assert scale > 0
    for a, b in zip(grads["accumulated"], grads["batch"], strict=True):
        assert_close_scaled(a, b, reduction=(pipe.unet, pipe.unet), scale=scale)
    assert_close_scaled(losses["accumulated"], losses["batch"], reduction=pipe.unet, dtype=torch.float32)


def test_shuffle_captions_keeps_the_first_tags(make_pipe, data, tmp_path):
    """--shuffle-captions shuffles the comma-separated tags after the first --keep-tokens, a new order per step and
    sample; without it the caption is as written."""
    backbone = Backbone(make_pipe("sd1"))
    folder = write_images(tmp_path / "tags", caption=CAPTION, n=2)
    examples, _ = train_data.scan(folder)
    plan = train_data.Plan(examples, 2, 32, backbone.size_step, 0)
    tags = [t.strip() for t in CAPTION.split(",")]
    for keep in (0, 1, 2):
        cfg = config(folder, tmp_path, shuffle_captions=True, keep_tokens=keep)
        batcher = loop.Batcher(cfg, backbone, examples, plan, cache_text=False)
        seen = [c for step in range(8) for c in batcher.batch([0, 1], [0, 1], (step, 0))["captions"]]
        orders = {tuple(t.strip() for t in c.split(",")) for c in seen}
        assert all(o[:keep] == tuple(tags[:keep]) and sorted(o) == sorted(tags) for o in orders), orders
        assert len(orders) > 8  # of 120 (or 24, 6) orders: 16 draws give many
        if keep == 0:
            assert {o[0] for o in orders} != {tags[0]}
    plain = loop.Batcher(config(folder, tmp_path), backbone, examples, plan, cache_text=False)
    assert plain.batch([0, 1], [0, 1], (0, 0))["captions"] == [CAPTION, CAPTION]
    assert plain.caption(CAPTION, random.Random(0)) == CAPTION


def test_caching_changes_nothing_but_the_vae_calls(make_pipe, tmp_path):
    """The latent and text-embedding caches: every image's latent distribution, flipped and not, and every caption's
    embedding are those computed afresh, the cache holding both orientations; the adapters trained with and without
    --no-cache are equal to the bit; with the cache the VAE encodes each image and orientation once, without it once
    per sample and step."""
    data = one_image(tmp_path / "ds", n=4)
    backbone = Backbone(make_pipe("sd1"))
    examples, _ = train_data.scan(data)
    plan = train_data.Plan(examples, 2, 32, backbone.size_step, 0)
    cached, fresh = (loop.Batcher(config(data, tmp_path, cache=c), backbone, examples, plan, cache_text=c)
                     for c in (True, False))  # fmt: skip
    for _ in range(2):  # computed, then read from the cache
        for i in range(len(examples)):
            for flip in (False, True):
                got, want = cached.latent_dist(i, flip), fresh.latent_dist(i, flip)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (i, flip)
            assert not torch.equal(fresh.latent_dist(i, False)[0], fresh.latent_dist(i, True)[0])  # could fail
        for captions in (["a photo of sks dog"], ["a red cat", "a photo of sks dog", "a red cat"]):
            got, want = cached.encode(captions), fresh.encode(captions)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert len(cached.latents) == 2 * len(examples) and len(cached.text) == 2 and not fresh.latents
    out, encodes = {}, {}
    for cache in (True, False):
        (tmp_path / str(cache)).mkdir()
        pipe = make_pipe("sd1")
        calls = []
        pipe.vae.encoder.register_forward_pre_hook(lambda m, args, calls=calls: calls.append(args[0].shape[0]))
        cfg = config(data, tmp_path / str(cache), steps=4, cache=cache, flip=True, save_dtype="fp32")
        loop.train(cfg, pipe=pipe)
        out[cache], encodes[cache] = files.load(cfg.output)[0], sum(calls)
    assert out[True].keys() == out[False].keys() and all(torch.equal(out[True][k], out[False][k]) for k in out[True])
    assert encodes[False] == 4 * 2  # steps x batch size
    assert encodes[True] < encodes[False] and encodes[True] <= 4 * 2  # 4 images, 2 orientations, each at most once


def test_pivotal_keeps_the_lora_frozen_while_the_embeddings_train_alone(make_pipe, data, tmp_path, monkeypatch):
    """--ti-steps 2: in steps 1-2 only the token rows move (every UNet and text-encoder adapter factor stays
    bit-identical, weight decay included); from step 3 the LoRA trains too."""
    start, after = {}, []
    real = loop.make_optimizer

    def snapshot_start(cfg, recipe):
        start.update(adapters(pipe))
        start["rows"] = torch.cat([r.param.detach().clone() for r in recipe.rows.values()])
        return real(cfg, recipe)

    def snapshot(step, loss, context):
        rows = context["pipe"].text_encoder.get_input_embeddings().weight.detach()[-2:].float().clone()
        after.append((adapters(context["pipe"]), rows))

    monkeypatch.setattr(loop, "make_optimizer", snapshot_start)
    pipe = make_pipe("sd1")
    cfg = config(data, tmp_path, mode="pivotal", token="<sks>", num_vectors=2, ti_steps=2, steps=3,
                 text_encoder_rank=2, instance_prompt=None)  # fmt: skip
    loop.train(cfg, callbacks=[snapshot], pipe=pipe)
    rows_start = start.pop("rows")
    assert any(k.startswith("unet.") for k in start) and any(k.startswith("text_encoder.") for k in start)
    previous = rows_start
    for step, (lora, rows) in enumerate(after, 1):
        assert not torch.equal(rows, previous), step  # the embeddings train in every step
        previous = rows
        frozen = [k for k in start if torch.equal(lora[k], start[k])]
        if step <= 2:
            assert frozen == list(start), step
        else:  # every up factor starts at zero and moves at once; the down factors get no gradient yet
            assert not any(k.endswith(".up") for k in frozen), step


@pytest.mark.parametrize(
    ("mode", "extra", "stop"),
    [("textual-inversion", dict(init_token="dog"), 2), ("pivotal", dict(ti_steps=2, text_encoder_rank=2), 1)],
    ids=["textual-inversion", "pivotal"],
)
def test_embedding_modes_resume_bit_exactly(make_pipe, data, tmp_path, mode, extra, stop):
    """Stopped and resumed == uninterrupted, bit for bit, every file (pivotal: the LoRA and its sidecar; stopped in
    the embeddings-only phase, so the resumed run must keep the LoRA frozen one more step). No warmup and no caption
    dropout: the rows move in every step before the stop (a dropped caption holds no token, so its step moves none),
    so a checkpoint that lost them could not resume to the same file."""
    common = dict(mode=mode, token="<sks>", num_vectors=2, steps=3, lr_scheduler="cosine", flip=True,
                  save_dtype="fp32", instance_prompt=None, **extra)  # fmt: skip
    (tmp_path / "a").mkdir()
    loop.train(config(data, tmp_path / "a", **common), pipe=make_pipe("sd1"))
    (tmp_path / "b").mkdir()
    with pytest.raises(Stopped):
        loop.train(
            config(data, tmp_path / "b", save_every=1, **common), callbacks=[stop_after(stop)], pipe=make_pipe("sd1")
        )
    torch.manual_seed(1234)  # whatever the global RNG holds when the resumed run starts
    loop.train(config(data, tmp_path / "b", save_every=1, resume="latest", **common), pipe=make_pipe("sd1"))
    names = ["out.safetensors"] + (["out.emb.safetensors"] if mode == "pivotal" else [])
    for name in names:
        a, _ = files.load(tmp_path / "a" / name)
        b, _ = files.load(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_tensorboard_gets_the_logged_loss_and_lr(make_pipe, data, tmp_path):
    """--logdir: tensorboard's event file holds the loss and learning rate of every step, the values of loss.csv."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "logs"
    loop.train(config(data, tmp_path, steps=2, warmup_steps=2, logdir=str(logdir)), pipe=make_pipe("sd1"))
    rows = [r.split(",") for r in (logdir / "loss.csv").read_text().splitlines()[1:]]
    events = EventAccumulator(str(logdir))
    events.Reload()
    for column, tag in ((1, "loss"), (2, "lr")):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in logged] == [1, 2]
        assert [v for _, v in logged] == pytest.approx([float(r[column]) for r in rows], rel=1e-5)  # CSV: 6 digits
    assert [float(r[2]) for r in rows] == pytest.approx([5e-4, 1e-3])  # the warmup: the values are the step's


def test_without_tensorboard_the_log_is_the_csv(make_pipe, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    logdir = tmp_path / "logs"
    loop.train(config(data, tmp_path, steps=1, logdir=str(logdir)), pipe=make_pipe("sd1"))
    assert sorted(p.name for p in logdir.iterdir()) == ["loss.csv"]


@pytest.mark.skipif(sys.platform == "darwin" and platform.machine() != "arm64", reason="no bitsandbytes wheel")
def test_adamw8bit_trains_with_8bit_states(make_pipe, data, tmp_path):
    """--optimizer adamw8bit: bitsandbytes' AdamW8bit, its states in 8 bits for factors of 4096 elements or more
    (bitsandbytes' min_8bit_size; 32 bits below), and its first step AdamW's (Adam's first step is lr * g / (|g| +
    eps) per element): measured equal to the bit where the states are 8-bit, within 4e-7 lr where they are 32-bit;
    the bound is 1e-4 lr, a hundredth of the 8-bit moments' quantisation error."""
    import bitsandbytes as bnb

    trained, kinds = {}, {}
    for optimizer in ("adamw", "adamw8bit"):
        (tmp_path / optimizer).mkdir()

        def grab(step, loss, context, optimizer=optimizer):
            inner = context["optimizer"].optimizer
            states = {p.numel(): s["state1"].dtype for p, s in inner.state.items() if "state1" in s}
            kinds[optimizer], trained[optimizer] = (type(inner), states), adapters(context["pipe"])

        cfg = config(data, tmp_path / optimizer, steps=1, rank=16, optimizer=optimizer, weight_decay=0.0)
        loop.train(cfg, callbacks=[grab], pipe=make_pipe("sd1"))
    assert kinds["adamw"][0] is torch.optim.AdamW
    kind, states = kinds["adamw8bit"]
    assert issubclass(kind, bnb.optim.AdamW8bit)
    assert {n for n, dtype in states.items() if dtype == torch.uint8} == {n for n in states if n >= 4096} != set()
    lr = 1e-3
    moved = 0
    for key, value in trained["adamw"].items():
        assert (trained["adamw8bit"][key] - value).abs().max() <= 1e-4 * lr, key
        moved += key.endswith(".up") and value.abs().min() > 0.1 * lr  # up starts at zero: one step is the update
    assert moved > 0


def test_a_missing_optional_package_is_refused_before_the_model_loads(data, tmp_path, monkeypatch):
    """--optimizer adamw8bit without bitsandbytes: one line, before the model opens or a class image is drawn."""
    import lora_kit.models

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError

    def never(*args, **kwargs):
        raise AssertionError("the model was opened")

    monkeypatch.setattr(lora_kit.models, "open_pipeline", never)
    cfg = config(data, tmp_path, mode="dreambooth", class_prompt="a photo of a dog", optimizer="adamw8bit")
    with pytest.raises(LoraKitError, match=r"^optimizer adamw8bit needs bitsandbytes \(pip install bitsandbytes\)$"):
        loop.train(cfg)
    out = tmp_path / "o.safetensors"
    flags = ["--model", "tiny-sd1", "--data", str(data), "--mode", "dreambooth", "--class-prompt", "a dog",
             "--optimizer", "adamw8bit", "-o", str(out)]  # fmt: skip
    result = CliRunner().invoke(train_cli.main, flags)
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    assert "needs bitsandbytes" in result.output
    assert not list(tmp_path.iterdir())  # no class folder, no output
