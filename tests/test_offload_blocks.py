"""lora-train --offload-blocks N: the blocks streamed in for their forward and backward train exactly the adapter that
resident blocks train (SD1's UNet, FLUX's transformer; with and without gradient checkpointing), and at no time
during a forward or a backward do more of the offloaded blocks hold their frozen tensors than allowed: one (the one
computing), two with prefetch (forced on here: it is CUDA's default). More blocks than the model has, or blocks
tied to tensors outside them, are refused in one line."""

from dataclasses import replace

import pytest
import torch
import torch._dynamo
from click.testing import CliRunner
from conftest import Stopped, build_pipeline, forward_main, main_model, stop_after
from test_train import write_images
from test_train_checks import config

from lora_kit.formats import files
from lora_kit.layers import LoraWrapper
from lora_kit.train import loop, offload_blocks
from lora_kit.train.backbone import Backbone
from lora_kit.train.config import ConfigError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("offload_data") / "images")


def resident(block) -> bool:
    """The block's frozen tensors hold their bytes (read from the storages, not from the offloader's books)."""
    tensors = offload_blocks.frozen_tensors(block)
    return all(t.untyped_storage().nbytes() > 0 for t in tensors)


class Probe:
    """Checks, before every layer of every repeated block runs forward and whenever a gradient reaches a layer's
    output in the backward, that the layer's block is resident, every block not offloaded is, and at most `allowed`
    offloaded blocks are."""

    def __init__(self, offload: offload_blocks.BlockOffload, backbone, allowed: int):
        self.offload, self.allowed, self.checks, self.seen = offload, allowed, 0, set()
        self.offloaded = [b.module for b in offload.blocks]
        self.blocks = backbone.repeated_blocks()
        self.handles = []
        for block in self.blocks:
            # (not on a wrapper's base layer: a hook there makes the wrapper call it instead of its op, unfused)
            bases = {id(m.base) for m in block.modules() if isinstance(m, LoraWrapper)}
            for layer in (m for m in block.modules() if id(m) not in bases):
                self.handles.append(layer.register_forward_pre_hook(lambda m, args, block=block: self.check(block)))
                self.handles.append(
                    layer.register_forward_hook(lambda m, a, out, block=block: self.on_output(block, out))
                )

    def on_output(self, block, out):
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda grad, block=block: self.check(block, backward=True))

    def check(self, block, backward: bool = False):
        self.checks += 1
        assert resident(block)
        assert all(resident(b) for b in self.blocks if not any(b is o for o in self.offloaded))
        loaded = [i for i, b in enumerate(self.offloaded) if resident(b)]
        assert len(loaded) <= self.allowed, loaded
        self.seen.add((backward, tuple(loaded)))


def train(make_pipe, data, folder, arch, monkeypatch=None, allowed=None, **kw):
    """Two steps; the adapter written, the pipeline, and the probe when `allowed` is given."""
    folder.mkdir()
    pipe = make_pipe(arch)
    probes = []
    if allowed is not None:
        start = offload_blocks.start

        def probed(cfg, backbone, batchers, device):
            offload = start(cfg, backbone, batchers, device)
            probes.append(Probe(offload.blocks, backbone, allowed))
            probes[-1].moved = offload.moved
            return offload

        monkeypatch.setattr(offload_blocks, "start", probed)
    cfg = config(data, folder, arch, steps=2, save_dtype="fp32", **kw)
    loop.train(cfg, pipe=pipe)
    return files.load(folder / "out.safetensors")[0], pipe, probes[0] if probes else None


CASES = [  # arch, N, gradient checkpointing, prefetch, other options (both runs)
    ("sd1", 5, False, False, {}),
    ("sd1", 5, True, True, {"adapter": "dora", "save_every": 1}),  # DoRA reads the base weight; a checkpoint mid-run
    ("flux", 1, True, False, {}),
    ("flux", 2, False, True, {}),
    ("flux", 2, False, False, {"compile": True}),  # the hooks run eagerly around each compiled block
    ("flux", 1, True, True, {"quantize_base": "nf4"}),  # torchao's tensor subclass: its inner tensors move
]


@pytest.mark.parametrize("arch, n, checkpointing, prefetch, options", CASES)
def test_offloaded_blocks_train_the_resident_adapter(make_pipe, data, tmp_path, monkeypatch, arch, n, checkpointing,
                                                      prefetch, options):  # fmt: skip
    monkeypatch.setattr(offload_blocks, "PREFETCH", prefetch)
    monkeypatch.setattr("lora_kit.train.backbone.COMPILE_OPTIONS", {"backend": "aot_eager"})  # (test_train_compile)
    kw = dict(gradient_checkpointing=checkpointing, **options)
    allowed = 2 if prefetch else 1
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):  # (--compile raises it)
        want, _, _ = train(make_pipe, data, tmp_path / "resident", arch, **kw)
        got, pipe, probe = train(make_pipe, data, tmp_path / "offloaded", arch, monkeypatch, allowed,
                                 offload_blocks=n, **kw)  # fmt: skip
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    offload = probe.offload
    assert len(offload.blocks) == n
    # streamed: every offloaded block came in once for each step's forward and once for its backward (prefetched or
    # not), and was seen parked by a layer of another block, in the forward and in the backward
    assert offload.loads == 2 * 2 * n
    assert probe.checks > 0
    for backward in (False, True):
        assert any(b == backward and len(loaded) < n for b, loaded in probe.seen), probe.seen
    # closed: every block resident again, and still after a forward (no hook left to park one)
    # the VAE and text encoders left the device once cached (on the CPU: already there), and came back
    encoders = [c for c in offload_blocks.TEXT_ENCODERS if getattr(pipe, c, None) is not None]
    assert probe.moved == ["vae", *encoders]
    for h in probe.handles:
        h.remove()
    blocks = Backbone(pipe).repeated_blocks()
    assert all(resident(b) for b in blocks)
    with torch.no_grad():
        forward_main(main_model(pipe))
    assert all(resident(b) for b in blocks)


