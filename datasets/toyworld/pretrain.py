"""Pretrain the toy-world base model: an SD 1.x-architecture pipeline trained from scratch on the toy world.

Stages (each resumable from OUT/work/): a VAE (64 px -> 16x16x4 latents); then the CLIP text encoder and the UNet
jointly with the DDPM epsilon objective and 10% caption dropout (for classifier-free guidance), in the cpu recipe's
last 5000 steps with a share of the captions naming the class alone ("a circle on a blue background": the prompt
DreamBooth's prior preservation asks for, which the base could not draw before); then (cpu recipe) the VAE decoder
alone, fine-tuned with the encoder frozen so the UNet's latent space stays the same. The tokenizer is the real CLIP BPE
vocabulary (49,408 tokens, shipped as lora_kit/assets/tokenizers/bpe_simple_vocab_16e6.txt.gz). The result is saved in
fp16 as a diffusers folder that `StableDiffusionPipeline.from_pretrained(OUT/model)` loads.

    python datasets/toyworld/pretrain.py OUT              # full recipe (~10 min on one GPU, hours on 2 CPU cores)
    python datasets/toyworld/pretrain.py OUT --recipe cpu # without a GPU: ~2 h 40 min on 2 CPU cores
    python datasets/toyworld/pretrain.py OUT --recipe cpu --init OLD --init-step 16000
        # how the shipped model was made (17 min): OLD, the base shipped before (lora_kit/assets/toyworld/model at
        # commit f0ac6fb, the cpu recipe's first 16000 UNet steps), continued by the recipe's last 3000
    python datasets/toyworld/pretrain.py OUT --recipe tiny  # seconds: what the tests run
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "lora_kit" / "assets" / "toyworld"
MAX_TOKENS = 16  # captions are short: "a red circle on a blue background" is 9 tokens with the specials

RECIPES = {  # measured in shared/reference/toyworld-notes.md: the full one reaches >= 62/64 colour accuracy
    # the last quarter of the full one, like that of the cpu one, with captions that name the class alone (a quarter,
    # then half of them: the cpu recipe's measured cure for the class prompt; not yet measured on a GPU)
    "full": dict(vae_steps=1500, vae_batch=64, vae_lr=1e-3, unet_steps=3000, unet_batch=128, unet_lr=3e-4,
                 colourless=((2250, 0.25), (2500, 0.5)),
                 vae_channels=(32, 64, 64), unet_channels=(64, 128, 128), heads=8, text_width=64),
    # without a GPU (measured on 2 CPU cores: ~1 s per VAE step, ~0.6 s per UNet step): a VAE half as wide at full
    # resolution, a UNet a third as wide with 2 attention heads (the CPU attention kernel is slow with many tiny
    # heads), latents encoded once instead of every step, min-SNR-5 loss weights and a cosine learning-rate decay
    # to converge in fewer samples; then a second, gentler cosine cycle (a warm restart at step 8000) with offset
    # noise: after the first 8000 steps the background colour, the latent's mean, followed the starting noise more
    # than the prompt (20/64 right; mostly purple or orange); then a third cycle of 2000 steps where a quarter of the
    # captions drop the shape's colour word (the class prompt "a circle on a blue background" drew green crosses
    # on purple before it; after it, circles of many colours on blue, and 64/64 coloured prompts still right); then
    # a fourth of 3000 steps with half the captions colourless (after the third, 5 in 48 class-prompt samples had
    # their background read as a neighbouring colour, orange as yellow; after the fourth, 2 in 48)
    "cpu": dict(vae_steps=600, vae_batch=32, vae_lr=2e-3, unet_steps=19000, unet_batch=32, unet_lr=8e-4,
                restarts=((8000, 4e-4), (14000, 2e-4), (16000, 2e-4)), offset_noise=((8000, 0.1),),
                colourless=((14000, 0.25), (16000, 0.5)),
                vae_channels=(16, 32, 64), unet_channels=(32, 64, 64), heads=2, text_width=64,
                latent_cache=24576, min_snr=5.0, cosine=True, decoder_steps=600, decoder_lr=1e-3),
    "tiny": dict(vae_steps=3, vae_batch=4, vae_lr=1e-3, unet_steps=3, unet_batch=4, unet_lr=3e-4,
                 vae_channels=(8, 16, 16), unet_channels=(32, 32, 32), heads=8, text_width=32, latent_cache=16,
                 min_snr=5.0, cosine=True, decoder_steps=2, decoder_lr=1e-3, colourless=((1, 0.5),)),
}  # fmt: skip


def write_clip_tokenizer(folder: Path):
    """The exact openai CLIP vocabulary (ids as clip-vit-large-patch14), from the BPE merges lora_kit ships."""
    from transformers import CLIPTokenizer

    from lora_kit.single_file.tokenizers import write_clip_vocab

    write_clip_vocab(folder)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS)


def batch(step: int, size: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """A deterministic batch of fresh toy-world images in [-1, 1] and their captions."""
    samples = [generate.sample("train", step * size + i, seed) for i in range(size)]
    return _tensor([generate.render(s) for s in samples]), [s.caption for s in samples]


def scenes(step: int, size: int, seed: int = 0) -> torch.Tensor:
    """A deterministic batch of generate.scene pictures in [-1, 1]."""
    return _tensor([generate.scene(step * size + i, seed) for i in range(size)])


def _tensor(images) -> torch.Tensor:
    pixels = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def build(recipe: dict, tokenizer):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=generate.SIZE,
        block_out_channels=recipe["vae_channels"], layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )  # fmt: skip
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=recipe["text_width"], intermediate_size=4 * recipe["text_width"],
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))  # fmt: skip
    c = recipe["unet_channels"]
    unet = UNet2DConditionModel(
        sample_size=generate.SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=c,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=recipe["text_width"], attention_head_dim=recipe["heads"], norm_num_groups=min(32, c[0]),
    )  # fmt: skip
    return vae, text, unet


def _save(work: Path, name: str, state: dict) -> None:
    tmp = work / f".{name}.tmp"
    torch.save(state, tmp)
    tmp.rename(work / name)


def train_vae(vae, recipe, work: Path, device, log) -> None:
    ckpt = work / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe["vae_lr"])
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    vae.to(device).train()
    for step in range(start, recipe["vae_steps"]):
        x, _ = batch(step, recipe["vae_batch"], seed=1)
        dist = vae.encode(x.to(device)).latent_dist
        recon = vae.decode(dist.sample()).sample
        loss = (recon - x.to(device)).square().mean() + 1e-6 * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == recipe["vae_steps"]:
            log(f"vae {step + 1}/{recipe['vae_steps']} loss {loss.item():.4f}")
            _save(work, "vae.pt", {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})


def train_decoder(vae, recipe, work: Path, device, log) -> None:
    """Fine-tune the VAE decoder alone (the encoder, hence the UNet's latent space, stays as it is), as Stable
    Diffusion's ft-MSE decoder did: sharper shapes and truer colours for a short first VAE stage. Half of every batch
    is uncaptioned multi-shape scenes (generate.scene): a decoder that saw one colour per shape only washes out any
    object of two colours (it read back the held-out subject 32/48 times before, 47/48 after 100 such steps)."""

    steps = recipe.get("decoder_steps", 0)
    if not steps:
        return
    ckpt = work / "decoder.pt"
    opt = torch.optim.AdamW(vae.decoder.parameters(), lr=recipe["decoder_lr"])
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        vae.decoder.load_state_dict(state["decoder"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    vae.to(device).train()
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(recipe["decoder_lr"], steps, step)
        half = recipe["vae_batch"] // 2
        x = torch.cat([batch(step, recipe["vae_batch"] - half, seed=4)[0], scenes(step, half, seed=5)]).to(device)
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
            z = dist.mode() if recipe.get("latent_cache") else dist.sample()  # what the UNet learned to make
        recon = vae.decode(z).sample
        loss = (recon - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"decoder {step + 1}/{steps} loss {loss.item():.4f}")
            _save(work, "decoder.pt", {"decoder": vae.decoder.state_dict(), "opt": opt.state_dict(), "step": step + 1})


def encode_cache(vae, recipe, work: Path, device, log) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Encode a fixed set of training images once: latent means, stds and captions (resumable as latents.pt)."""
    path = work / "latents.pt"
    if path.exists():
        state = torch.load(path, weights_only=True)
        return state["mean"], state["std"], state["captions"]
    n, size = recipe["latent_cache"], 64
    means, stds, captions = [], [], []
    vae.to(device).eval()
    with torch.no_grad():
        for j in range(0, n, size):
            x, c = batch(j // size, min(size, n - j), seed=3)
            dist = vae.encode(x.to(device)).latent_dist
            means.append(dist.mean.cpu())
            stds.append(dist.std.cpu())
            captions += c
    log(f"encoded {n} training images once")
    state = {"mean": torch.cat(means), "std": torch.cat(stds), "captions": captions}
    _save(work, "latents.pt", state)
    return state["mean"], state["std"], captions


def deterministic_posterior(vae) -> None:
    """Give the encoder's posterior a negligible spread (logvar -30), its mean untouched. The UNet learned the
    posterior means (cpu recipe), and this short-trained VAE's posterior std (~0.5 against a spread of ~1.5 in the
    means) would otherwise drown them: trainers encode with latent_dist.sample(), as diffusers' and kohya's do, and
    a LoRA trained on those noisy latents learns to draw the noise (blotchy samples)."""
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0
        vae.quant_conv.bias[channels:] = -30.0


def cosine_lr(lr: float, steps: int, step: int, restarts=()) -> float:
    """Cosine decay from lr to 0 over steps, restarted (warm restarts) at each (step, lr) pair of `restarts`."""
    import itertools
    import math

    cycles = [(0, lr), *restarts, (steps, 0.0)]
    for (begin, peak), (end, _) in itertools.pairwise(cycles):
        if begin <= step < end:
            return peak * 0.5 * (1 + math.cos(math.pi * (step - begin) / (end - begin)))
    raise ValueError(f"step {step} is outside the schedule's {steps} steps")


def stage_value(stages, step: int, default: float = 0.0) -> float:
    """The value of the last (begin, value) stage that has begun by `step` (stages sorted by begin)."""
    return next((value for begin, value in reversed(stages) if step >= begin), default)


def train_unet(vae, text, unet, tokenizer, recipe, work: Path, device, log) -> None:

    from diffusers import DDPMScheduler

    ckpt = work / "unet.pt"
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=recipe["unet_lr"])
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    cache = encode_cache(vae, recipe, work, device, log) if recipe.get("latent_cache") else None
    if cache is not None:
        # SD's 0.18215 suits SD's VAE only: scale this VAE's latents to unit variance (saved in the VAE's config, which
        # pipelines read), or the diffusion would see a weak signal at every noise level
        vae.register_to_config(scaling_factor=round(1.0 / float(cache[0].std()), 5))
    noise_sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ac = noise_sched.alphas_cumprod.to(device)
    vae.to(device).eval()
    unet.to(device).train()
    text.to(device).train()
    sf = vae.config.scaling_factor
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    steps = recipe["unet_steps"]
    for step in range(start, steps):
        g = torch.Generator().manual_seed(step)
        if recipe.get("cosine"):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(recipe["unet_lr"], steps, step, recipe.get("restarts", ()))
        if cache is None:
            x, captions = batch(step, recipe["unet_batch"], seed=2)
            with torch.no_grad():
                latents = vae.encode(x.to(device)).latent_dist.sample() * sf
        else:  # the posterior means: the decoder is fine-tuned on them too (train_decoder)
            idx = torch.randint(0, len(cache[2]), (recipe["unet_batch"],), generator=g)
            latents = (cache[0][idx] * sf).to(device)
            captions = [cache[2][i] for i in idx.tolist()]
        captions = ["" if torch.rand(1, generator=g).item() < 0.1 else c for c in captions]
        share = stage_value(recipe.get("colourless", ()), step)
        if share:  # a share of captions names the class alone ("a circle on a blue background")
            captions = [generate.colourless(c) if torch.rand(1, generator=g).item() < share else c for c in captions]
        noise = torch.randn(latents.shape, generator=g)
        offset = stage_value(recipe.get("offset_noise", ()), step)
        if offset:
            # offset noise (Guttenberg 2023): at t = T a 16x16 latent keeps sqrt(abar_T) = 7% of its mean, about the
            # spread of the mean of its noise, so a model learns to take the image's mean (here: the background
            # colour) from the noise; a random per-channel offset makes that cue useless, the prompt must say it
            noise += offset * torch.randn(*latents.shape[:2], 1, 1, generator=g)
        noise = noise.to(device)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=g).to(device)
        abar = ac[t].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        with autocast:
            cond = text(ids.input_ids.to(device)).last_hidden_state
            pred = unet(noisy, t, encoder_hidden_states=cond).sample
        per_sample = (pred.float() - noise).square().mean(dim=(1, 2, 3))
        if recipe.get("min_snr"):  # Hang et al. 2023: weight min(SNR, gamma) / SNR for the epsilon objective
            snr = (abar / (1 - abar)).flatten()
            per_sample = per_sample * snr.clamp(max=recipe["min_snr"]) / snr
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"unet {step + 1}/{steps} loss {loss.item():.4f}")
            _save(work, "unet.pt", {"unet": unet.state_dict(), "text": text.state_dict(), "opt": opt.state_dict(),
                                    "step": step + 1})  # fmt: skip


