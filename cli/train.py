"""lora-train: every TrainConfig field is a flag (and a key of the --config TOML file; flags win)."""

from __future__ import annotations

import click

from lora_kit.errors import flag

from ._common import command, friendly_errors

HELP = {
    "model": "Base model: a diffusers folder, a hub id, toy, or a single-file checkpoint (.safetensors; FLUX's parts "
    "joined by commas: flux1-dev.safetensors,ae.safetensors,clip_l.safetensors,t5xxl_fp16.safetensors).",
    "prediction_type": "epsilon | v_prediction: overrides the model's (an SD2 single file cannot tell which).",
    "allow_pickle": "Open a pickled .ckpt/.pt model (read with torch's weights-only loader). [off]",
    "data": "Folder of images with .txt captions, kohya N_name repeat folders, or a lora-ppim output.",
    "output": "The LoRA file to write (textual-inversion: the embedding file).",
    "mode": "lora | dreambooth | textual-inversion | pivotal (SD3/FLUX: lora and dreambooth).",
    "steps": "Optimizer steps in all (--ti-steps included). [500]",
    "batch_size": "Images per step (split across processes). [1]",
    "grad_accum": "Micro-batches accumulated per optimizer step. [1]",
    "resolution": "Training resolution (at most 8192); buckets keep about resolution^2 pixels per image. [512]",
    "buckets": "Aspect-ratio buckets (--no-buckets: square centre crops). [on]",
    "flip": "Random horizontal flips (both orientations are cached). [off]",
    "cache": "Cache VAE latents and frozen text embeddings. [on]",
    "rank": "LoRA rank. [16]",
    "alpha": "LoRA alpha (scale = alpha / rank). [rank]",
    "targets": "Target preset: attn, kohya, locon (UNet); dit (SD3/FLUX, used there in place of kohya/locon). [kohya]",
    "conv_rank": "Rank of kxk convs (locon). [rank]",
    "conv_alpha": "Alpha of kxk convs. [conv rank]",
    "text_encoder_rank": "Train text-encoder adapters at this rank (0 = off; SD3: its CLIPs; not FLUX). [0]",
    "text_encoder_alpha": "Text-encoder alpha. [its rank]",
    "text_encoder_targets": "Text-encoder preset: clip-attn, clip-all. [clip-attn]",
    "dropout": "Dropout on the adapter input while training (masks drawn per seed, step and process). [0]",
    "init": "Initial down factors: kaiming (uniform, as kohya and peft's default) or gaussian (std 1/rank, as peft's "
    "init_lora_weights='gaussian' of the diffusers scripts); up starts at zero either way. [kaiming]",
    "adapter": "Adapter kind: lora (a low-rank pair), dora (LoRA with DoRA's per-row magnitude), loha (LyCORIS "
    "LoHa, rank --rank), lokr (LyCORIS LoKr, w2 at --rank, or whole where the rank is too large for it). "
    "dora/loha/lokr start as LyCORIS's do, take no --dropout, are written under kohya/LyCORIS names on every "
    "architecture (what LyCORIS, ComfyUI and lora_kit.load read), and are refused for textual-inversion. [lora]",
    "lokr_factor": "LoKr: split each dimension as LyCORIS's factorization(dim, factor) (w1 holds the smaller "
    "part); -1 = the most balanced split. [-1]",
    "lokr_full_w1": "LoKr: keep w1 a whole matrix (LyCORIS's default); --no-lokr-full-w1 decomposes it at --rank "
    "where that is smaller (LyCORIS's decompose_both). [on]",
    "lr": "Learning rate of the UNet/transformer adapters. [1e-4]",
    "text_encoder_lr": "Learning rate of the text-encoder adapters. [lr]",
    "ti_lr": "Learning rate of new token embeddings. [5e-3]",
    "lr_scheduler": "constant | constant_with_warmup | linear | cosine. [constant]",
    "warmup_steps": "LR warmup steps (linear from 0; with the constant scheduler it is constant_with_warmup). [0]",
    "optimizer": "adamw | adamw8bit (needs bitsandbytes) | prodigy (needs prodigyopt; its authors advise --lr 1) "
    "| adafactor (transformers', at the fixed --lr) | schedulefree (needs schedulefree: AdamWScheduleFree; samples "
    "and the file use its averaged weights) | lion8bit (needs bitsandbytes; Lion wants a 3-10x smaller --lr). "
    "[adamw]",
    "weight_decay": "Weight decay of the adapters (decoupled, for every optimizer). [0.01]",
    "max_grad_norm": "Gradient clipping norm (0 = off). [1.0]",
    "ema": "Keep an fp32 exponential moving average of the trained tensors with this decay (0 < DECAY < 1, e.g. "
    "0.999), updated after every step: validation samples and the written file use it (as kohya and SimpleTuner "
    "do); checkpoints hold it beside the live weights. Not with schedulefree. [off]",
    "seed": "Seed of every random choice (data order, noise, ...), 0 to 2**63 - 1. [0]",
    "mixed_precision": "no | fp16 (a CUDA GPU) | bf16 (adapters and new token embeddings stay fp32). [no]",
    "gradient_checkpointing": "Recompute activations in the backward pass to save memory. [off]",
    "compile": "torch.compile the UNet's or transformer's repeated blocks after the adapters are added (diffusers' "
    "regional compilation: each transformer block and resnet, or each DiT block, compiled in place; identical "
    "blocks share one graph, so the first steps stay short). Faster steps on a GPU, after a compile of a minute or "
    "more; the same training as without it, to rounding. [off]",
    "quantize_base": "none | fp8 | int8 | nf4: hold the frozen UNet/transformer's linear layers quantized while the "
    "adapters train beside them in full precision (QLoRA; torchao's weight-only tensors, on the CPU too: pip install "
    "torchao). The file applies to the unquantized base; its metadata records what it trained on. [none]",
    "quantize_text_encoders": "none | fp8 | int8 | nf4: the same for the text encoders (with --text-encoder-rank "
    "their adapters train beside the quantized layers). [none]",
    "offload_blocks": "Keep N of the UNet's or transformer's repeated blocks off the GPU, each copied in for its "
    "forward and backward (as sd-scripts' --blocks_to_swap); the same adapter as without it. [0]",
    "min_snr_gamma": "Min-SNR loss weighting with this gamma (5 is usual; not SD3/FLUX: flow matching). [off]",
    "noise_offset": "Noise offset (e.g. 0.05) for very dark/bright images. [0]",
    "mask_floor": "Loss weight outside subject masks (manifest masks). [0.1]",
    "instance_prompt": "Caption for images without one.",
    "caption_dropout": "Share of samples trained with an empty caption. [0]",
    "shuffle_captions": "Shuffle comma-separated tags after the first --keep-tokens. [off]",
    "keep_tokens": "Tags kept in place when shuffling. [0]",
    "clip_skip": "2 = condition on the penultimate CLIP layer (SD1/SD2 only; at most its layers). [1]",
    "class_prompt": "DreamBooth (pivotal too, when given): the class prompt, e.g. 'a photo of a dog'; several, "
    "separated by '|', make a varied class set (image i takes prompt i mod n).",
    "class_guidance": "DreamBooth: guidance scale of the generated class images. [the pipeline's default]",
    "class_data": "DreamBooth: folder of class images: your own (any name, captioned by their .txt, else the class "
    "prompt) come first, and the base model draws the shortfall as class-NNNNN.png, recording its settings in "
    "class-images.json (a folder drawn with other settings is refused). [<output stem>-class-images]",
    "num_class_images": "DreamBooth: number of class images. [100]",
    "prior_loss_weight": "DreamBooth: weight of the class (prior) loss. [1.0]",
    "prior_target": "DreamBooth: what the prior loss asks for on class images: images (their own noise, the classic "
    "DreamBooth loss) or base (what the base model, adapters off, predicts on the same noisy image and prompt: a "
    "target without sampling noise, for one extra forward per class image). [images]",
    "token": "Textual inversion / pivotal: the new token, e.g. '<sks>' (put in front of captions that lack it).",
    "init_token": "Initialise the new token from this word's embedding (one word; the mean of its pieces when the "
    "tokenizer splits it).",
    "num_vectors": "Vectors per new token, 1 to 75. [1]",
    "ti_steps": "Pivotal: steps training the embeddings alone before LoRA joins. [0]",
    "save_every": "Checkpoint every N steps to <output stem>-checkpoints/step-N. [0 = off]",
    "save_limit": "Keep only the newest N checkpoints. [0 = all]",
    "resume": "Resume from 'latest' or a checkpoint folder (refused if the config, data or model files differ).",
    "validation_prompt": "Prompt of validation samples (a PNG grid in <output stem>-samples/).",
    "validate_every": "Validation samples every N steps. [0 = off]",
    "validation_steps": "Denoising steps of validation and class images. [20]",
    "logdir": "Folder for the loss log (CSV, and tensorboard when installed).",
    "save_dtype": "fp16 | bf16 | fp32 of the written adapters. [fp16]",
    "force": "Overwrite an existing output; without --resume, also delete an earlier run's checkpoints (when the "
    "new run starts).",
}


