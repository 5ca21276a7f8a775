"""Quality benchmark on the toy world: does each trainer learn the held-out subject without breaking the base?

For each mode (lora, dreambooth, textual-inversion, pivotal) at one budget of steps, and for a peer row (the same
LoRA training done the diffusers+peft way: peft adapters on the same layers, same steps, learning rate, data and
noise schedule), the shipped judge reads generated samples:

- fidelity: share of "a {tok} circle on a {bg} background" samples it reads as the sks subject;
- prior: share of "a {colour} circle on a {bg} background" samples that stay a plain circle of that colour;
- compose: share of "a {tok} circle on a green background" samples with a green background.

Shares come with a 95% Wilson interval. The table is printed and written to bench/RESULTS.md; samples go beside it:
bench/toyworld-base.png (the base model on six fixed prompts, the README's strip) and bench/toyworld-modes.png (a
row per mode: 4 fidelity, 2 prior-preservation and 2 composability samples).

    python bench/quality.py                                             # the shipped toy-world base
    python bench/quality.py --quick                                     # a tiny random base, seconds (tests)
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import random
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "datasets" / "toyworld"))
import generate  # noqa: E402
import judge as judge_module  # noqa: E402

from bench import _results  # noqa: E402
from lora_kit.train.callbacks import grid  # noqa: E402

MODES = ("lora", "dreambooth", "textual-inversion", "pivotal", "peft")
BACKGROUNDS = [c for c in generate.COLOURS if c not in ("red", "white")]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def instance_data(folder: Path, n: int, word: str) -> Path:
    """n images of the held-out subject, captioned with `word` in place of the generator's 'sks'."""
    generate.write(folder, "subject", n, seed=7)
    for txt in folder.glob("*.txt"):
        txt.write_text(txt.read_text().replace(generate.SUBJECT["token"], word))
    (folder / "labels.jsonl").unlink()
    return folder


