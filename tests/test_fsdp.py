"""Sharded training: `accelerate launch --config_file lora_kit/assets/accelerate/fsdp.yaml` with 2 CPU processes
(gloo) shards the UNet or transformer through accelerate's FSDP2, writes the adapter a one-process run writes (to
rounding), resumes bit-exactly from its own checkpoint, and refuses in one line what it does not cover."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_close_scaled, build_pipeline
from lora_kit.cli import train as train_cli
from test_train import write_images

from lora_kit import formats
from lora_kit.formats import files
from lora_kit.train import loop
from lora_kit.train.backbone import REPEATED_BLOCKS
from lora_kit.train.config import TrainConfig

CONFIG = Path(__file__).parents[1] / "lora_kit" / "assets" / "accelerate" / "fsdp.yaml"
STEPS, LR = 3, 1e-3
# FLUX.2 trains in bf16; dreambooth's class images are drawn before the model is sharded, its prior loss after
CASES = [("sd1", dict(resolution=32, mixed_precision="no")),
         ("flux", dict(resolution=16, mixed_precision="bf16", mode="dreambooth", class_prompt="a photo of a dog",
                       num_class_images=2))]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("fsdp_data") / "images")


def fsdp_train(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", "2",
           "-m", "lora_kit.cli.train", *args]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def losses(logdir: Path) -> torch.Tensor:
    rows = (logdir / "loss.csv").read_text().splitlines()[1:]
    return torch.tensor([float(r.split(",")[1]) for r in rows])


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "settings"), CASES, ids=[a for a, _ in CASES])
def test_two_sharded_processes_match_one_and_resume(make_pipe, data, tmp_path, arch, settings):
    """Each process takes half of every batch and holds half of each block, FSDP reduces the gradients; the adapter
    written equals one process's on the same global batches, and a run resumed from the step-2 checkpoint (written
    from the gathered tensors and optimizer state, and sharded again on loading) ends where the uninterrupted one
    did, to the bit. The sharded runs recompute their blocks (--gradient-checkpointing: the same sums again)."""
    model = tmp_path / arch
    build_pipeline(arch, str(tmp_path / f"tok_{arch}")).save_pretrained(model)
    common = ["--model", str(model), "--data", str(data), "--steps", str(STEPS), "--rank", "4", "--batch-size", "2",
              "--lr", str(LR), "--save-dtype", "fp32", "--save-every", "2", "--gradient-checkpointing"]  # fmt: skip
    for key, value in settings.items():
        common += [f"--{key.replace('_', '-')}", str(value)]
    one_cfg = TrainConfig(model=str(model), data=str(data), output=str(tmp_path / "one.safetensors"), steps=STEPS,
                          rank=4, batch_size=2, lr=LR, save_dtype="fp32", logdir=str(tmp_path / "one-logs"),
                          **settings)  # fmt: skip
    loop.train(one_cfg)
    out = tmp_path / "fsdp.safetensors"
    run = fsdp_train([*common, "--logdir", str(tmp_path / "fsdp-logs"), "-o", str(out)])
    pipe = make_pipe(arch)
    denoiser = pipe.components["unet" if arch == "sd1" else "transformer"]
    blocks = sum(type(m).__name__ in REPEATED_BLOCKS for m in denoiser.modules())
    found = re.search(r"in 2 processes, the (UNet|transformer) sharded by FSDP in (\d+) units", run.stderr)
    assert found and found[1] == ("UNet" if arch == "sd1" else "transformer"), run.stderr[-2000:]
    assert blocks and int(found[2]) >= blocks + 1  # each repeated block its own unit, and the rest of the model
    first = tmp_path / "first.safetensors"
    shutil.copy(out, first)
    fsdp_train([*common, "--resume", "latest", "--force", "-o", str(out)])

    one, sharded, resumed = (files.load(p)[0] for p in (tmp_path / "one.safetensors", first, out))
    assert sharded.keys() == one.keys() and all(sharded[k].shape == one[k].shape for k in one)
    assert all(torch.equal(resumed[k], sharded[k]) for k in sharded)
    checkpoint, _ = files.load(tmp_path / "fsdp-checkpoints" / "step-2" / "trainable.safetensors")
    last, _ = formats.read(first, pipe)  # (the canonical keys, as the checkpoint's)
    assert last.keys() == {k.removeprefix("lora.") for k in checkpoint}
    ups = [k for k in last if k.endswith("lora_up.weight")]
    assert ups and not any(torch.equal(last[k], checkpoint[f"lora.{k}"]) for k in ups)  # the last step's adapter
    # the forward and backward are the same sums in another order (half batches, then FSDP's reduce-scatter): in
    # fp32 the losses agree to rounding (loss.csv's 6 decimals lie well inside; bf16 kernels accumulate in fp32,
    # which assert_close_scaled does not model), and AdamW, which normalises every gradient element, can turn an
    # update anywhere within +-lr where the runs' gradients differ by rounding: the weights are held to 2 x lr a step
    if settings["mixed_precision"] == "no":
        assert_close_scaled(losses(tmp_path / "fsdp-logs"), losses(tmp_path / "one-logs"), reduction=denoiser)
    for key, want in one.items():
        torch.testing.assert_close(sharded[key], want, atol=2 * LR * STEPS, rtol=0, msg=key)


FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
REFUSED = [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, [], "DeepSpeed is not supported: lora-train shards through"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, [], "set fsdp_version: 2"),
    (FSDP2, ["--text-encoder-rank", "2"], "--text-encoder-rank is 2; under FSDP"),
    (FSDP2, ["--mode", "textual-inversion", "--token", "<sks>"], "token rows do not shard"),
    (FSDP2, ["--ema", "0.99"], "--ema is 0.99; under FSDP"),
    (FSDP2, ["--optimizer", "adafactor"], "it must be adamw"),
    (FSDP2, ["--offload-blocks", "2"], "--offload-blocks is 2; under FSDP"),
    (FSDP2, ["--quantize-base", "int8"], "quantized weights do not shard"),
]
IDS = ["deepspeed", "fsdp1", "text-encoder", "ti", "ema", "adafactor", "offload", "quantized"]


@pytest.mark.parametrize(("env", "args", "says"), REFUSED, ids=IDS)
def test_what_sharding_does_not_cover_is_refused_in_one_line(tmp_path, monkeypatch, env, args, says):
    """Before the model loads: exit 2, one line naming what to change (and the example config)."""
    data = write_images(tmp_path / "images", n=1)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(train_cli.main, ["--model", str(tmp_path / "nowhere"), "--data", str(data), "-o",
                                                 str(tmp_path / "out.safetensors"), *args])  # fmt: skip
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    assert says in result.output and not (tmp_path / "out.safetensors").exists()