def _options(fn):
    from dataclasses import MISSING

    from lora_kit.train.config import TrainConfig

    for f in reversed(list(TrainConfig.__dataclass_fields__.values())):
        if f.name == "extra":
            continue
        option = flag(f.name)
        default = f.default if f.default is not MISSING else None
        if isinstance(default, bool):
            fn = click.option(f"{option}/--no-{option[2:]}", f.name, default=None, help=HELP[f.name])(fn)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        if f.name == "output":
            fn = click.option("-o", option, f.name, type=str, default=None, help=HELP[f.name])(fn)
        else:
            fn = click.option(option, f.name, type=kind, default=None, help=HELP[f.name])(fn)
    return fn


@command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="A TOML file of these options.")
@_options
@friendly_errors
def main(config_file, **flags):
    """Train a LoRA (lora, dreambooth), an embedding (textual-inversion), or both (pivotal) on a folder of images;
    --adapter dora|loha|lokr trains that LyCORIS kind in place of the LoRA pair.

    SD1/SD2/SDXL train on the noise-prediction objective (epsilon or v); SD3 and FLUX with flow matching (sigma
    logit-normal, shifted as the model's scheduler shifts it; target noise - latents).

    Example: lora-train --model ./sd15 --data ./photos --mode dreambooth --class-prompt "a photo of a dog"
    --instance-prompt "a photo of sks dog" --steps 400 -o sks.safetensors
    """
    from lora_kit.errors import LoraKitError
    from lora_kit.train.config import ConfigError, TrainConfig, read_toml
    from lora_kit.train.loop import train

    given = {k: v for k, v in flags.items() if v is not None}
    from_file = {k: v for k, v in (read_toml(config_file) if config_file else {}).items() if k not in given}
    for name in ("model", "data", "output"):
        if not (given | from_file).get(name):
            raise click.UsageError(f"{flag(name)} is required (as a flag or in --config)")
    try:
        written = train(TrainConfig(**from_file, **given), inputs=[config_file] if config_file else [])
    except ConfigError as e:  # name the value as the user gave it: a key of the config file, else a flag
        raise LoraKitError(e.explain(lambda n: f"{n} in {config_file}" if n in from_file else flag(n))) from None
    for path in written:
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
