"""The one training loop every mode shares, and its callbacks (checkpoints, validation samples, logging).

Determinism: the batch of each step, every flip, caption choice, latent sample, noise and timestep are functions of
(seed, step, position in the global batch). So `--resume` continues bit-exactly from a checkpoint (checkpoints.py:
the trainable tensors, the optimizer, LR-scheduler and loss-scaler states), and N processes that each take a slice of
the global batch compute what one process computes. Adapter dropout masks (torch's global RNG) are a function of
(seed, step, process): a resume is still bit-exact, but N processes draw other masks than one process does.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..embeddings import expand
from ..errors import LoraKitError
from ..inject import lora_disabled
from ..preprocess.caption import token_pattern
from ..quantize import quantize_pipeline
from . import distributed, objective, offload_blocks
from .backbone import Backbone
from .callbacks import default_callbacks
from .checkpoints import check_resume, clear_earlier_run, fingerprints, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .data import Example, Plan, load, rng, scan, sdxl_time_ids, torch_generator
from .ema import EMA, evaluated
from .prior import check_class_folder, class_examples, uses_prior
from .recipes import Recipe, build, output_files, save_outputs


class Batcher:
    """Turns planned example indices into model inputs, caching latent distributions and frozen text embeddings."""

    def __init__(self, cfg: TrainConfig, backbone: Backbone, examples: list[Example], plan: Plan, cache_text: bool,
                 text_trains: bool = False):  # fmt: skip
        self.cfg, self.backbone, self.examples, self.plan = cfg, backbone, examples, plan
        self.latents: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        self.text: dict[str, dict[str, torch.Tensor]] | None = {} if cache_text else None
        self.text_trains = text_trains

    def latent_dist(self, index: int, flip: bool):
        key = (index, flip)
        if key not in self.latents:
            pixels, _ = load(self.examples[index], self.plan.sizes[index], flip)
            mean, std = self.backbone.latent_dist(pixels[None])
            if not self.cfg.cache:
                return mean, std
            self.latents[key] = (mean, std)
        return self.latents[key]

    def caption(self, text: str, r, prior: bool = False) -> str:
        cfg = self.cfg
        if cfg.caption_dropout and r.random() < cfg.caption_dropout:
            return ""
        if cfg.shuffle_captions:
            tags = [t.strip() for t in text.split(",")]
            head, tail = tags[: cfg.keep_tokens], tags[cfg.keep_tokens :]
            r.shuffle(tail)
            text = ", ".join(head + tail)
        if cfg.mode in ("textual-inversion", "pivotal") and not prior:
            # the new token must be in the caption to learn anything (class images keep their own captions); a
            # multi-vector token is spelled out as its tokenizer entries (<tok> <tok>_1 ...), as diffusers does. The
            # token is a whole word as lora-ppim's apply_token finds it: "<tok>, a dog" has it, "<tok>_1" does not
            word = token_pattern(cfg.token)
            if not word.search(text):
                text = f"{cfg.token} {text}".strip()
            text = word.sub(lambda _: " ".join(expand(cfg.token, cfg.num_vectors)), text)
        return text

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The text conditioning of a batch. A frozen text encoder encodes each caption alone, cached or not: CPU
        GEMM kernels can give a row other last bits by its position in a batch (seen on AMD EPYC: one caption at rows
        0 and 2 of one batch), so only an embedding computed alone is the same whichever batch asks for it (cache ==
        --no-cache, resumed == uninterrupted, to the bit). A text encoder under training encodes the batch at once."""
        if self.text_trains:
            return self.backbone.encode_text(captions)
        table = self.text if self.text is not None else {}
        missing = [c for c in dict.fromkeys(captions) if c not in table]
        with torch.no_grad() if self.text is not None else contextlib.nullcontext():
            for c in missing:
                table[c] = {k: v for k, v in self.backbone.encode_text([c]).items() if v is not None}
        return {k: torch.cat([table[c][k] for c in captions]) for k in table[captions[0]]}

    def batch(self, indices: list[int], positions: list[int], step_key: tuple[int, ...], prior: bool = False):
        """Latents, conditioning, noise and timesteps of one micro-batch; `positions` index the global batch."""
        cfg, b = self.cfg, self.backbone
        latents, captions, masks = [], [], []
        for i, pos in zip(indices, positions, strict=True):
            r = rng(cfg.seed, *step_key, pos, int(prior))
            flip = cfg.flip and r.random() < 0.5
            mean, std = self.latent_dist(i, flip)
            g = torch_generator(cfg.seed, *step_key, pos, int(prior), 1)
            latents.append(mean + std * torch.randn(mean.shape, generator=g))
            captions.append(self.caption(self.examples[i].caption, r, prior))
            mask = None
            if self.examples[i].mask is not None:
                mask = load(self.examples[i], self.plan.sizes[i], flip)[1]
            masks.append(mask)
        x0 = torch.cat(latents)
        noise, timesteps = [], []
        for pos in positions:
            g = torch_generator(cfg.seed, *step_key, pos, int(prior), 2)
            n = torch.randn(x0.shape[1:], generator=g)
            if cfg.noise_offset:  # per-channel offset: lets the model learn very dark / bright images
                n = n + cfg.noise_offset * torch.randn(x0.shape[1], 1, 1, generator=g)
            noise.append(n)
            timesteps.append(b.sample_time(g))  # a DDPM timestep index, or a flow-matching sigma
        return {
            "x0": x0, "noise": torch.stack(noise), "timesteps": torch.tensor(timesteps), "captions": captions,
            "weights": objective.mask_weights(masks, tuple(x0.shape), cfg.mask_floor),
            "size": self.plan.sizes[indices[0]], "prior": torch.full((len(indices),), prior),
            "time_ids": torch.tensor([sdxl_time_ids(self.examples[i].size, self.plan.sizes[i]) for i in indices],
                                     dtype=torch.float32),
        }  # fmt: skip


