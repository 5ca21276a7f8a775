"""The training configuration: one flat, typed dataclass shared by every mode, validated on creation.

`lora-train` fills it from a TOML file and then from its flags (flags win); the resolved config is saved next to
the output as `<output stem>.config.toml`, and its fingerprint guards `--resume` against a different run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import SEED_MAX, SEED_RANGE, LoraKitError, word_problem

MODES = ("lora", "dreambooth", "textual-inversion", "pivotal")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
PRECISIONS = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "schedulefree", "lion8bit")
SAVE_DTYPES = ("fp16", "bf16", "fp32")
PRIOR_TARGETS = ("images", "base")
INITS = ("kaiming", "gaussian")
ADAPTERS = ("lora", "dora", "loha", "lokr")
PREDICTIONS = ("epsilon", "v_prediction")
QUANTIZATIONS = ("none", "fp8", "int8", "nf4")  # of the frozen base (quantize.py: the backend of each)


# allowed values of numeric fields; an unset (None) value is always fine
BOUNDS = (
    (("steps", "batch_size", "grad_accum", "rank", "conv_rank", "num_class_images", "validation_steps", "clip_skip"),
     lambda v: v >= 1, "it must be at least 1"),
    (("text_encoder_rank", "offload_blocks", "warmup_steps", "keep_tokens", "ti_steps", "save_every", "save_limit",
      "validate_every", "weight_decay", "max_grad_norm", "noise_offset", "prior_loss_weight", "class_guidance"),
     lambda v: v >= 0, "it must be 0 or more"),
    (("alpha", "conv_alpha", "text_encoder_alpha", "lr", "text_encoder_lr", "ti_lr", "min_snr_gamma"),
     lambda v: v > 0, "it must be above 0"),
    (("dropout", "caption_dropout", "mask_floor"), lambda v: 0 <= v <= 1, "it must be in [0, 1]"),
    (("ema",), lambda v: 0 < v < 1, "it must be between 0 and 1 (e.g. 0.999), both excluded"),
    (("lokr_factor",), lambda v: v == -1 or v >= 1, "it must be -1 (the most balanced split) or at least 1"),
    # upper bounds where a larger value fails mid-run: torch's seeds (errors.SEED_MAX); 8192 pixels a side is beyond
    # any GPU's memory already (larger overflowed PIL); a CLIP prompt holds 75 tokens between its start and end tokens
    # (more vectors were cut off, or overflowed)
    (("seed",), lambda v: 0 <= v <= SEED_MAX, f"it must be {SEED_RANGE}"),
    (("resolution",), lambda v: 1 <= v <= 8192, "it must be from 1 to 8192"),
    (("num_vectors",), lambda v: 1 <= v <= 75, "it must be from 1 to 75 (the tokens a CLIP prompt holds)"),
)  # fmt: skip
KIND_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", dict: "a table"}


class ConfigError(LoraKitError):
    """A bad value of one config field. `problem` names other fields as {field}; `explain` spells every field as the
    user gave it (lora-train: a flag or a key of the config file), str() as the TrainConfig field it is."""

    def __init__(self, name: str, value, problem: str):
        self.name, self.value, self.problem = name, value, problem
        super().__init__(self.explain(str))

    def explain(self, spell: Callable[[str], str]) -> str:
        names = {f.name: spell(f.name) for f in fields(TrainConfig)}
        return f"{spell(self.name)} is {self.value!r}; {self.problem.format_map(names)}"


def choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of each field that takes a name."""
    from ..targets import PRESETS  # imported here, not on top: `lora-train --help` must not load torch

    clip = tuple(p for p in PRESETS if p.startswith("clip-"))
    return {"mode": MODES, "lr_scheduler": SCHEDULERS, "mixed_precision": PRECISIONS, "optimizer": OPTIMIZERS,
            "save_dtype": SAVE_DTYPES, "prior_target": PRIOR_TARGETS, "init": INITS, "prediction_type": PREDICTIONS,
            "adapter": ADAPTERS, "quantize_base": QUANTIZATIONS, "quantize_text_encoders": QUANTIZATIONS,
            "targets": tuple(p for p in PRESETS if p not in clip), "text_encoder_targets": clip}  # fmt: skip


