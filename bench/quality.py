"""Quality benchmark on the toy world: does each trainer learn the held-out subject without breaking the base?

For each mode (lora, dreambooth, textual-inversion, pivotal) at one budget (steps, learning rates, rank, targets),
and for peer rows trained the way diffusers' examples do it on the same data, steps and learning rate (peft LoRA for
lora, peft LoRA with the prior loss on the same class images for dreambooth, diffusers-style textual inversion), the
shipped judge reads generated samples:

- fidelity: share of "a {tok} circle on a {bg} background" samples it reads as the sks subject (in all, and on each
  background: a second table shows where the subject is lost);
- prior: share of class-prompt samples ("a circle on a {bg} background", DreamBooth's class prompt) that stay a plain
  circle on that background, not the subject;
- coloured: share of "a {colour} circle on a {bg} background" samples that stay a plain circle of that colour: the
  neighbouring prompts, which the class images do not hold (where the subject leaks, or language drifts);
- compose: share of "a {tok} circle on a green background" samples with a green background.

Shares come with a 95% Wilson interval. The table is printed and written to bench/RESULTS.md; samples go beside it:
bench/toyworld-base.png (the base model on six fixed prompts, the README's strip) and bench/toyworld-modes.png (a
row per mode, the base model first: 4 fidelity, 1 prior-preservation, 1 coloured and 2 composability samples).

    python bench/quality.py                                             # the shipped toy-world base
    python bench/quality.py --repeats 3                                 # seeds 0-2 pooled (3x the time)
    python bench/quality.py --modes dreambooth --prior-target images    # one mode, one budget setting changed
    python bench/quality.py --quick                                     # a tiny random base, seconds (tests)
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import random
import shlex
import sys
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "datasets" / "toyworld"))
import generate  # noqa: E402
import judge as judge_module  # noqa: E402

from bench import _results  # noqa: E402
from lora_kit.train.callbacks import grid  # noqa: E402

MODES = (
    "lora",
    "dreambooth",
    "textual-inversion",
    "pivotal",
    "peft",
    "peft-dreambooth",
    "diffusers-ti",
    "dora-dreambooth",
    "lokr-dreambooth",
    "int8-dreambooth",
    "nf4-dreambooth",
    "compile-dreambooth",
    "ema-dreambooth",
    "prodigy-dreambooth",
    "adafactor-dreambooth",
    "schedulefree-dreambooth",
    "lion8bit-dreambooth",
)
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


INIT_WORD = "circle"  # the subject's class: new tokens start from its embedding
# DreamBooth's class prompt, as its paper writes it: the class alone ("a circle", any colour; the base learned such
# captions, see datasets/toyworld/pretrain.py's colourless stage), on every background
CLASS_PROMPTS = "|".join(f"a circle on a {bg} background" for bg in generate.COLOURS)
PEERS = {"peft": "lora", "peft-dreambooth": "dreambooth", "diffusers-ti": "textual-inversion"}  # peer -> its mode
DEFAULT_MODES = MODES[:9]  # the four modes, their peers, DoRA and LoKr; the rest, one setting changed, when named
# the same DreamBooth with one lora-train setting changed -> (mode, the settings). Prodigy finds its own step size
# (its authors' lr 1); Lion's updates are sign-sized, so it takes a third of AdamW's lr (its authors: 3-10x smaller)
VARIANTS = {
    "dora-dreambooth": ("dreambooth", {"adapter": "dora"}),
    "lokr-dreambooth": ("dreambooth", {"adapter": "lokr"}),
    "int8-dreambooth": ("dreambooth", {"quantize_base": "int8", "quantize_text_encoders": "int8"}),
    "nf4-dreambooth": ("dreambooth", {"quantize_base": "nf4", "quantize_text_encoders": "nf4"}),
    "compile-dreambooth": ("dreambooth", {"compile": True}),
    "ema-dreambooth": ("dreambooth", {"ema": 0.999}),
    "prodigy-dreambooth": ("dreambooth", {"optimizer": "prodigy", "lr": 1.0}),
    "adafactor-dreambooth": ("dreambooth", {"optimizer": "adafactor"}),
    "schedulefree-dreambooth": ("dreambooth", {"optimizer": "schedulefree"}),
    "lion8bit-dreambooth": ("dreambooth", {"optimizer": "lion8bit", "lr-third": True}),
}


def peer_train(kind: str, model: str, data: Path, out: Path, steps: int, rank: int, lr: float, resolution: int,
               token: str, targets: str = "kohya", class_cfg=None, batch_size: int = 1,
               text_encoder_rank: int = 0, seed: int = 0, min_snr_gamma: float = 0.0) -> None:  # fmt: skip
    """The diffusers way, written as its training examples do it: plain DDPM epsilon MSE, AdamW, `batch_size`
    instance images per step (and as many class images with the prior loss).

    peft: peft LoRA on the layers of lora_kit's `targets` preset (train_text_to_image_lora); peft-dreambooth: the
    same plus a class image per step and the prior loss (train_dreambooth_lora), on lora_kit's class images; with
    `text_encoder_rank`, both also train peft LoRA on the text encoder's attention (--train_text_encoder); with
    `min_snr_gamma`, each sample's loss is weighted min(snr, gamma) / snr (--snr_gamma, diffusers' compute_snr);
    diffusers-ti: a new token whose embedding row alone trains, every other row put back after each step
    (textual_inversion.py), saved as learned_embeds for `load_textual_inversion`."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.training_utils import compute_snr
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from lora_kit.inject import find_targets
    from lora_kit.train.data import Plan, load, scan
    from lora_kit.train.prior import class_examples

    torch.manual_seed(seed)  # peft draws its initial factors from the global generator (diffusers' scripts: set_seed)
    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    if kind == "diffusers-ti":
        pipe.tokenizer.add_tokens([token])
        pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
        emb = pipe.text_encoder.get_input_embeddings().weight
        new = pipe.tokenizer.convert_tokens_to_ids(token)
        with torch.no_grad():
            emb[new] = emb[pipe.tokenizer(INIT_WORD, add_special_tokens=False).input_ids].mean(0)
        original = emb.detach().clone()
        emb.requires_grad_(True)
        params = [emb]
    else:
        layers = find_targets(pipe.unet, targets)  # the same layers lora_kit trains
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=layers, init_lora_weights="gaussian")
        pipe.unet.add_adapter(config)
        if text_encoder_rank:
            te_config = LoraConfig(r=text_encoder_rank, lora_alpha=text_encoder_rank, init_lora_weights="gaussian",
                                   target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])  # fmt: skip
            pipe.text_encoder.add_adapter(te_config)
        params = [p for m in (pipe.unet, pipe.text_encoder) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    sets = [scan(data)[0]]
    if kind == "peft-dreambooth":
        sets.append(class_examples(class_cfg, pipe, Accelerator(cpu=True)))
    plans = [Plan(examples, batch_size, resolution, 8, seed=seed + i) for i, examples in enumerate(sets)]
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        loss = 0.0
        for k, (examples, plan) in enumerate(zip(sets, plans, strict=True)):  # instance images, then class images
            batch = plan.batch(step)
            pixels = torch.stack([load(examples[i], plan.sizes[i], False)[0] for i in batch])
            with torch.no_grad():
                latents = pipe.vae.encode(pixels).latent_dist.sample(g) * pipe.vae.config.scaling_factor
            tokens = pipe.tokenizer([examples[i].caption for i in batch], padding="max_length", truncation=True,
                                    max_length=pipe.tokenizer.model_max_length, return_tensors="pt")  # fmt: skip
            with torch.set_grad_enabled(kind == "diffusers-ti" or bool(text_encoder_rank)):
                cond = pipe.text_encoder(tokens.input_ids).last_hidden_state
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, sched.config.num_train_timesteps, (len(batch),), generator=g)
            pred = pipe.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
            weight = class_cfg.prior_loss_weight if k else 1.0  # the prior loss, as train_dreambooth_lora weighs it
            if min_snr_gamma:  # the scripts' --snr_gamma: per-sample losses weighted, then averaged
                snr = compute_snr(sched, t)
                per_sample = torch.nn.functional.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))
                mse = (per_sample * torch.clamp(snr, max=min_snr_gamma) / snr).mean()
            else:
                mse = torch.nn.functional.mse_loss(pred, noise)
            loss = loss + weight * mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if kind == "diffusers-ti":
            with torch.no_grad():
                keep = torch.arange(len(original)) != new
                emb[keep] = original[keep]
    if kind == "diffusers-ti":
        save_file({token: emb.detach()[new].clone()[None]}, str(out))
    else:
        te = {"text_encoder_lora_layers": get_peft_model_state_dict(pipe.text_encoder)} if text_encoder_rank else {}
        type(pipe).save_lora_weights(out.parent, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                     weight_name=out.name, **te)  # fmt: skip