def per_sample_loss(cfg: TrainConfig, backbone: Backbone, batcher: Batcher, batch: dict,
                    base_target: bool = False) -> torch.Tensor:  # fmt: skip
    """Per-sample loss of one micro-batch. With `base_target` the target is the base model's own prediction (every
    adapter off) on the same noisy input and caption, instead of the noise: prior preservation by distillation."""
    noisy, model_timesteps, target = backbone.noising(batch["x0"], batch["noise"], batch["timesteps"])
    if base_target:
        modules = [m for m in backbone.pipe.components.values() if isinstance(m, torch.nn.Module)]
        with torch.no_grad(), lora_disabled(*modules):
            target = backbone.predict(noisy, model_timesteps, batcher.encode(batch["captions"]), batch["size"],
                                      batch.get("time_ids"))  # fmt: skip
    cond = batcher.encode(batch["captions"])
    pred = backbone.predict(noisy, model_timesteps, cond, batch["size"], batch.get("time_ids"))
    losses = objective.per_sample_mse(pred, target, batch["weights"])
    if cfg.min_snr_gamma:  # diffusion only: for_architecture refuses it with flow matching
        ac = backbone.alphas_cumprod
        snr = objective.snr(batch["timesteps"], ac)
        losses = losses * objective.min_snr_weight(snr, cfg.min_snr_gamma, backbone.prediction_type)
    return losses


def for_architecture(cfg: TrainConfig, backbone: Backbone) -> TrainConfig:
    """The config this architecture trains with: SD3/FLUX take the `dit` preset where a UNet preset (kohya, locon)
    was asked for, and refuse what does not apply to them (one clear error before anything is written)."""
    arch = backbone.arch
    if backbone.objective != "flow":
        return cfg
    if cfg.mode in ("textual-inversion", "pivotal"):
        raise ConfigError("mode", cfg.mode, f"it is not supported for {arch} yet; it trains in lora and dreambooth")
    if cfg.min_snr_gamma:
        raise ConfigError("min_snr_gamma", cfg.min_snr_gamma, f"it does not apply to {arch}: it trains with flow "
                          "matching, which has no SNR weighting; leave {min_snr_gamma} unset")  # fmt: skip
    if cfg.text_encoder_rank and arch == "flux":
        raise ConfigError("text_encoder_rank", cfg.text_encoder_rank, "it is not supported for flux yet (only its "
                          "transformer trains); leave it at 0")  # fmt: skip
    if cfg.targets in ("kohya", "locon"):
        print(f"{arch}: {cfg.targets!r} is a UNet preset; training the transformer with 'dit'", file=sys.stderr)
        cfg = replace(cfg, targets="dit")
    return cfg