def _is(value, kind) -> bool:
    """isinstance, except that a bool is not a number (True is an int in Python, not in a config)."""
    if kind in (int, float):
        return isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def read_toml(path: str | os.PathLike) -> dict:
    """The values of a --config file ('-' in keys read as '_'); one error naming the file for what is not a config."""
    import tomllib

    p = Path(path)
    if not p.is_file():
        raise LoraKitError(f"{p}: no such config file")
    try:
        values = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LoraKitError(f"{p}: not valid TOML ({e})") from None
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise LoraKitError(f"{p}: unknown keys {unknown}; the keys are lora-train's options (see lora-train --help)")
    return values


def split_prompts(text: str) -> list[str]:
    """Several prompts written as one: "a|b|c" -> ["a", "b", "c"] (blank ones dropped)."""
    return [p.strip() for p in text.split("|") if p.strip()]


@dataclass
class TrainConfig:
    model: str = ""  # diffusers folder, hub id, toy, or single-file checkpoint(s) (comma-separated parts)
    prediction_type: str | None = None  # epsilon | v_prediction: overrides the model's (SD2 files cannot tell)
    allow_pickle: bool = False  # open a pickled .ckpt/.pt model (torch's weights-only loader)
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
    # the adapter kind: a LoRA pair, or LyCORIS's DoRA (LoRA + magnitude), LoHa, LoKr (kohya/LyCORIS names on disk)
    adapter: str = "lora"
    lokr_factor: int = -1  # LoKr: each dim splits as LyCORIS's factorization(dim, factor); -1 = most balanced
    lokr_full_w1: bool = True  # LoKr: w1 whole (LyCORIS's default); False: at rank where smaller (decompose_both)
    # optimisation
    lr: float = 1e-4
    text_encoder_lr: float | None = None  # None = lr
    ti_lr: float = 5e-3  # the embeddings' learning rate (textual inversion, pivotal)
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # 0 = no clipping
    ema: float | None = None  # decay of an fp32 moving average of the trainable tensors, written as the output
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the UNet's or transformer's repeated blocks (regional compilation)
    # memory: the frozen UNet/transformer (and text encoders) held quantized; repeated blocks kept off the device
    quantize_base: str = "none"  # fp8 | int8 | nf4: the UNet's or transformer's frozen linear layers
    quantize_text_encoders: str = "none"  # the same for the frozen text encoders
    offload_blocks: int = 0  # repeated blocks held off the execution device, each streamed in for its forward/backward
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
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value, kinds = getattr(self, f.name), typing.get_args(hints[f.name]) or (hints[f.name],)
            if not any(_is(value, kind) for kind in kinds):
                wanted = " or ".join(KIND_NAMES[k] for k in kinds if k is not type(None))
                raise ConfigError(f.name, value, f"it must be {wanted}")
            if float in kinds and type(value) is int:  # TOML's `alpha = 4`: the same config (and fingerprint) as 4.0
                setattr(self, f.name, float(value))
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f.name, value, "it must be a finite number")
        for name, allowed in choices().items():
            if getattr(self, name) not in allowed and not (name == "prediction_type" and self.prediction_type is None):
                raise ConfigError(name, getattr(self, name), f"choose one of {', '.join(allowed)}")
        for names, ok, rule in BOUNDS:
            for name in names:
                value = getattr(self, name)
                if value is not None and not ok(value):
                    raise ConfigError(name, value, rule)
        if self.mode in ("textual-inversion", "pivotal") and not self.token:
            raise ConfigError("mode", self.mode, "it needs {token} (the new word to learn, e.g. '<sks>')")
        for name in ("token", "init_token"):
            if getattr(self, name) is not None and (problem := word_problem(getattr(self, name))):
                raise ConfigError(name, getattr(self, name), problem)
        if self.init_token is not None and len(self.init_token.split()) > 1:
            # every vector would start from the mean of all the words' embeddings: one word says what is meant
            raise ConfigError("init_token", self.init_token, "it must be one word (the new vectors start from its "
                              "embedding, the mean of its pieces when the tokenizer splits it)")  # fmt: skip
        if self.class_prompt is not None and not split_prompts(self.class_prompt):
            raise ConfigError("class_prompt", self.class_prompt, "it names no prompt")
        if self.mode == "dreambooth" and not self.class_prompt:
            raise ConfigError("mode", self.mode, "it needs {class_prompt} (e.g. 'a photo of a dog')")
        self._check_adapter()
        if self.ema is not None and self.optimizer == "schedulefree":
            raise ConfigError("ema", self.ema, "schedulefree averages the weights itself (what it writes is its "
                              "average); leave {ema} unset or choose another {optimizer}")  # fmt: skip
        if self.mode == "pivotal" and self.ti_steps >= self.steps:
            raise ConfigError("ti_steps", self.ti_steps, "pivotal needs it below {steps} so that LoRA trains too")

    def _check_adapter(self) -> None:
        """What the adapter kinds other than lora do not take (refused, never ignored)."""
        if self.adapter == "lora":
            pass
        elif self.mode == "textual-inversion":
            raise ConfigError("adapter", self.adapter, "textual-inversion trains no adapters (only the new token's "
                              "vectors); leave {adapter} at lora or use {mode} pivotal")  # fmt: skip
        elif self.dropout:  # (LyCORIS's LoHa/LoKr have no input dropout either; the composed route applies none)
            raise ConfigError("dropout", self.dropout, f"input dropout applies to lora adapters only, not "
                              f"{self.adapter}; leave {{dropout}} at 0")  # fmt: skip
        elif self.init != "kaiming" and self.adapter != "dora":
            raise ConfigError("init", self.init, f"it sets LoRA's down factors (lora, dora); {self.adapter} starts "
                              "as LyCORIS's does: leave {init} unset")  # fmt: skip
        if self.adapter != "lokr":
            for name, default in (("lokr_factor", -1), ("lokr_full_w1", True)):
                if getattr(self, name) != default:
                    raise ConfigError(name, getattr(self, name), f"it applies to {{adapter}} lokr, not "
                                      f"{self.adapter}; leave it unset")  # fmt: skip

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
        """What a checkpoint must share with the run that resumes it: every setting that shapes the model or the data
        order (not steps, checkpoint or logging settings). The model and data are not their paths: checkpoints.py
        fingerprints their files (a folder spelled another way, or moved, is the same data); the class folder is
        taken resolved."""
        loose = {"steps", "save_every", "save_limit", "resume", "validation_prompt", "validate_every",
                 "validation_steps", "logdir", "force", "output", "save_dtype", "extra", "model", "data",
                 "allow_pickle", "offload_blocks"}  # fmt: skip
        kept = {k: v for k, v in self.to_dict().items() if k not in loose}
        if self.prediction_type is None:  # (as before the field existed: earlier checkpoints still resume)
            kept.pop("prediction_type")
        if self.adapter == "lora":  # (the same)
            kept.pop("adapter")
        if self.ema is None:  # (the same)
            kept.pop("ema")
        if not self.compile:  # (the same)
            kept.pop("compile")
        for key in ("quantize_base", "quantize_text_encoders"):  # (the same)
            if kept[key] == "none":
                kept.pop(key)
        for key in ("lokr_factor", "lokr_full_w1") if self.adapter != "lokr" else ():  # (defaults: _check_adapter)
            kept.pop(key)
        if self.class_data is not None:
            kept["class_data"] = str(Path(self.class_data).resolve())
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]

    def beside_output(self, suffix: str) -> Path:
        """A path next to the output named after it: `x.safetensors` -> `x<suffix>`."""
        out = Path(self.output)
        return out.with_name(out.stem + suffix)

    @property
    def checkpoint_dir(self) -> Path:
        return self.beside_output("-checkpoints")

    @property
    def samples_dir(self) -> Path:
        return self.beside_output("-samples")
