"""lora-train's optimizers beyond AdamW (prodigy, adafactor, schedulefree, lion8bit) and --ema: each optimizer
trains the adapter and resumes bit-exactly, the EMA written is the moving average of the per-step weights computed
by hand (and resumes bit-exactly, whatever the adapter kind), and a missing package or a bad decay is one line."""

import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import Stopped, stop_after
from lora_kit.cli import train as train_cli
from test_train import write_images
from test_train_checks import config

import lora_kit
from lora_kit import LoraKitError
from lora_kit.formats import files
from lora_kit.inject import lora_modules
from lora_kit.state import components, lora_state_dict
from lora_kit.train import adapters as train_adapters
from lora_kit.train import loop
from lora_kit.train.recipes import Recipe

OPTIMIZERS = {  # optimizer: (the class it builds, as "module.Class", its settings for a few tiny steps)
    "prodigy": ("prodigyopt.Prodigy", dict(lr=1.0)),
    "adafactor": ("transformers.optimization.Adafactor", dict(lr=1e-3)),
    "schedulefree": ("schedulefree.AdamWScheduleFree", dict(lr=1e-3)),
    "lion8bit": ("bitsandbytes.optim.Lion8bit", dict(lr=1e-4, rank=16)),  # rank 16: some states in 8 bits
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("optimizers_data") / "images")


def trained(pipe) -> dict[str, torch.Tensor]:
    """The adapter's tensors (canonical names, copies), alpha left out."""
    return {k: v for k, v in lora_state_dict(pipe, "trained").items() if not k.endswith("alpha")}