def outputs(cfg: TrainConfig) -> list[Path]:
    """The files a run writes when it ends: what the mode produces, and the resolved config beside it."""
    return output_files(cfg) + [cfg.beside_output(".config.toml")]


def interrupted_outputs(cfg: TrainConfig) -> list[Path]:
    """With --resume, what a run killed while writing its outputs left: the config (and a pivotal sidecar) without
    the LoRA (or embedding file), which write_outputs writes last, as the commit point. The resumed run replaces
    them."""
    main, *rest = outputs(cfg)
    return [p for p in rest if p.exists()] if cfg.resume and not main.exists() else []


def check_before_loading(cfg: TrainConfig, inputs: Sequence[str | os.PathLike] = ()) -> dict[str, str]:
    """Refuse now, before the model loads, what would fail or be lost later: an existing output (without force), an
    output that is or lies in an input (the data, a local model, `inputs`: always), a missing optional package (an
    optimizer's: OPTIONAL_PACKAGES), the checkpoints or samples of an earlier run (without force or resume), a
    missing or damaged checkpoint to resume from or one of another config, data or model, class images drawn with
    other settings, a folder option (logdir, class_data) naming a file.
    Returns the run's fingerprints (what its checkpoints record) when it saves or resumes checkpoints."""
    from ..formats import files
    from ..models import local_paths

    for name in ("model", "data", "output"):
        if not getattr(cfg, name):
            raise ConfigError(name, getattr(cfg, name), "it is required (a path)")
    if cfg.resume and not cfg.force and Path(cfg.output).exists():
        raise LoraKitError(f"{cfg.output}: the run has finished (its outputs are written); nothing to resume (with "
                           "--force it trains from the checkpoint again and replaces them)")  # fmt: skip
    leftovers = interrupted_outputs(cfg)
    for path in outputs(cfg):
        files.check_output(path, cfg.force or path in leftovers, [cfg.data, *inputs, *local_paths(cfg.model)])
    if cfg.mixed_precision == "fp16" and not _uses_cuda():  # the CPU has no fp16 autocast: one line, not a crash
        raise ConfigError("mixed_precision", "fp16", "it needs a CUDA GPU; use bf16 or no on the CPU")
    _optional_package(cfg.optimizer)
    if "none" != cfg.quantize_base or "none" != cfg.quantize_text_encoders:
        from ..quantize import torchao

        torchao()  # (missing: one line now, not after the model has loaded)
    distributed.check(cfg)
    for name in ("logdir", "class_data"):
        _check_folder(cfg, name)
    if uses_prior(cfg):  # class images drawn with another prompt, model, ...
        check_class_folder(cfg)
    prints = fingerprints(cfg) if cfg.save_every or cfg.resume else {}
    if cfg.resume:
        check_resume(cfg, prints)
        return prints
    validates = cfg.validation_prompt and cfg.validate_every
    for folder, used in ((cfg.checkpoint_dir, cfg.save_every), (cfg.samples_dir, validates)):
        if used and not cfg.force and folder.is_dir() and any(folder.iterdir()):
            raise LoraKitError(f"{folder}: holds an earlier run's files (use --force to overwrite, or --resume)")
    return prints


def _check_folder(cfg: TrainConfig, name: str) -> None:
    """A folder option (logdir, class_data) naming a file, or a path under a file, is refused now: making the folder
    would fail only after the model has loaded."""
    value = getattr(cfg, name)
    if value is None:
        return
    for path in (Path(value), *Path(value).parents):
        if path.exists():
            if not path.is_dir():
                where = "it names a file" if path == Path(value) else f"{path} is a file"
                raise ConfigError(name, value, f"{where}; it must be a folder (made if missing)")
            return


def _uses_cuda() -> bool:
    from accelerate.utils import parse_flag_from_env

    return torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")


