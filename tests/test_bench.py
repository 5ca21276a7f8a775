"""The benchmarks run end to end on a tiny budget, so they cannot rot."""

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import assert_close_scaled


def load(name: str):
    """bench/<name>.py as a module (the benchmarks are scripts, not package modules)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up by name
    spec.loader.exec_module(bench)
    return bench


def test_extract_bench_quick(tmp_path):
    bench = load("extract")
    results = tmp_path / "RESULTS.md"
    assert bench.main(["--quick", "--results", str(results)]) == 0
    text = results.read_text()
    assert "## bench/extract.py (quick)" in text and "error ratio" in text
    # a second run replaces its own section instead of appending a copy
    assert bench.main(["--quick", "--results", str(results)]) == 0
    assert results.read_text().count("## bench/extract.py (quick)") == 1


@pytest.mark.slow
def test_quality_bench_quick(tmp_path):
    """Every mode and the three diffusers peer rows train, sample and get judged on a tiny base."""
    bench = load("quality")
    results = tmp_path / "RESULTS.md"
    assert bench.main(["--quick", "--repeats", "2", "--results", str(results)]) == 0
    text = results.read_text()
    rows = [
        "| base model, no adapter (reference) |",
        "| lora |",
        "| dreambooth |",
        "| textual-inversion |",
        "| pivotal |",
    ]
    rows += ["| diffusers+peft LoRA", "| diffusers+peft DreamBooth", "| diffusers textual inversion"]  # the peers
    rows += ["| dreambooth, DoRA adapters", "| dreambooth, LoKr adapters"]  # other adapter kinds
    for row in rows:
        assert row in text
    assert "`python bench/quality.py --quick --repeats 2 --results " in text
    assert "seeds 0-1 pooled (2 runs per row)" in text
    # fidelity split by background: one sample per seed, on the first background, in each mode's row
    by_background = text[text.index("Subject fidelity on each background") :].splitlines()[4:14]
    assert [line.count("/2 |") for line in by_background] == [1] * 10
    modes = text[text.index("Each mode at") : text.index("Subject fidelity")].splitlines()
    totals = [line.split(" | ")[1].split(" = ")[0] for line in modes if line.count(" = ") == 4]
    assert [line.split(" | ")[1] for line in by_background] == totals  # the one sample's hit, counted alike
    from PIL import Image

    assert Image.open(tmp_path / "toyworld-base.png").size == (6 * 64, 64)  # the README strip, beside the results
    # a row per mode: fidelity, prior, coloured and composability samples (4 + 1 + 1 + 2 in a full run; 1 each
    # here)
    assert Image.open(tmp_path / "toyworld-modes.png").size == (4 * 64, 10 * 64)
    assert bench.wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-3)  # the Wilson upper bound for 0/10
    runs = [
        {"dreambooth": {"fidelity": (45, 48), "prior": (40, 48)}},
        {"dreambooth": {"fidelity": (40, 48), "prior": (46, 48)}},
    ]
    assert bench.pool(runs) == {"dreambooth": {"fidelity": (85, 96), "prior": (86, 96)}}


def test_quality_bench_quick_variants(tmp_path):
    """The DreamBooth rows with one setting changed (quantized base, --compile, EMA, each optimizer) train, sample
    and get judged when named."""
    bench = load("quality")
    results = tmp_path / "RESULTS.md"
    variants = [m for m in bench.MODES if m not in bench.DEFAULT_MODES]
    assert set(variants) <= set(bench.VARIANTS) and len(variants) == 8
    argv = ["--quick", "--modes", ",".join(variants), "--base-samples", "0", "--results", str(results)]
    assert bench.main(argv) == 0
    text = results.read_text()
    for mode in variants:
        assert f"| {bench.LABELS[mode]} |" in text, mode


def test_inference_bench_quick(tmp_path):
    bench = load("inference")
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## bench/inference.py\n\nthe full run's section stays\n")
    assert bench.main(["--quick", "--steps", "2", "--rounds", "1", "--results", str(results)]) == 0
    text = results.read_text()
    section = text[text.index("## bench/inference.py (quick)") :]
    for config in bench.CONFIGS:
        assert f"| {config} |" in section
    assert "`python bench/inference.py --quick --steps 2 --rounds 1`" in section and "scheduling overhead" in section
    assert "diffusers+peft" in section
    assert "the full run's section stays" in text
    # a second run replaces its own section instead of appending a copy
    assert bench.main(["--quick", "--steps", "2", "--rounds", "1", "--results", str(results)]) == 0
    assert results.read_text().count("## bench/inference.py (quick)") == 1
    assert "Layer by layer" in section  # (CPU runs only)
    routes = {r: float(section.split(f"| {r} | ")[1].split(" |")[0]) for r in bench.ROUTES}
    assert routes["the faster of the two"] <= min(routes["pair only"], routes["composed only"]) + 0.01  # (rounded)
    with pytest.raises(SystemExit) as exit_:  # an unknown compile mode: one line, exit 2, before any work
        bench.main(["--quick", "--compile", "fast", "--results", str(results)])
    assert exit_.value.code == 2


def test_quality_scores_read_each_metric_from_its_own_prompts():
    """sample_scores on a stand-in pipeline that draws each prompt's ground truth (the generator's picture), read by
    the shipped judge: a faithful model scores every metric in full; one that draws the subject for every circle
    prompt loses prior preservation and the coloured circles but keeps fidelity and composability."""
    from types import SimpleNamespace

    bench = load("quality")
    generate, judge = (
        bench.generate,
        bench.judge_module.load(bench.ROOT / "lora_kit/assets/toyworld/judge.safetensors"),
    )

    def pipe_drawing(leaky: bool):
        def pipe(prompts, **_):
            images = []
            for prompt in prompts:
                words = prompt.split(" ")
                bg = words[-2]
                if "sks" in words or leaky:
                    s = generate.Sample("circle", "red/white", bg, 32, 32, 18, "subject")
                elif words[1] in generate.COLOURS:
                    s = generate.Sample(words[2], words[1], bg, 32, 32, 18)
                else:  # the class alone: a colour the coloured prompts of that background never ask for
                    s = generate.Sample("circle", "white" if bg == "black" else "black", bg, 32, 32, 18)
                images.append(generate.render(s))
            return SimpleNamespace(images=images)

        return pipe

    n = 12
    scores, shown = bench.sample_scores(pipe_drawing(leaky=False), judge, "sks", n, steps=1, guidance=1.0)
    assert {k: scores[k] for k in ("fidelity", "prior", "coloured", "compose")} == dict.fromkeys(
        ("fidelity", "prior", "coloured", "compose"), (n, n)
    )
    assert all(scores[f"fidelity on {bg}"] == (2, 2) for bg in bench.BACKGROUNDS) and len(shown) == 8
    scores, _ = bench.sample_scores(pipe_drawing(leaky=True), judge, "sks", n, steps=1, guidance=1.0)
    assert [scores[k][0] for k in ("fidelity", "prior", "coloured", "compose")] == [n, 0, 0, n]


def test_quality_budget_gives_each_mode_its_text_encoder_rank(tmp_path):
    """Text-encoder LoRA for lora and DreamBooth (their peers alike), none for textual inversion or pivotal (whose
    embeddings carry the text side) unless asked; the loss weighting and initial factors reach lora-train's config."""
    bench = load("quality")

    def rank(budget, mode):
        token = "<sks>" if mode in ("textual-inversion", "pivotal") else "sks"
        return budget.config("toy", tmp_path, tmp_path / "o.safetensors", mode, token, tmp_path, 2).text_encoder_rank

    budget = bench.Budget()
    assert [rank(budget, m) for m in bench.MODES if m not in bench.PEERS and m not in bench.VARIANTS] == [4, 4, 0, 0]
    assert all(bench.VARIANTS[m][0] == "dreambooth" for m in bench.MODES if m in bench.VARIANTS)
    assert rank(bench.Budget(pivotal_text_encoder_rank=4, text_encoder_rank=2), "pivotal") == 4
    assert rank(bench.Budget(pivotal_text_encoder_rank=4, text_encoder_rank=2), "dreambooth") == 2
    assert [bench.Budget(steps=2000).config("toy", tmp_path, tmp_path / "o", m, "<sks>", tmp_path, 2).ti_steps
            for m in ("pivotal", "dreambooth", "textual-inversion")] == [400, 0, 0]  # fmt: skip
    assert bench.Budget(steps=2, pivotal_ti_share=0.2).ti_steps_of("pivotal") == 0  # the quick run: LoRA trains
    for share in ("1", "-0.1"):  # pivotal would never train its LoRA, or a negative count of steps
        with pytest.raises(SystemExit) as exit_:
            bench.main(["--pivotal-ti-share", share, "--results", str(tmp_path / "R.md")])
        assert exit_.value.code == 2 and not (tmp_path / "R.md").exists()
    cfg = bench.Budget(min_snr_gamma=5.0, init="gaussian").config(
        "toy", tmp_path, tmp_path / "o", "lora", "sks", tmp_path, 2
    )
    assert (cfg.min_snr_gamma, cfg.init) == (5.0, "gaussian")
    assert (
        bench.Budget(min_snr_gamma=0.0)
        .config("toy", tmp_path, tmp_path / "o", "lora", "sks", tmp_path, 2)
        .min_snr_gamma
        is None
    )


