"""The training configuration: one flat, typed dataclass shared by every mode, validated on creation.

`lora-train` fills it from a TOML file and then from its flags (flags win); the resolved config is saved next to
the output as `<output stem>.config.toml`, and its fingerprint guards `--resume` against a different run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import LoraKitError

MODES = ("lora", "dreambooth", "textual-inversion", "pivotal")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
PRECISIONS = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")
SAVE_DTYPES = ("fp16", "bf16", "fp32")
PRIOR_TARGETS = ("images", "base")
INITS = ("kaiming", "gaussian")


def split_prompts(text: str) -> list[str]:
    """Several prompts written as one: "a|b|c" -> ["a", "b", "c"] (blank ones dropped)."""
    return [p.strip() for p in text.split("|") if p.strip()]


@dataclass
class TrainConfig:
    model: str = ""  # diffusers folder or hub id
    data: str = ""  # folder of images (+ .txt captions or a lora-ppim manifest.jsonl)
    output: str = ""  # the LoRA file; checkpoints go to <stem>-checkpoints/
    mode: str = "lora"
    steps: int = 500  # all optimizer steps, --ti-steps included
    batch_size: int = 1
    grad_accum: int = 1
    resolution: int = 512  # buckets keep about resolution^2 pixels at the image's aspect ratio
    buckets: bool = True  # aspect-ratio buckets; False = square centre crops
    flip: bool = False  # random horizontal flip (both orientations are cached)
    cache: bool = True  # cache VAE latents and frozen text embeddings: the largest single speed-up
    # adapters
    rank: int = 16
    alpha: float | None = None  # None = rank (scale 1)
    targets: str = "kohya"  # UNet preset (attn, kohya, locon); transformers use dit
    conv_rank: int | None = None  # for locon's kxk convs (kohya conv_dim)
    conv_alpha: float | None = None
    text_encoder_rank: int = 0  # 0 = text encoders not trained (lora/dreambooth)
    text_encoder_alpha: float | None = None
    text_encoder_targets: str = "clip-attn"
    dropout: float = 0.0  # on the adapter input
    init: str = "kaiming"  # initial down factors: kaiming-uniform (kohya, peft's default) or gaussian std 1/rank
    # optimisation
    lr: float = 1e-4
    text_encoder_lr: float | None = None  # None = lr
    ti_lr: float = 5e-3  # the embeddings' learning rate (textual inversion, pivotal)
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # 0 = no clipping
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    # objective
    min_snr_gamma: float | None = None  # Min-SNR weighting (5.0 is the paper's value); None = plain MSE
    noise_offset: float = 0.0
    mask_floor: float = 0.1  # loss weight outside a subject mask
    # captions
    instance_prompt: str | None = None  # used for images without a caption
    caption_dropout: float = 0.0  # share of steps trained on the empty caption (for guidance)
    shuffle_captions: bool = False  # shuffle comma-separated tags after the first keep_tokens
    keep_tokens: int = 0
    clip_skip: int = 1  # 2 = penultimate CLIP layer (SD1 anime models)
    # dreambooth
    class_prompt: str | None = None  # several, separated by "|": class image i takes prompt i mod n
    class_guidance: float | None = None  # guidance scale of the class images (None: the pipeline's default)
    class_data: str | None = None  # default: <output stem>-class-images/
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    prior_target: str = "images"  # images: the class images' own noise (DreamBooth); base: the base model's prediction
    # textual inversion / pivotal
    token: str | None = None
    init_token: str | None = None  # initialise the new vectors from this word's embedding
    num_vectors: int = 1
    ti_steps: int = 0  # pivotal: steps of embeddings only before LoRA joins
    # checkpoints, validation, logging
    save_every: int = 0  # 0 = only the final file
    save_limit: int = 0  # keep the newest N checkpoints (0 = all)
    resume: str | None = None  # "latest" or a checkpoint folder
    validation_prompt: str | None = None
    validate_every: int = 0
    validation_steps: int = 20  # denoising steps of validation samples
    logdir: str | None = None  # tensorboard (when installed) and a loss CSV
    save_dtype: str = "fp16"
    force: bool = False  # overwrite an existing output
    extra: dict = field(default_factory=dict)  # free-form notes saved in the file metadata

    def __post_init__(self):
        def bad(name, allowed):
            value = getattr(self, name)
            raise LoraKitError(f"config {name}={value!r} is not allowed; {allowed}")

        for name, allowed in (("mode", MODES), ("lr_scheduler", SCHEDULERS), ("mixed_precision", PRECISIONS),
                              ("optimizer", OPTIMIZERS), ("save_dtype", SAVE_DTYPES),
                              ("prior_target", PRIOR_TARGETS), ("init", INITS)):  # fmt: skip
            if getattr(self, name) not in allowed:
                bad(name, f"choose one of {', '.join(allowed)}")
        for name in ("steps", "batch_size", "grad_accum", "resolution", "num_vectors"):
            if getattr(self, name) < 1:
                bad(name, "it must be at least 1")
        for name in ("rank",):
            if getattr(self, name) < 1:
                bad(name, "it must be at least 1")
        for name in ("text_encoder_rank", "save_every", "validate_every", "ti_steps", "warmup_steps", "save_limit"):
            if getattr(self, name) < 0:
                bad(name, "it must be 0 or more")
        for name in ("caption_dropout", "dropout", "mask_floor"):
            if not 0 <= getattr(self, name) <= 1:
                bad(name, "it must be in [0, 1]")
        if self.lr <= 0:
            bad("lr", "it must be positive")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            bad("min_snr_gamma", "it must be positive (or unset)")
        if self.mode in ("textual-inversion", "pivotal") and not self.token:
            raise LoraKitError(f"config mode={self.mode!r} needs token (the new word to learn, e.g. '<sks>')")
        if self.class_prompt and not split_prompts(self.class_prompt):
            bad("class_prompt", "it names no prompt")
        if self.mode == "dreambooth" and not self.class_prompt:
            raise LoraKitError("config mode='dreambooth' needs class_prompt (e.g. 'a photo of a dog')")
        if self.mode == "pivotal" and self.ti_steps >= self.steps:
            bad("ti_steps", f"pivotal needs ti_steps < steps ({self.steps}) so LoRA trains too")
        if self.clip_skip < 1:
            bad("clip_skip", "it must be at least 1 (1 = last layer)")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise LoraKitError(f"unknown config keys {unknown}; see lora-train --help")
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | os.PathLike, overrides: dict | None = None) -> TrainConfig:
        import tomllib

        p = Path(path)
        if not p.is_file():
            raise LoraKitError(f"{p}: no such config file")
        try:
            values = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise LoraKitError(f"{p}: not valid TOML ({e})") from None
        values = {k.replace("-", "_"): v for k, v in values.items()}
        values.update(overrides or {})
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_toml(self) -> str:
        lines = []
        for key, value in self.to_dict().items():
            if value is None or key in ("force", "resume") or (key == "extra" and not value):
                continue
            lines.append(f"{key} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"

    def fingerprint(self) -> str:
        """What a checkpoint must share with the run that resumes it: everything that shapes the model or the data
        order (not steps, checkpoint or logging settings)."""
        loose = {"steps", "save_every", "save_limit", "resume", "validation_prompt", "validate_every",
                 "validation_steps", "logdir", "force", "output", "save_dtype", "extra"}  # fmt: skip
        kept = {k: v for k, v in self.to_dict().items() if k not in loose}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def checkpoint_dir(self) -> Path:
        out = Path(self.output)
        return out.with_name(out.stem + "-checkpoints")