def render(pipe, prompts: list[str], steps: int, guidance: float, seed: int, chunk: int = 16) -> list:
    """One image per prompt, prompt i with seed + i, batched."""
    images = []
    for start in range(0, len(prompts), chunk):
        part = prompts[start : start + chunk]
        gens = [torch.Generator().manual_seed(seed + start + k) for k in range(len(part))]
        images += pipe(part, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
    return images


def sample_scores(pipe, judge, token: str, n: int, steps: int, guidance: float, seed: int = 0) -> tuple[dict, list]:
    """({metric: (hits, n)} for fidelity, prior, compose and 'fidelity on {background}' for each background; a figure
    row: 4 fidelity, 1 prior, 1 coloured, 2 compose samples)."""
    backgrounds = [BACKGROUNDS[i % len(BACKGROUNDS)] for i in range(n)]
    colours = [[c for c in generate.COLOURS if c != bg][i % 7] for i, bg in enumerate(backgrounds)]
    prompts = {
        "fidelity": [f"a {token} circle on a {bg} background" for bg in backgrounds],
        "prior": [f"a circle on a {bg} background" for bg in backgrounds],
        "coloured": [f"a {c} circle on a {bg} background" for c, bg in zip(colours, backgrounds, strict=True)],
        "compose": [f"a {token} circle on a green background"] * n,
    }
    images = {name: render(pipe, p, steps, guidance, seed) for name, p in prompts.items()}
    readings = {name: judge.read(images[name]) for name in prompts}
    subject = [r["kind"] == "subject" for r in readings["fidelity"]]
    hits = {
        "fidelity": sum(subject),
        "prior": sum(
            r["kind"] == "plain" and r["shape"] == "circle" and r["background"] == bg
            for r, bg in zip(readings["prior"], backgrounds, strict=True)
        ),
        "coloured": sum(
            r["kind"] == "plain" and r["colour"] == colour and r["shape"] == "circle"
            for r, colour in zip(readings["coloured"], colours, strict=True)
        ),
        "compose": sum(r["background"] == "green" for r in readings["compose"]),
    }
    scores = {k: (v, n) for k, v in hits.items()}
    for bg in BACKGROUNDS:  # fidelity on each background: where the subject is lost
        asked = [hit for hit, b in zip(subject, backgrounds, strict=True) if b == bg]
        scores[f"fidelity on {bg}"] = (sum(asked), len(asked))
    return scores, images["fidelity"][:4] + images["prior"][:1] + images["coloured"][:1] + images["compose"][:2]


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


@dataclass
class Budget:
    """What every mode trains with (and its peer, where the peer has the setting)."""

    steps: int = 2000
    lr: float = 1e-3
    rank: int = 8
    targets: str = "kohya"
    batch_size: int = 8
    ti_lr: float = 2e-2
    instance_images: int = 10
    class_prompt: str = CLASS_PROMPTS
    num_class_images: int = 24
    class_guidance: float = 4.0
    prior_loss_weight: float = 1.0
    prior_target: str = "base"  # lora-train's --prior-target (the peer DreamBooth keeps diffusers' noise target)
    text_encoder_rank: int = 4  # LoRA on the text encoder's attention too (lora, dreambooth), peers alike
    # pivotal's own: its embeddings carry the text side; a text-encoder LoRA besides moved the background words
    # (rank 4 -> 0, seed 0: subject 37 -> 43 of 48, class prompt kept 36 -> 41; see RESULTS.md)
    pivotal_text_encoder_rank: int = 0
    # pivotal's embeddings alone before the LoRA joins, as a share of the steps (lora-train's --ti-steps). Seeds 0-2
    # (Min-SNR 5), subject / class kept of 144: a tenth 129/128, a fifth 134/131 (see RESULTS.md)
    pivotal_ti_share: float = 0.2
    # Min-SNR loss weights (lora-train --min-snr-gamma, the scripts' --snr_gamma); 0: plain MSE. Seeds 0-2, DreamBooth:
    # subject 121 -> 130 of 144, class prompt kept 130 -> 134 (see RESULTS.md)
    min_snr_gamma: float = 5.0
    init: str = "kaiming"  # lora-train's --init (the peers: peft's gaussian, as the diffusers scripts)
    seed: int = 0  # every random choice of the training runs (class images, batches, noise), peers alike

    def text_encoder_rank_of(self, mode: str) -> int:
        return {"textual-inversion": 0, "pivotal": self.pivotal_text_encoder_rank}.get(mode, self.text_encoder_rank)

    def ti_steps_of(self, mode: str) -> int:
        return int(self.steps * self.pivotal_ti_share) if mode == "pivotal" else 0

    def config(self, model: str, data: Path, out: Path, mode: str, token: str, class_data: Path, sample_steps: int):
        from lora_kit.train.config import TrainConfig

        return TrainConfig(model=model, data=str(data), output=str(out), mode=mode, steps=self.steps, rank=self.rank,
                           lr=self.lr, targets=self.targets, resolution=64, batch_size=self.batch_size,
                           ti_lr=self.ti_lr, token=token if "<" in token else None, init_token=INIT_WORD,
                           ti_steps=self.ti_steps_of(mode), class_prompt=self.class_prompt,
                           num_class_images=self.num_class_images, class_guidance=self.class_guidance,
                           prior_loss_weight=self.prior_loss_weight, prior_target=self.prior_target,
                           text_encoder_rank=self.text_encoder_rank_of(mode), init=self.init,
                           min_snr_gamma=self.min_snr_gamma or None,
                           class_data=str(class_data), seed=self.seed,
                           validation_steps=sample_steps, save_dtype="fp32")  # fmt: skip


def run(model: str, modes, budget: Budget, samples: int, sample_steps: int, guidance: float, work: Path,
        log=print, sample_seed: int = 0) -> tuple[dict, list]:  # fmt: skip
    from diffusers import StableDiffusionPipeline

    import lora_kit
    from lora_kit.train.loop import train

    judge = judge_module.load(ROOT / "lora_kit" / "assets" / "toyworld" / "judge.safetensors")
    work.mkdir(parents=True, exist_ok=True)
    rows, figure = {}, []  # figure: one row of samples per mode
    for mode in ("base", *modes):  # the base model first, untrained: what each metric reads without an adapter
        kind = PEERS.get(mode, VARIANTS.get(mode, (mode,))[0])  # a peer is scored like the mode it stands beside
        token = "<sks>" if kind in ("textual-inversion", "pivotal") else "sks"
        out = work / f"{mode}.safetensors"
        if mode != "base":
            data = instance_data(work / f"data-{mode}", budget.instance_images, token)
            cfg = budget.config(model, data, out, kind, token, work / "class-images", sample_steps)
            if mode in VARIANTS:  # the same DreamBooth with one setting changed
                settings = dict(VARIANTS[mode][1])
                if settings.pop("lr-third", False):
                    settings["lr"] = budget.lr / 3
                cfg = replace(cfg, **settings)
        if mode in PEERS:
            lr = budget.ti_lr if kind == "textual-inversion" else budget.lr
            peer_train(mode, model, data, out, budget.steps, budget.rank, lr, 64, token, budget.targets, class_cfg=cfg,
                       batch_size=budget.batch_size, text_encoder_rank=cfg.text_encoder_rank,
                       seed=budget.seed, min_snr_gamma=budget.min_snr_gamma)  # fmt: skip
        elif mode != "base":
            train(cfg)
        pipe = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        if mode == "diffusers-ti":
            pipe.load_textual_inversion(str(out), token=token)
        elif mode in PEERS:
            pipe.load_lora_weights(str(out))
        elif mode != "base":
            lora_kit.load(pipe, out)
        rows[mode], shown = sample_scores(pipe, judge, token, samples, sample_steps, guidance, sample_seed)
        figure.append(shown)
        log(f"{mode}: " + ", ".join(f"{k} {h}/{n}" for k, (h, n) in rows[mode].items() if " on " not in k))
    return rows, figure


def pool(runs: list[dict]) -> dict:
    """{mode: {metric: (hits, n)}} of several runs -> the same with hits and n summed over the runs."""
    return {
        mode: {metric: tuple(sum(run[mode][metric][i] for run in runs) for i in (0, 1)) for metric in scores}
        for mode, scores in runs[0].items()
    }


def shown_prompts(class_prompt: str) -> str:
    from lora_kit.train.config import split_prompts

    prompts = split_prompts(class_prompt)
    return repr(prompts[0]) if len(prompts) == 1 else f"{len(prompts)} prompts ({prompts[0]!r}, ...)"


def seeds(first: int, repeats: int) -> str:
    return f"seed {first}" if repeats == 1 else f"seeds {first}-{first + repeats - 1} pooled ({repeats} runs per row)"


def share(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k}/{n} = {k / n:.0%} [{lo:.0%}, {hi:.0%}]"


LABELS = {
    "base": "base model, no adapter (reference)",
    "peft": "diffusers+peft LoRA (peer of lora)",
    "peft-dreambooth": "diffusers+peft DreamBooth (peer of dreambooth)",
    "diffusers-ti": "diffusers textual inversion (peer of textual-inversion)",
    "dora-dreambooth": "dreambooth, DoRA adapters (--adapter dora)",
    "lokr-dreambooth": "dreambooth, LoKr adapters (--adapter lokr)",
    "int8-dreambooth": "dreambooth over an int8 base (--quantize-base int8 --quantize-text-encoders int8)",
    "nf4-dreambooth": "dreambooth over an NF4 base (--quantize-base nf4 --quantize-text-encoders nf4)",
    "compile-dreambooth": "dreambooth, compiled blocks (--compile)",
    "ema-dreambooth": "dreambooth, the EMA written (--ema 0.999)",
    "prodigy-dreambooth": "dreambooth, Prodigy (--optimizer prodigy --lr 1)",
    "adafactor-dreambooth": "dreambooth, Adafactor (--optimizer adafactor)",
    "schedulefree-dreambooth": "dreambooth, schedule-free AdamW (--optimizer schedulefree)",
    "lion8bit-dreambooth": "dreambooth, Lion 8-bit (--optimizer lion8bit, a third of the lr)",
}


def write_results(args, command: str, base: dict | None, rows: dict, path: Path) -> None:
    b = args.budget
    partial = "" if set(args.modes.split(",")) == set(DEFAULT_MODES) else f" --modes {args.modes}"  # (its own section)
    lines = [
        "## bench/quality.py" + partial + (" (quick)" if args.quick else ""),
        "",
        f"`{command}` - {datetime.date.today()}, commit {_results.commit()}, {platform.machine()}, "
        f"torch {torch.__version__}, model {args.label}; {args.sample_steps} DDIM steps, guidance {args.guidance}; "
        "shares with 95% Wilson intervals",
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
        te = f", text-encoder rank {b.text_encoder_rank} (pivotal: {b.pivotal_text_encoder_rank})"
        lines += [f"Each mode at {b.steps} steps (batch {b.batch_size}, rank {b.rank}, targets {b.targets}{te}, "
                  f"lr {b.lr:g}, embedding lr {b.ti_lr:g}, pivotal: embeddings alone for the first "
                  f"{b.ti_steps_of('pivotal')}; "
                  f"{b.instance_images} instance images; DreamBooth and pivotal: {b.num_class_images} class images "
                  f"(guidance {b.class_guidance:g}) of {shown_prompts(b.class_prompt)}, prior loss weight "
                  f"{b.prior_loss_weight:g}, prior target {b.prior_target} (the peer: the noise, as diffusers); "
                  f"initial down factors {b.init} (the peers: gaussian); "
                  f"loss {f'Min-SNR-{b.min_snr_gamma:g} weighted' if b.min_snr_gamma else 'plain MSE'}; "
                  f"{seeds(b.seed, args.repeats)}; the peers alike):", "",
                  "| mode | fidelity | prior preservation | coloured circles kept | composability |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for mode, scores in rows.items():
            cells = " | ".join(share(*scores[name]) for name in ("fidelity", "prior", "coloured", "compose"))
            lines.append(f"| {LABELS.get(mode, mode)} | {cells} |")
        lines += ["", "Subject fidelity on each background of the fidelity prompts:", "",
                  "| mode | " + " | ".join(BACKGROUNDS) + " |", "|---|" + "---|" * len(BACKGROUNDS)]  # fmt: skip
        for mode, scores in rows.items():
            cells = " | ".join("{}/{}".format(*scores[f"fidelity on {bg}"]) for bg in BACKGROUNDS)
            lines.append(f"| {LABELS.get(mode, mode)} | {cells} |")
        lines.append("")
    _results.write_section(path, lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", help="toy-world base model folder (default: the shipped one)")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"of {','.join(MODES)}")
    for f in fields(Budget):  # the training budget of every mode and peer
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--samples", type=int, default=48, help="samples per metric")
    parser.add_argument("--repeats", type=int, default=1, help="train and sample each mode with N seeds, pooled")
    parser.add_argument("--base-samples", type=int, default=128, help="samples of the base model alone (0: skip)")
    parser.add_argument("--sample-steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="tiny random base, 2 steps, 1 sample (tests)")
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: train each mode at least once")
    if not 0 <= args.pivotal_ti_share < 1:
        parser.error(
            f"--pivotal-ti-share {args.pivotal_ti_share:g}: a share of the steps in [0, 1), so LoRA trains too"
        )
    command = shlex.join(["python", "bench/quality.py", *argv])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.quick:
            import pretrain

            args.model = str(pretrain.pretrain(work / "base", "tiny", "cpu", log=lambda _: None))
            args.label = "a tiny random base (the numbers mean nothing; this checks the benchmark runs)"
            args.steps, args.samples, args.sample_steps, args.base_samples, args.num_class_images = 2, 1, 2, 2, 1
            from lora_kit.train import backbone

            backbone.COMPILE_OPTIONS = {"backend": "aot_eager"}  # (inductor's C++ build takes minutes on a CPU)
        args.budget = Budget(**{f.name: getattr(args, f.name) for f in fields(Budget)})
        if args.model == "toy":
            from lora_kit.models import toy_model

            args.model, args.label = toy_model(), "toy (the shipped lora_kit/assets/toyworld/model)"
        args.label = getattr(args, "label", args.model)
        base, strip, figure = None, [], []
        if args.base_samples:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(args.model, dtype=torch.float32)
            pipe.set_progress_bar_config(disable=True)
            judge = judge_module.load(ROOT / "lora_kit" / "assets" / "toyworld" / "judge.safetensors")
            base = base_scores(pipe, judge, args.base_samples, args.sample_steps, args.guidance)
            strip = render(pipe, STRIP, args.sample_steps, args.guidance, seed=0)
            print("base: " + ", ".join(f"{k} {h}/{n}" for k, (h, n) in base.items()), flush=True)
        modes = [m for m in args.modes.split(",") if m]
        runs = []  # one per seed: other class images, batches, noise and samples; the shares pooled
        for r in range(args.repeats):
            budget = replace(args.budget, seed=args.budget.seed + r)
            repeat, shown = run(args.model, modes, budget, args.samples, args.sample_steps, args.guidance,
                                work / f"seed-{budget.seed}", sample_seed=r * args.samples)  # fmt: skip
            runs.append(repeat)
            figure = figure or shown  # the first seed's samples
        rows = pool(runs)
    write_results(args, command, base, rows, Path(args.results))
    figures = Path(args.results).parent  # PNGs beside the results: bench/ unless --results says otherwise
    if strip:
        grid(strip, columns=len(strip)).save(figures / "toyworld-base.png")
    if figure:  # one row per mode: 4 fidelity, 1 prior, 1 coloured, 2 composability samples
        name = "toyworld-modes.png" if set(modes) == set(DEFAULT_MODES) else f"toyworld-{'+'.join(modes)}.png"
        grid([image for row in figure for image in row], columns=len(figure[0])).save(figures / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