@pytest.mark.slow
def test_peer_training_is_reproducible_whatever_ran_before(tmp_path):
    """A peer row is a function of its seed alone: peft's initial factors come from the global generator, which the
    rows trained before it leave in another state."""
    bench = load("quality")  # (puts datasets/toyworld on the path)
    import pretrain
    import torch
    from safetensors.torch import load_file

    model = str(pretrain.pretrain(tmp_path / "base", "tiny", "cpu", log=lambda _: None))
    data = bench.instance_data(tmp_path / "data", 2, "sks")
    files = []
    for before in (1, 2):  # another global generator state before each run
        torch.manual_seed(before)
        files.append(tmp_path / f"peer-{before}.safetensors")
        bench.peer_train("peft", model, data, files[-1], 1, 2, 1e-3, 64, "sks", text_encoder_rank=2, seed=0)
    a, b = (load_file(str(f)) for f in files)
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_bench_quick_compares_like_with_like(tmp_path):
    """bench/train.py runs end to end; and its two configurations train the same thing: given the same factors,
    lora_kit's adapters and the peer's peft layers give the same loss and the same gradients."""
    import torch

    bench = load("train")
    results = tmp_path / "RESULTS.md"
    rows = "floor,lora_kit,diffusers+peft,int8"  # (the compiled row: test_compiled_train_row_quick)
    assert bench.main(["--quick", "--steps", "2", "--rows", rows, "--results", str(results)]) == 0
    text = results.read_text()
    assert "## bench/train.py (quick)" in text and "| lora_kit |" in text and "| diffusers+peft |" in text
    assert "| frozen floor |" in text and "| lora_kit int8 base |" in text and "frozen floor: **" in text

    args = bench.main.__globals__["argparse"].Namespace(quick=True, seed=0, gradient_checkpointing=False)
    unet = bench.build_unet(args, torch.device("cpu"), torch.float32)
    args.batch, args.latent_size = 2, unet.config.sample_size
    batch = bench.inputs(unet, args, torch.device("cpu"), torch.float32, 0)
    paths = bench.find_targets(unet, "attn")
    g = torch.Generator().manual_seed(1)
    factors, grads = {}, {}

    def factor(name: str) -> tuple[str, str]:  # (the layer's path, down or up) from either library's names
        layer = name.split(".adapters.")[0].split(".lora_")[0]
        return layer, "down" if name.endswith(".down") or ".lora_A." in name else "up"

    for config in bench.CONFIGS:
        with bench.adapted(unet, config, paths, rank=4) as params:
            named = {factor(n): p for n, p in unet.named_parameters() if p.requires_grad}
            assert len(named) == len(params) == 2 * len(paths)
            with torch.no_grad():  # the same factors in both
                for key, p in sorted(named.items()):
                    p.copy_(factors.setdefault(key, torch.randn(p.shape, generator=g) * 0.1))
            loss = bench.loss_of(unet, batch, torch.device("cpu"), autocast=False)
            loss.backward()
            grads[config] = (loss.item(), {key: p.grad.clone() for key, p in named.items()})
            unet.zero_grad(set_to_none=True)
    (loss_a, grads_a), (loss_b, grads_b) = grads["lora_kit"], grads["diffusers+peft"]
    assert grads_a.keys() == grads_b.keys()
    # the UNet's forward and backward, then the loss's mean and each gradient's sum over the batch's positions
    reduction = (unet, batch["noise"].numel())
    assert_close_scaled(torch.tensor(loss_a), torch.tensor(loss_b), reduction=reduction)
    for key, grad in grads_a.items():
        assert_close_scaled(grad, grads_b[key], reduction=reduction, msg=lambda m, key=key: f"{key}: {m}")