def test_choice_and_release(make_pipe, data, tmp_path):
    """The N largest blocks (the later among equals), in module order; what leaves the device with the cache."""
    pipe = make_pipe("sd1")
    backbone = Backbone(pipe)
    pipe.unet.requires_grad_(False)  # (frozen bytes are what count, as training freezes the base)
    blocks = offload_blocks.offloadable(backbone)
    chosen = [name for name, _ in offload_blocks.choose(blocks, 3)]
    assert chosen == ["up_blocks.0.resnets.0", "up_blocks.0.resnets.1", "mid_block.resnets.1"], chosen
    flux = Backbone(make_pipe("flux"))
    flux.main.requires_grad_(False)
    flux = offload_blocks.offloadable(flux)
    assert [n for n, _ in offload_blocks.choose(flux, 1)] == ["transformer_blocks.0"]  # the double block: larger
    cfg = config(data, tmp_path, "sd1")
    batcher = loop.Batcher(cfg, backbone, [], None, cache_text=True)
    assert offload_blocks.releasable(cfg, batcher) == ["vae", "text_encoder"]
    for change in (dict(shuffle_captions=True), dict(cache=False), dict(validation_prompt="a dog", validate_every=1)):
        kept = offload_blocks.releasable(replace(cfg, **change), batcher)
        assert kept == ([] if "shuffle_captions" not in change else ["vae"]), change
    assert offload_blocks.releasable(cfg, loop.Batcher(cfg, backbone, [], None, cache_text=False)) == ["vae"]


def test_validation_streams_under_no_grad(make_pipe, data, tmp_path, monkeypatch):
    """Validation samples (the pipeline under no_grad) stream the blocks too, and keep the VAE and text encoder."""
    monkeypatch.setattr(offload_blocks, "PREFETCH", False)
    kw = dict(validation_prompt="a photo of sks dog", validate_every=2, validation_steps=1)
    _, pipe, probe = train(make_pipe, data, tmp_path / "run", "sd1", monkeypatch, 1, offload_blocks=12, **kw)
    assert list((tmp_path / "run" / "samples").glob("*.png")) or list((tmp_path / "run").rglob("*.png"))
    assert any(not backward for backward, _ in probe.seen)


def test_bad_n_and_tied_blocks_refused_in_one_line(make_pipe, data, tmp_path):
    backbone = Backbone(make_pipe("flux"))
    with pytest.raises(ConfigError, match=r"^offload_blocks is 3; it must be at most 2, the repeated blocks of this "
                       r"flux transformer$"):  # fmt: skip
        offload_blocks.check(3, backbone)
    main = backbone.main.requires_grad_(False)  # (frozen, as training leaves it)
    assert [name for name, _ in offload_blocks.check(1, backbone)] == ["transformer_blocks.0"]
    main.norm_out.linear.weight = main.transformer_blocks[0].norm1.linear.weight  # tied to a layer outside the block
    with pytest.raises(ConfigError, match=r"^offload_blocks is 1; it cannot offload blocks whose frozen tensors"):
        offload_blocks.check(1, backbone)
    from lora_kit.cli import train as train_cli

    model = tmp_path / "sd1"
    build_pipeline("sd1", str(tmp_path / "tok")).save_pretrained(model)
    out = tmp_path / "o.safetensors"
    flags = [
        "--model",
        str(model),
        "--data",
        str(data),
        "--offload-blocks",
        "13",
        "--resolution",
        "32",
        "-o",
        str(out),
    ]
    result = CliRunner().invoke(train_cli.main, flags)
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    assert "--offload-blocks is 13; it must be at most 12, the repeated blocks of this sd1 UNet" in result.output
    assert not out.exists()


def test_resumed_run_and_a_stopped_one(make_pipe, data, tmp_path, monkeypatch):
    """A run stopped after its first step's checkpoint leaves every block resident on the pipeline it was given, and
    resumed with another N (not in the fingerprint) it writes the adapter of an uninterrupted resident run."""
    monkeypatch.setattr(offload_blocks, "PREFETCH", False)
    want, _, _ = train(make_pipe, data, tmp_path / "resident", "sd1")
    (tmp_path / "resumed").mkdir()
    cfg = config(data, tmp_path / "resumed", "sd1", steps=2, save_dtype="fp32", save_every=1, offload_blocks=6)
    pipe = make_pipe("sd1")
    with pytest.raises(Stopped):
        loop.train(cfg, pipe=pipe, callbacks=[stop_after(1)])
    assert all(resident(b) for b in Backbone(pipe).repeated_blocks())
    loop.train(replace(cfg, resume="latest", offload_blocks=3), pipe=make_pipe("sd1"))
    got = files.load(tmp_path / "resumed" / "out.safetensors")[0]
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