def run_and_resume(make_pipe, data, tmp_path, steps=4, callbacks=(), **kw):
    """`steps` steps in one go (a) and half of them, stopped, then resumed (b); returns both written files."""
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
    loop.train(config(data, tmp_path / "a", steps=steps, save_dtype="fp32", **kw), callbacks=list(callbacks),
               pipe=make_pipe("sd1"))  # fmt: skip
    half = dict(steps=steps, save_dtype="fp32", save_every=steps // 2, **kw)
    with pytest.raises(Stopped):
        loop.train(config(data, tmp_path / "b", **half), callbacks=[stop_after(steps // 2)], pipe=make_pipe("sd1"))
    torch.manual_seed(1234)  # (the resumed run sets every seed it needs)
    loop.train(config(data, tmp_path / "b", resume="latest", **half), pipe=make_pipe("sd1"))
    return files.load(tmp_path / "a" / "out.safetensors")[0], files.load(tmp_path / "b" / "out.safetensors")[0]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_optimizer_trains_and_resumes_bit_exact(make_pipe, data, tmp_path, optimizer):
    """Each optimizer is the package's class, moves every up factor off zero (they start there), and 2 steps +
    resume 2 == 4 steps in one go: the written tensors equal bit for bit (its state is in the checkpoint)."""
    path, settings = OPTIMIZERS[optimizer]
    module, name = path.rsplit(".", 1)
    kind = getattr(pytest.importorskip(module), name)
    seen = {}

    def grab(step, loss, context):
        seen[step] = (type(context["optimizer"].optimizer), trained(context["pipe"]))

    a, b = run_and_resume(make_pipe, data, tmp_path, callbacks=[grab], optimizer=optimizer, text_encoder_rank=2,
                          lr_scheduler="cosine", warmup_steps=1, **settings)  # fmt: skip
    assert all(issubclass(k, kind) for k, _ in seen.values())
    ups = [k for k in seen[2][1] if k.endswith("lora_up.weight")]  # (step 1 is the warmup's, at lr 0)
    assert ups and all(seen[2][1][k].abs().max() > 0 for k in ups)  # moved off zero
    assert any(not torch.equal(seen[4][1][k], seen[2][1][k]) for k in ups)  # and on
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_written(pipe, tensors: dict[str, torch.Tensor], tmp_path, output) -> None:
    """`output` holds `tensors` (canonical names) bit for bit: they go into the pipe's adapter, written as lora-train
    writes it."""
    with torch.no_grad():
        for comp, module in components(pipe).items():
            for path, wrapper in lora_modules(module):
                for suffix, t in train_adapters.trainable_tensors(wrapper.adapters["trained"]).items():
                    t.copy_(tensors[f"{comp}.{path}.{suffix}"])
    lora_kit.save(pipe, tmp_path / "hand.safetensors", name="trained", dtype=torch.float32, force=True)
    written, hand = files.load(output)[0], files.load(tmp_path / "hand.safetensors")[0]
    assert written.keys() == hand.keys() and all(torch.equal(written[k], hand[k]) for k in hand)


@pytest.mark.parametrize("adapter", ["lora", "loha"])
def test_ema_file_is_the_moving_average_of_the_steps(make_pipe, data, tmp_path, monkeypatch, adapter):
    """--ema 0.8 over 3 steps: the file holds 0.8 * average + 0.2 * weights after each step, from the initial
    weights, computed here in fp32 from the weights recorded before step 1 and after each step."""
    pipe, decay, weights = make_pipe("sd1"), 0.8, []
    real = Recipe.before_step

    def before(recipe, step):
        if step == 0:
            weights.append(trained(pipe))
        real(recipe, step)

    monkeypatch.setattr(Recipe, "before_step", before)
    cfg = config(data, tmp_path, steps=3, ema=decay, adapter=adapter, save_dtype="fp32")
    loop.train(cfg, callbacks=[lambda step, loss, context: weights.append(trained(pipe))], pipe=pipe)
    assert len(weights) == 4 and not torch.equal(*(weights[i][next(iter(weights[0]))] for i in (0, 3)))
    average = {k: v.float().clone() for k, v in weights[0].items()}
    for w in weights[1:]:
        for k, v in average.items():
            v.mul_(decay).add_(w[k].float(), alpha=1 - decay)
    assert_written(pipe, average, tmp_path, cfg.output)
    live = {k: v.float() for k, v in weights[-1].items()}
    assert any(not torch.equal(average[k], live[k]) for k in live)  # (the EMA is not the live weights)


@pytest.mark.parametrize("adapter", ["lora", "dora", "lokr"])
def test_ema_resumes_bit_exact(make_pipe, data, tmp_path, adapter):
    """Checkpoints hold the live weights and the EMA: 2 steps + resume 2 == 4 in one go, bit for bit."""
    a, b = run_and_resume(make_pipe, data, tmp_path, ema=0.7, adapter=adapter, text_encoder_rank=2, flip=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = torch.load(tmp_path / "b" / "out-checkpoints" / "step-2" / "optimizer.pt", weights_only=True)
    assert saved["ema"]["decay"] == 0.7 and saved["ema"]["average"]


@pytest.mark.parametrize("settings", [dict(ema=0.5), dict(optimizer="schedulefree")])
def test_validation_samples_use_the_weights_written(make_pipe, data, tmp_path, settings):
    """With --ema (or schedulefree) the validation samples are drawn with the weights the file gets (the EMA, the
    schedule-free average), and the live weights come back after, bit for bit."""
    pipe, seen, live = make_pipe("sd1"), [], []

    def sampling(module, args):
        if not torch.is_grad_enabled():
            seen.append(trained(pipe))

    pipe.unet.register_forward_pre_hook(sampling)
    cfg = config(data, tmp_path, steps=2, save_dtype="fp32", validation_prompt="a dog", validate_every=2,
                 validation_steps=1, **settings)  # fmt: skip
    loop.train(cfg, callbacks=[lambda step, loss, context: live.append(trained(pipe))], pipe=pipe)
    assert seen and all(s.keys() == seen[0].keys() and all(torch.equal(s[k], seen[0][k]) for k in s) for s in seen)
    assert (tmp_path / "out-samples" / "step-2.png").is_file()
    after = trained(pipe)
    assert all(torch.equal(after[k], live[-1][k]) for k in after)  # the live weights, back
    assert any(not torch.equal(seen[0][k], live[-1][k]) for k in after)
    assert_written(pipe, seen[0], tmp_path, cfg.output)


@pytest.mark.parametrize(("optimizer", "package"), [("prodigy", "prodigyopt"), ("schedulefree", "schedulefree"),
                                                    ("lion8bit", "bitsandbytes")])  # fmt: skip
def test_a_missing_optimizer_package_is_refused_before_the_model_loads(data, tmp_path, monkeypatch, optimizer,
                                                                       package):  # fmt: skip
    import lora_kit.models

    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError

    def never(*args, **kwargs):
        raise AssertionError("the model was opened")

    monkeypatch.setattr(lora_kit.models, "open_pipeline", never)
    with pytest.raises(LoraKitError, match=rf"^optimizer {optimizer} needs {package} \(pip install {package}\)$"):
        loop.train(config(data, tmp_path, optimizer=optimizer))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("flags", "message"), [
    (["--ema", "1.5"], "--ema is 1.5; it must be between 0 and 1"),
    (["--ema", "0"], "--ema is 0.0; it must be between 0 and 1"),
    (["--ema", "0.99", "--optimizer", "schedulefree"], "--ema is 0.99; schedulefree averages the weights itself"),
])  # fmt: skip
def test_bad_ema_is_one_line(data, tmp_path, flags, message):
    out = tmp_path / "o.safetensors"
    result = CliRunner().invoke(train_cli.main, ["--model", "tiny-sd1", "--data", str(data), "-o", str(out), *flags])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    assert message in result.output, result.output
    assert not list(tmp_path.iterdir())