def test_train_bench_rows_leave_the_shared_weights_alone():
    """bench/train.py's rows train copies of the UNet that share its frozen weights: quantizing, wrapping or
    compiling a copy leaves the original UNet's weights and modules as they were."""
    import contextlib

    import torch

    bench = load("train")
    args = bench.main.__globals__["argparse"].Namespace(quick=True, seed=0, gradient_checkpointing=False,
                                                        rows=["floor", "int8", "compile", "offload"],
                                                        compile_backend="eager", offload_blocks=0)  # fmt: skip
    unet = bench.build_unet(args, torch.device("cpu"), torch.float32)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    layers = {n: type(m) for n, m in unet.named_modules()}
    with contextlib.ExitStack() as stack:
        rows, notes = bench.build_rows(args, unet, bench.find_targets(unet, "attn"), 4, torch.device("cpu"), stack)
        assert list(rows) == ["frozen floor", "lora_kit int8 base", "lora_kit --compile"] and len(notes) == 1
        copy_ = rows["lora_kit --compile"].unet
        assert copy_.conv_in.weight is unet.conv_in.weight  # (shared, not copied)
    assert {n: type(m) for n, m in unet.named_modules()} == layers
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())


def test_memory_bench_quick(tmp_path):
    """bench/memory.py's SDXL and FLUX rows run on the tiny models (the FLUX one with an int8 base and a block
    streamed), each writing its own section."""
    bench = load("memory")
    results = tmp_path / "RESULTS.md"
    assert bench.main(["--quick", "--arch", "sdxl", "--steps", "1", "--results", str(results)]) == 0
    assert bench.main(["--quick", "--arch", "flux", "--quantize", "int8", "--offload-blocks", "1", "--steps", "1",
                       "--results", str(results)]) == 0  # fmt: skip
    text = results.read_text()
    assert "## bench/memory.py (sdxl, quick, cpu)" in text
    assert "## bench/memory.py (flux, quick, cpu, int8, 1 blocks offloaded)" in text
    assert "linear layers int8" in text and "1 of 2 repeated blocks streamed" in text


