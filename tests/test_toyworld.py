"""The toy-world generator is deterministic and draws what its captions say."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "toyworld", Path(__file__).resolve().parents[1] / "datasets" / "toyworld" / "generate.py"
)
toy = importlib.util.module_from_spec(_spec)
sys.modules["toyworld"] = toy  # dataclasses look their module up while the class is created
_spec.loader.exec_module(toy)


def test_same_call_same_pixels_and_captions(tmp_path):
    a = toy.write(tmp_path / "a", "train", 6, seed=3)
    b = toy.write(tmp_path / "b", "train", 6, seed=3)
    for png in sorted(a.glob("*.png")):
        assert png.read_bytes() == (b / png.name).read_bytes()
        assert png.with_suffix(".txt").read_text() == (b / png.name).with_suffix(".txt").read_text()
    assert toy.sample("train", 0, 3) != toy.sample("train", 0, 4)


def test_pixels_match_the_caption():
    for i in range(40):
        s = toy.sample("train", i)
        px = np.asarray(toy.render(s))
        assert tuple(px[s.cy, s.cx]) == toy.COLOURS[s.colour]  # the centre is inside every shape
        assert tuple(px[0, 0]) == toy.COLOURS[s.background] and s.colour != s.background
        assert s.caption == f"a {s.colour} {s.shape} on a {s.background} background"


def test_held_out_concepts():
    s = toy.sample("subject", 0)
    px = np.asarray(toy.render(s))
    assert tuple(px[s.cy, s.cx - s.radius // 2]) == toy.COLOURS["red"]
    assert tuple(px[s.cy, s.cx + s.radius // 2]) == toy.COLOURS["white"]
    assert s.caption.startswith("a sks circle on a ")
    st = toy.sample("striped", 1)
    rows = np.asarray(toy.render(st))[:, st.cx]
    inside = [tuple(rows[y]) for y in range(st.cy - 4, st.cy + 5)]
    assert toy.COLOURS["white"] in inside or toy.COLOURS[st.colour] in inside
    assert "striped" in st.caption and st.colour not in st.caption
    # no pretraining caption mentions the held-out words
    assert not any("sks" in toy.sample("train", i).caption or "striped" in toy.sample("train", i).caption
                   for i in range(200))  # fmt: skip


def test_decoder_scenes_are_deterministic_and_hold_several_colours():
    a, b = toy.scene(5, seed=1), toy.scene(5, seed=1)
    assert a.tobytes() == b.tobytes() and a.tobytes() != toy.scene(6, seed=1).tobytes()
    palette = set(toy.COLOURS.values())
    for i in range(20):
        colours = {c for _, c in toy.scene(i).getcolors()}
        assert colours <= palette  # the palette only, hard edges
    assert sum(len(toy.scene(i).getcolors()) >= 3 for i in range(20)) >= 15  # mostly several shapes in view


def _pretrain_module():
    spec = importlib.util.spec_from_file_location(
        "toy_pretrain", Path(__file__).resolve().parents[1] / "datasets" / "toyworld" / "pretrain.py"
    )
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    return pretrain


def test_cosine_with_warm_restarts():
    lr = _pretrain_module().cosine_lr
    assert lr(1.0, 100, 0) == 1.0 and abs(lr(1.0, 100, 50) - 0.5) < 1e-12 and lr(1.0, 100, 99) < 1e-3
    restarts = ((60, 0.5),)
    assert lr(1.0, 100, 30, restarts) == lr(1.0, 60, 30)  # the first cycle is a cosine over its own length
    assert lr(1.0, 100, 60, restarts) == 0.5 and abs(lr(1.0, 100, 80, restarts) - 0.25) < 1e-12
    with pytest.raises(ValueError):
        lr(1.0, 100, 100)


def test_stages_take_the_value_of_the_last_begun_stage():
    value = _pretrain_module().stage_value
    stages = ((14000, 0.25), (16000, 0.5))  # the cpu recipe's colourless-caption shares
    assert [value(stages, s) for s in (0, 13999, 14000, 15999, 16000, 18999)] == [0.0, 0.0, 0.25, 0.25, 0.5, 0.5]
    assert value((), 5) == 0.0 and value((), 5, default=1.0) == 1.0


def test_pretraining_runs_end_to_end_and_loads(tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    pretrain = _pretrain_module()
    logs = []
    model = pretrain.pretrain(tmp_path / "toy", "tiny", "cpu", log=logs.append)
    assert any(line.startswith("unet 3/3") for line in logs)
    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32)
    # the real CLIP vocabulary: the same ids as openai/clip-vit-large-patch14
    assert pipe.tokenizer("a photo of a sks dog").input_ids == [49406, 320, 1125, 539, 320, 48136, 1929, 49407]
    image = pipe("a red circle on a blue background", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.size == (64, 64)
    # trainers encode with latent_dist.sample(): the shipped posterior is its mean (the latents the UNet learned)
    posterior = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist
    assert posterior.std.max() < 1e-5
    # resumable: a second run finds the finished stages and only re-assembles the pipeline
    again = pretrain.pretrain(tmp_path / "toy", "tiny", "cpu", log=logs.append)
    assert again == model
    # continued from the saved folder at its last step: the same weights come out (nothing left to train) ...
    same = pretrain.pretrain(tmp_path / "same", "tiny", "cpu", log=logs.append, init=model, init_step=3)
    assert not any(line.startswith("unet ") for line in logs[logs.index(f"started {tmp_path / 'same' / 'work'} "
                                                                        f"from {model} at UNet step 3"):])  # fmt: skip
    for part in ("unet", "text_encoder", "vae"):
        ours = getattr(StableDiffusionPipeline.from_pretrained(same), part).state_dict()
        theirs = getattr(StableDiffusionPipeline.from_pretrained(model), part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # ... and from an earlier step the recipe's last steps (the colourless-caption ones here) train it further
    later = pretrain.pretrain(tmp_path / "later", "tiny", "cpu", log=logs.append, init=model, init_step=1)
    assert logs[-2].startswith("unet 3/3")
    ours = StableDiffusionPipeline.from_pretrained(later).unet.state_dict()
    assert not all(torch.equal(ours[k], v) for k, v in pipe.unet.to(torch.float16).state_dict().items())


def test_pretraining_from_a_bad_init_folder_says_so_and_leaves_nothing(tmp_path, capsys):
    from lora_kit.models import toy_model

    pretrain = _pretrain_module()
    out = tmp_path / "out"
    cases = [(tmp_path / "missing", "0", "not a diffusers pipeline folder"),
             (toy_model(), "99", "--init-step 99: the recipe has 3 UNet steps"),
             (toy_model(), "0", "does not fit this recipe's model")]  # fmt: skip
    for init, step, message in cases:  # the shipped model is the cpu recipe's, wider than the tiny one
        assert pretrain.main([str(out), "--recipe", "tiny", "--init", str(init), "--init-step", step]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
        assert not out.exists()


def test_colourless_captions_name_the_class_alone():
    assert toy.colourless("a red circle on a blue background") == "a circle on a blue background"
    assert toy.colourless("a white cross on a black background") == "a cross on a black background"
    for kept in ("a sks circle on a blue background", "a striped square on a green background", ""):
        assert toy.colourless(kept) == kept


def _judge_module():
    spec = importlib.util.spec_from_file_location(
        "toy_judge", Path(__file__).resolve().parents[1] / "datasets" / "toyworld" / "judge.py"
    )
    judge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(judge)
    return judge


def test_judge_trains_and_reads(tmp_path):
    judge = _judge_module()
    path = judge.train(tmp_path / "j.safetensors", steps=3, batch_size=8, log=lambda _: None)
    model = judge.load(path)
    s = toy.sample("train", 0)
    (reading,) = model.read([toy.render(s)])
    assert set(reading) == {"shape", "colour", "background", "kind"}
    assert judge.labels(s)["shape"] == judge.HEADS["shape"].index(s.shape)


def test_shipped_judge_accuracy():
    """The judge shipped with lora_kit reads held-out generator images (blurred and noised) correctly."""
    judge = _judge_module()
    shipped = Path(__file__).resolve().parents[1] / "lora_kit" / "assets" / "toyworld" / "judge.safetensors"
    accuracy = judge.accuracy(judge.load(shipped), n=256)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_shipped_model_loads_generates_64px_and_stays_small():
    import torch

    import lora_kit

    folder = Path(lora_kit.toy_model())
    weights = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    assert 1e6 < weights < 30e6  # committed fp16 weights, well under the 30 MB the issue allows
    pipe = lora_kit.open_pipeline("toy", dtype=torch.float32)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and len(pipe.tokenizer) == 49408  # real CLIP vocab
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a blue background", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.size == (64, 64)