def seed_work(work: Path, model: Path, step: int, vae, text, unet, recipe: dict, log) -> None:
    """Start the resumable work folder from a saved pipeline folder as if its UNet stage had reached `step` (the VAE
    and decoder stages done), so that the recipe's later UNet steps continue a model shipped earlier; the optimiser
    moments start afresh. Files already in `work` are kept (a resumed run)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if not (model / "model_index.json").is_file():
        raise ValueError(f"{model}: not a diffusers pipeline folder (no model_index.json)")
    if not 0 <= step <= recipe["unet_steps"]:
        raise ValueError(f"--init-step {step}: the recipe has {recipe['unet_steps']} UNet steps")
    try:
        vae.load_state_dict(AutoencoderKL.from_pretrained(model / "vae").float().state_dict())
        text.load_state_dict(CLIPTextModel.from_pretrained(model / "text_encoder").float().state_dict())
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(model / "unet").float().state_dict())
    except (OSError, RuntimeError) as err:  # a part missing, or shapes of another recipe
        raise ValueError(f"{model}: does not fit this recipe's model ({str(err).splitlines()[0]})") from err
    fresh = {
        "vae.pt": lambda: {"model": vae.state_dict(), "opt": torch.optim.AdamW(vae.parameters()).state_dict(),
                           "step": recipe["vae_steps"]},
        "unet.pt": lambda: {"unet": unet.state_dict(), "text": text.state_dict(), "step": step,
                            "opt": torch.optim.AdamW([*unet.parameters(), *text.parameters()]).state_dict()},
        "decoder.pt": lambda: {"decoder": vae.decoder.state_dict(), "step": recipe.get("decoder_steps", 0),
                               "opt": torch.optim.AdamW(vae.decoder.parameters()).state_dict()},
    }  # fmt: skip
    for name, state in fresh.items():
        if not (work / name).exists():
            _save(work, name, state())
    log(f"started {work} from {model} at UNet step {step}")


def pretrain(
    out: str | Path,
    recipe_name: str = "full",
    device: str = "auto",
    log=print,
    init: Path | None = None,
    init_step: int = 0,
) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    out = Path(out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    recipe = RECIPES[recipe_name]
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto"
                       else device)  # fmt: skip
    tokenizer = write_clip_tokenizer(work / "tokenizer")
    vae, text, unet = build(recipe, tokenizer)
    if init is not None:
        seed_work(work, Path(init), init_step, vae, text, unet, recipe, log)
    t0 = time.time()
    train_vae(vae, recipe, work, dev, log)
    train_unet(vae, text, unet, tokenizer, recipe, work, dev, log)
    train_decoder(vae, recipe, work, dev, log)
    deterministic_posterior(vae)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=vae.cpu(), text_encoder=text.cpu(), tokenizer=tokenizer, unet=unet.cpu(),
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip
    pipe.to(torch.float16).save_pretrained(out / "model")
    from lora_kit.models import loads_in_fp32

    loads_in_fp32(out / "model")
    log(f"saved {out / 'model'} after {time.time() - t0:.0f} s on {dev}")
    return out / "model"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--recipe", choices=list(RECIPES), default="full", help="full (GPU), cpu, tiny (tests)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--init", type=Path, help="continue a saved pipeline folder (e.g. the shipped model) ...")
    parser.add_argument("--init-step", type=int, default=0, help="... from this UNet step of the recipe")
    args = parser.parse_args(argv)
    existed = Path(args.out).exists()
    try:
        pretrain(args.out, args.recipe, args.device, init=args.init, init_step=args.init_step)
    except ValueError as err:  # a bad --init: one line, and no half-made output folder left behind
        if not existed:
            shutil.rmtree(args.out, ignore_errors=True)
        print(f"pretrain.py: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