def make_accelerator(cfg: TrainConfig):
    """An Accelerator in cfg's precision. accelerate keeps one process-wide state that refuses another precision, so
    a second train() in the same process (a notebook comparing precisions) resets it first; the processes stay."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != cfg.mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not _uses_cuda())
    distributed.enable_on_cpu(accelerator)
    return accelerator


def make_scheduler(cfg: TrainConfig, optimizer):
    """The LR scheduler of --lr-scheduler; constant with --warmup-steps warms up (diffusers' "constant" would drop
    the warmup without a word)."""
    from diffusers.optimization import get_scheduler

    schedule = "constant_with_warmup" if cfg.lr_scheduler == "constant" and cfg.warmup_steps else cfg.lr_scheduler
    return get_scheduler(schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)


OPTIONAL_PACKAGES = {"adamw8bit": "bitsandbytes", "lion8bit": "bitsandbytes", "prodigy": "prodigyopt",
                     "schedulefree": "schedulefree"}  # fmt: skip


def _optional_package(optimizer: str):
    """The optional package an optimizer needs (None for those of torch and transformers), or one line saying it is
    missing: check_before_loading asks first, so a run without it stops before the model loads and class images are
    drawn."""
    import importlib

    name = OPTIONAL_PACKAGES.get(optimizer)
    if name is None:
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        raise LoraKitError(f"optimizer {optimizer} needs {name} (pip install {name})") from None


def make_optimizer(cfg: TrainConfig, recipe: Recipe):
    """--optimizer's optimizer over the recipe's groups, at --lr and --weight-decay (schedule-free: in train mode)."""
    groups, common = recipe.groups, dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    package = _optional_package(cfg.optimizer)
    if cfg.optimizer == "adamw8bit":
        return package.optim.AdamW8bit(groups, **common)
    if cfg.optimizer == "lion8bit":
        return package.optim.Lion8bit(groups, **common)
    if cfg.optimizer == "prodigy":
        with contextlib.redirect_stdout(io.StringIO()):  # (it prints "Using decoupled weight decay")
            return package.Prodigy(groups, **common)
    if cfg.optimizer == "schedulefree":
        optimizer = package.AdamWScheduleFree(groups, **common)
        optimizer.train()
        return optimizer
    if cfg.optimizer == "adafactor":  # at a fixed --lr (its own relative step and scaling off), as kohya's presets
        from transformers.optimization import Adafactor

        return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False, **common)
    return torch.optim.AdamW(groups, fused=_fusable(recipe.trainable()), **common)


def _fusable(params) -> bool:
    """torch's fused AdamW (one kernel over every tensor, on the CPU too: about 5x faster than the loop of the
    default, foreach, form there) where every trainable tensor is a floating-point tensor on a device it supports."""
    supported = torch.utils._foreach_utils._get_fused_kernels_supported_devices()
    return bool(params) and all(p.is_floating_point() and p.device.type in supported for p in params)


def train(
    cfg: TrainConfig, callbacks: list[Callable] | None = None, pipe=None, inputs: Sequence[str | os.PathLike] = ()
) -> list[Path]:
    """Run one training job; returns the files written. `callbacks` are called as cb(step, loss, context);
    `inputs`: other files the job reads, never overwritten (lora-train's --config)."""
    from tqdm import tqdm

    from ..models import open_pipeline, refuse_guessed_prediction

    prints = check_before_loading(cfg, inputs)
    accelerator = make_accelerator(cfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % world:
        raise LoraKitError(f"batch_size {cfg.batch_size} must be a multiple of the {world} processes")
    examples, skipped = scan(cfg.data, cfg.instance_prompt)
    # the frozen base in the training precision (a model saved in fp16 trains in fp32 unless asked otherwise)
    base_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    pipe = pipe or open_pipeline(cfg.model, base_dtype, cfg.prediction_type, cfg.allow_pickle)
    refuse_guessed_prediction(pipe, cfg.model, cfg.prediction_type)
    pipe.set_progress_bar_config(disable=True)
    quantized = quantize_pipeline(pipe, cfg.quantize_base, cfg.quantize_text_encoders)  # (before the move: the
    # full-precision weights need never fit the device)
    pipe.to(accelerator.device)
    backbone = Backbone(pipe, cfg.clip_skip)
    cfg = for_architecture(cfg, backbone)
    prior_examples = class_examples(cfg, pipe, accelerator) if uses_prior(cfg) else []
    torch.manual_seed(cfg.seed)  # the adapters' initial values: the same in every process and every rerun
    recipe = build(cfg, pipe)
    if cfg.gradient_checkpointing:
        backbone.enable_gradient_checkpointing(text_encoders=recipe.text_trains)
    if cfg.compile:  # (after the adapters: they are traced into the blocks' graphs)
        backbone.compile_blocks()
    if accelerator.is_main_process:
        check_space(cfg, recipe)
    plan = Plan(examples, cfg.batch_size, cfg.resolution, backbone.size_step, cfg.seed, cfg.buckets)
    batcher = Batcher(cfg, backbone, examples, plan, cfg.cache and not recipe.text_trains, recipe.text_trains)
    prior_plan = prior_batcher = None
    if prior_examples:
        prior_plan = Plan(prior_examples, cfg.batch_size, cfg.resolution, backbone.size_step, cfg.seed + 1,
                          cfg.buckets)  # fmt: skip
        cached = batcher.text is not None
        prior_batcher = Batcher(cfg, backbone, prior_examples, prior_plan, cached, recipe.text_trains)
    # --offload-blocks: blocks streamed from now on (after the adapters: they stay), the VAE and text encoders cached
    offload = offload_blocks.start(cfg, backbone, [batcher, prior_batcher], accelerator.device)  # (None: off)
    # fp16 loss scaling lives in the wrapper; under FSDP accelerate shards the UNet or transformer with it
    optimizer = distributed.prepare(accelerator, recipe, backbone.main, make_optimizer(cfg, recipe))
    sharded = distributed.sharded(accelerator)
    scheduler = make_scheduler(cfg, optimizer)
    scaler = accelerator.scaler  # fp16 on a GPU: the loss scale, saved and restored with the optimizer
    ema = EMA(cfg.ema, recipe.trainable()) if cfg.ema else None
    start = 0
    if cfg.resume:
        with distributed.gathered(accelerator, backbone.main, optimizer):
            start = load_checkpoint(cfg, recipe, pipe, optimizer, scheduler, scaler, prints, ema)
    trainable = recipe.trainable()
    context = {"cfg": cfg, "pipe": pipe, "accelerator": accelerator, "skipped": skipped, "optimizer": optimizer,
               "weights": lambda: evaluated(recipe, optimizer, ema)}  # fmt: skip
    callbacks = default_callbacks(cfg) + list(callbacks or [])
    if accelerator.is_main_process:
        if cfg.force and not cfg.resume:  # a new run replaces the earlier one's checkpoints, now that it can start
            clear_earlier_run(cfg)
        names = ", ".join(str(p) for p in skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        note = f"; skipped {len(skipped)} unreadable image(s): {names}" if skipped else ""
        how = distributed.described(accelerator, backbone.main)
        print(f"training {cfg.mode} on {len(examples)} images in {world} processes{how}{note}", file=sys.stderr)
        for name, what in quantized.items():
            print(f"{name}: {what}", file=sys.stderr)
    # the main process's bar only, and only on a terminal (None: as every lora_kit command), so a log holds no bar
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=cfg.mode, file=sys.stderr,
               disable=None if accelerator.is_main_process else True)  # fmt: skip
    last_checkpoint = None
    try:
        for step in bar:
            # adapter dropout draws its masks from torch's global RNG (CPU and CUDA): seeded from (seed, step, process)
            # at every step, so a resumed run draws what an uninterrupted one drew (each process draws its own masks)
            torch.manual_seed(hash((cfg.seed, step, rank, 3)) & 0x7FFFFFFFFFFFFFFF)
            recipe.before_step(step)
            total = 0.0
            for micro in range(cfg.grad_accum):
                key = (step, micro)
                global_idx = plan.batch(step * cfg.grad_accum + micro)
                positions = list(range(rank, cfg.batch_size, world))
                batch = batcher.batch([global_idx[p] for p in positions], positions, key)
                with accelerator.autocast():
                    losses, is_prior = per_sample_loss(cfg, backbone, batcher, batch), batch["prior"]
                    if prior_plan is not None:
                        prior_idx = prior_plan.batch(step * cfg.grad_accum + micro)
                        pbatch = prior_batcher.batch([prior_idx[p] for p in positions], positions, key, prior=True)
                        base_target = cfg.prior_target == "base"
                        losses = torch.cat(
                            [losses, per_sample_loss(cfg, backbone, prior_batcher, pbatch, base_target)]
                        )
                        is_prior = torch.cat([is_prior, pbatch["prior"]])
                loss = objective.combine(losses, is_prior, cfg.prior_loss_weight)
                accelerator.backward(loss / cfg.grad_accum)
                total += loss.detach().item() / cfg.grad_accum
            if world > 1 and not sharded:  # data parallel: average the gradients (FSDP has reduced them)
                for p in trainable:
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= world
            if world > 1:  # the loss reported: the mean over the processes
                total = accelerator.reduce(torch.tensor(total, device=accelerator.device), reduction="mean").item()
            if not math.isfinite(total):
                where = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else ""
                raise LoraKitError(f"the loss became {total} at step {step + 1}; training stopped{where}")
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_([p for p in trainable if p.grad is not None], cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            recipe.after_step()
            if ema is not None:
                ema.update()
            done = step + 1
            bar.set_postfix(loss=f"{total:.4f}")
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                with distributed.gathered(accelerator, backbone.main, optimizer):  # (FSDP: every process gathers)
                    if accelerator.is_main_process:
                        last_checkpoint = save_checkpoint(cfg, done, recipe, pipe, optimizer, scheduler, scaler,
                                                          prints, ema)  # fmt: skip
            if accelerator.is_main_process:
                for cb in callbacks:
                    cb(done, total, context)
    finally:  # (a failed run leaves no token-row hook on a pipeline the caller passed in, nor a block parked)
        recipe.finish()
        if offload is not None:
            offload.close()
    accelerator.wait_for_everyone()
    # the EMA (or schedule-free's average) is what gets written, whole (FSDP: every process gathers)
    with evaluated(recipe, optimizer, ema), distributed.gathered(accelerator, backbone.main, optimizer):
        return write_outputs(cfg, recipe, pipe, quantized) if accelerator.is_main_process else []


SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def check_space(cfg: TrainConfig, recipe: Recipe) -> None:
    """Refuse, before the first step, a run whose files will not fit: once the adapters exist the size of what it
    writes is known (the trainable tensors in --save-dtype, a header entry each; a checkpoint holds them in fp32 with
    AdamW's two moments, and the EMA), and a full disk found when the run ends loses the run."""
    import shutil

    params = recipe.trainable()
    n, entries = sum(p.numel() for p in params), 64 * 1024 + 512 * len(params)  # headers, metadata, the config
    sizes = {Path(cfg.output).parent: n * SAVE_DTYPES[cfg.save_dtype].itemsize + entries}
    if cfg.save_every and cfg.save_every < cfg.steps:
        sizes[cfg.checkpoint_dir] = (4 if cfg.ema else 3) * 4 * n + entries
    need: dict[int, list] = {}  # per filesystem: [a folder on it, bytes]
    for folder, size in sizes.items():
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        need.setdefault(os.stat(existing).st_dev, [existing, 0])[1] += size
    for folder, size in need.values():
        free = shutil.disk_usage(folder).free
        if free < size:
            raise LoraKitError(f"{cfg.output}: {folder} has {free / 1e6:.1f} MB free, and this run writes about "
                               f"{size / 1e6:.1f} MB there; free some space first")  # fmt: skip


def write_outputs(cfg: TrainConfig, recipe: Recipe, pipe, quantized: dict[str, str] | None = None) -> list[Path]:
    """Write outputs(cfg), all or none: if one fails, the ones this call created are removed; the LoRA (or embedding
    file) is written last, so that it is there only when the rest is (interrupted_outputs). `quantized`: what
    quantize_pipeline held quantized, recorded in the metadata (the file applies to the unquantized base)."""
    from ..formats import files

    dtype = SAVE_DTYPES[cfg.save_dtype]
    metadata = {"config": cfg.to_dict(), "targets": cfg.targets, "mode": cfg.mode}
    if quantized:  # what it trained on; kohya's flag for its fp8 base too
        metadata["quantized_base"] = quantized
        metadata["ss_fp8_base"] = str(cfg.quantize_base == "fp8")
    if cfg.token:
        metadata["trigger_words"] = [cfg.token]
    for p in interrupted_outputs(cfg):
        p.unlink()
    paths = outputs(cfg)
    new = [p for p in paths if not p.exists()]
    try:  # the config first, the LoRA last: a run killed between them has no LoRA, so --resume finishes it
        config = files.write_atomic(paths[-1], cfg.to_toml().encode(), force=cfg.force)
        return save_outputs(cfg, recipe, pipe, dtype, metadata) + [config]
    except BaseException:
        for p in new:
            p.unlink(missing_ok=True)
        raise