@pytest.mark.slow
def test_e2e_bench_quick_trains_the_same_layers(tmp_path):
    """bench/e2e.py runs lora-train and the peer as whole processes (quick) and writes its section; both files hold
    adapters on the same UNet layers (read by lora_kit onto the toy pipeline)."""
    from diffusers import StableDiffusionPipeline

    from lora_kit.formats import read

    bench = load("e2e")
    results = tmp_path / "RESULTS.md"
    keep = tmp_path / "work"
    argv = ["--quick", "--steps", "1", "--batch", "1", "--images", "2", "--keep", str(keep), "--results", str(results)]
    assert bench.main(argv) == 0
    text = results.read_text()
    assert "## bench/e2e.py (quick)" in text and "| lora_kit |" in text and "| diffusers example |" in text
    pipe = StableDiffusionPipeline.from_pretrained(str(bench.TOY))
    ours, _ = read(keep / "lora_kit-0.safetensors", pipe)
    peer, _ = read(keep / "peer-0" / "pytorch_lora_weights.safetensors", pipe)
    assert {k for k in ours if k.endswith(".lora_down.weight")} == {k for k in peer if k.endswith(".lora_down.weight")}


@pytest.mark.slow
def test_compiled_train_row_quick(tmp_path):
    """bench/train.py's compiled row (regional compilation, aot_eager here: inductor's compile takes minutes)."""
    bench = load("train")
    results = tmp_path / "RESULTS.md"
    assert bench.main(["--quick", "--steps", "1", "--rows", "lora_kit,diffusers+peft,compile", "--compile-backend",
                       "aot_eager", "--results", str(results)]) == 0  # fmt: skip
    assert "| lora_kit --compile |" in results.read_text() and "blocks compiled (aot_eager)" in results.read_text()