def peer_train(model: str, data: Path, out: Path, steps: int, rank: int, lr: float, resolution: int) -> None:
    """The diffusers+peft way: peft LoRA on the UNet's transformer-block linears, plain DDPM epsilon MSE, AdamW."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from lora_kit.inject import find_targets
    from lora_kit.train.data import Plan, load, scan

    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    targets = find_targets(pipe.unet, "kohya")  # the same layers lora_kit's default trains
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian"))
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    examples, _ = scan(data)
    plan = Plan(examples, 1, resolution, 8, seed=0)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        ex = examples[plan.batch(step)[0]]
        pixels, _ = load(ex, plan.sizes[plan.batch(step)[0]], False)
        with torch.no_grad():
            latents = pipe.vae.encode(pixels[None]).latent_dist.sample(g) * pipe.vae.config.scaling_factor
            ids = pipe.tokenizer([ex.caption], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids  # fmt: skip
            cond = pipe.text_encoder(ids).last_hidden_state
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g)
        pred = pipe.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    type(pipe).save_lora_weights(out.parent, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                 weight_name=out.name)  # fmt: skip


def render(pipe, prompts: list[str], steps: int, guidance: float, seed: int, chunk: int = 16) -> list:
    """One image per prompt, prompt i with seed + i, batched."""
    images = []
    for start in range(0, len(prompts), chunk):
        part = prompts[start : start + chunk]
        gens = [torch.Generator().manual_seed(seed + start + k) for k in range(len(part))]
        images += pipe(part, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
    return images


def sample_scores(pipe, judge, token: str, n: int, steps: int, guidance: float, seed: int = 0) -> tuple[dict, list]:
    """({metric: (hits, n)} for fidelity, prior and compose; a figure row: 4 fidelity, 2 prior, 2 compose samples)."""
    backgrounds = [BACKGROUNDS[i % len(BACKGROUNDS)] for i in range(n)]
    colours = [[c for c in generate.COLOURS if c != bg][i % 7] for i, bg in enumerate(backgrounds)]
    prompts = {
        "fidelity": [f"a {token} circle on a {bg} background" for bg in backgrounds],
        "prior": [f"a {colour} circle on a {bg} background" for colour, bg in zip(colours, backgrounds, strict=True)],
        "compose": [f"a {token} circle on a green background"] * n,
    }
    images = {name: render(pipe, p, steps, guidance, seed) for name, p in prompts.items()}
    readings = {name: judge.read(images[name]) for name in prompts}
    hits = {
        "fidelity": sum(r["kind"] == "subject" for r in readings["fidelity"]),
        "prior": sum(
            r["kind"] == "plain" and r["colour"] == colour and r["shape"] == "circle"
            for r, colour in zip(readings["prior"], colours, strict=True)
        ),
        "compose": sum(r["background"] == "green" for r in readings["compose"]),
    }
    return {k: (v, n) for k, v in hits.items()}, images["fidelity"][:4] + images["prior"][:2] + images["compose"][:2]


# the README's sample strip of the base model, seeds 0-5
STRIP = ["a red circle on a blue background", "a yellow square on a purple background",
         "a green triangle on a black background", "a white cross on a orange background",
         "a blue circle on a yellow background", "a black square on a white background"]  # fmt: skip


def base_scores(pipe, judge, n: int, steps: int, guidance: float, seed: int = 0) -> dict[str, tuple]:
    """(hits, n) of the base model on random prompts of its own world: shape, shape colour, background, all three."""
    r = random.Random(seed)
    specs = []
    for _ in range(n):
        colour = r.choice(list(generate.COLOURS))
        specs.append((r.choice(generate.SHAPES), colour, r.choice([c for c in generate.COLOURS if c != colour])))
    prompts = [f"a {colour} {shape} on a {bg} background" for shape, colour, bg in specs]
    hits = {"shape": 0, "colour": 0, "background": 0, "all": 0}
    readings = judge.read(render(pipe, prompts, steps, guidance, seed))
    for (shape, colour, bg), reading in zip(specs, readings, strict=True):
        ok = {"shape": reading["shape"] == shape, "colour": reading["colour"] == colour,
              "background": reading["background"] == bg}  # fmt: skip
        for key, value in ok.items():
            hits[key] += value
        hits["all"] += all(ok.values())
    return {k: (v, n) for k, v in hits.items()}


def run(model: str, modes, steps: int, samples: int, sample_steps: int, guidance: float, resolution: int,
        work: Path, log=print, lr: float = 1e-3) -> dict:  # fmt: skip
    from diffusers import StableDiffusionPipeline

    import lora_kit
    from lora_kit.train.config import TrainConfig
    from lora_kit.train.loop import train

    judge = judge_module.load(ROOT / "lora_kit" / "assets" / "toyworld" / "judge.safetensors")
    rows, figure = {}, []  # figure: one row of samples per mode
    for mode in modes:
        token = "<sks>" if mode in ("textual-inversion", "pivotal") else "sks"
        data = instance_data(work / f"data-{mode}", 5, token)
        out = work / f"{mode}.safetensors"
        if mode == "peft":
            peer_train(model, data, out, steps, 8, lr, resolution)
        else:
            cfg = TrainConfig(model=model, data=str(data), output=str(out), mode=mode, steps=steps, rank=8,
                              lr=lr, resolution=resolution, batch_size=1, token=token if "<" in token else None,
                              init_token="circle", ti_steps=steps // 3 if mode == "pivotal" else 0,
                              class_prompt="a circle on a blue background", num_class_images=10,
                              validation_steps=sample_steps, save_dtype="fp32")  # fmt: skip
            train(cfg)
        pipe = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        if mode == "peft":
            pipe.load_lora_weights(str(out))
        else:
            lora_kit.load(pipe, out)
        rows[mode], shown = sample_scores(pipe, judge, token, samples, sample_steps, guidance)
        figure.append(shown)
        log(f"{mode}: " + ", ".join(f"{k} {h}/{n}" for k, (h, n) in rows[mode].items()))
    return rows, figure


def share(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k}/{n} = {k / n:.0%} [{lo:.0%}, {hi:.0%}]"


def write_results(args, base: dict | None, rows: dict, path: Path) -> None:
    header = "## bench/quality.py" + (" (quick)" if args.quick else "")
    lines = [
        header,
        "",
        f"`python bench/quality.py{' --quick' if args.quick else ''}"
        f"{'' if args.modes == ','.join(MODES) else f' --modes {args.modes!r}'} --steps {args.steps} "
        f"--samples {args.samples} {'' if args.lr == 1e-3 else f'--lr {args.lr:g} '}"
        f"--base-samples {args.base_samples}` - {datetime.date.today()}, commit {_results.commit()}, "
        f"{platform.machine()}, torch {torch.__version__}, model {args.label}; {args.sample_steps} DDIM steps, "
        f"guidance {args.guidance}; shares with 95% Wilson intervals",
        "",
    ]
    if base:
        cells = " | ".join(share(*base[k]) for k in ("shape", "colour", "background", "all"))
        lines += [
            'The base model on random prompts of its world ("a {colour} {shape} on a {colour} background"), read by '
            "the judge:",
            "",
            "| shape | shape colour | background | all three |",
            "|---|---|---|---|",
            f"| {cells} |",
            "",
        ]
    if rows:
        lines += [f"Each mode at {args.steps} steps (rank 8, lr {args.lr:g}, 5 instance images):", "",
                  "| mode | fidelity | prior preservation | composability |", "|---|---|---|---|"]  # fmt: skip
        for mode, scores in rows.items():
            cells = " | ".join(share(*scores[name]) for name in ("fidelity", "prior", "compose"))
            lines.append(f"| {'diffusers+peft (peer)' if mode == 'peft' else mode} | {cells} |")
        lines.append("")
    _results.write_section(path, lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", help="toy-world base model folder (default: the shipped one)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--samples", type=int, default=48, help="samples per metric")
    parser.add_argument("--base-samples", type=int, default=128, help="samples of the base model alone (0: skip)")
    parser.add_argument("--sample-steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of every mode and of the peer")
    parser.add_argument("--quick", action="store_true", help="tiny random base, 2 steps, 1 sample (tests)")
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.quick:
            import pretrain

            args.model = str(pretrain.pretrain(work / "base", "tiny", "cpu", log=lambda _: None))
            args.label = "a tiny random base (the numbers mean nothing; this checks the benchmark runs)"
            args.steps, args.samples, args.sample_steps, args.base_samples = 2, 1, 2, 2
        if args.model == "toy":
            from lora_kit.models import toy_model

            args.model, args.label = toy_model(), "toy (the shipped lora_kit/assets/toyworld/model)"
        args.label = getattr(args, "label", args.model)
        base, strip = None, []
        if args.base_samples:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(args.model, dtype=torch.float32)
            pipe.set_progress_bar_config(disable=True)
            judge = judge_module.load(ROOT / "lora_kit" / "assets" / "toyworld" / "judge.safetensors")
            base = base_scores(pipe, judge, args.base_samples, args.sample_steps, args.guidance)
            strip = render(pipe, STRIP, args.sample_steps, args.guidance, seed=0)
            print("base: " + ", ".join(f"{k} {h}/{n}" for k, (h, n) in base.items()), flush=True)
        modes = [m for m in args.modes.split(",") if m]
        rows, figure = run(args.model, modes, args.steps, args.samples, args.sample_steps, args.guidance,
                           64, work, lr=args.lr)  # fmt: skip
    write_results(args, base, rows, Path(args.results))
    figures = Path(args.results).parent  # PNGs beside the results: bench/ unless --results says otherwise
    if strip:
        grid(strip, columns=len(strip)).save(figures / "toyworld-base.png")
    if figure:  # one row per mode: 4 fidelity, 2 prior preservation, 2 composability samples
        grid([image for row in figure for image in row], columns=len(figure[0])).save(figures / "toyworld-modes.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
