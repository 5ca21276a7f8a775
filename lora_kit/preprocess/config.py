"""The preprocessing configuration: one flat, typed dataclass, validated on creation (every `lora-ppim` flag)."""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, fields

from ..errors import LoraKitError, flag, word_problem
from .crop import BUCKET_STEP

CROPS = ("center", "subject", "random:N", "none")
CAPTIONS = ("template", "clip-tags", "model")
RESAMPLES = ("lanczos", "bicubic", "bilinear", "box")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "fp32", "fp16", "bf16")


TEMPLATE_FIELDS = ("token", "filename")
DEFAULT_MIN_SIZE = 256  # --min-size unless the crop is smaller


def template_fields(template: str) -> set[str]:
    """The fields a caption template uses; ValueError (naming the placeholder) for anything but a plain {token} or
    {filename}: attribute or index access ({token.upper}), conversions, format specs, other names, stray braces."""
    used = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        raise ValueError("a single { or }") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS or spec or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"{{{shown}}}")
        used.add(name)
    return used


@dataclass
class PreprocessConfig:
    input_dir: str = ""
    output_dir: str = ""
    resolution: str = "512"  # "512" (square) or "WxH"; with crop=none one number: lora-train's --resolution
    crop: str = "center"  # center | subject (centred on the mask) | random:N (N crops per image) | none (keep aspect)
    # crop=none writes each image at its lora-train bucket, whose sides are multiples of the model's step: 64 for
    # SD1.x/SD2.x, 32 for SDXL, 16 for SD3, FLUX and the toy model
    bucket_step: int = BUCKET_STEP
    upscale: bool = False  # enlarge images smaller than the crop instead of rejecting them ("too small")
    resample: str = "lanczos"  # plain resampling filter for images; masks always use bilinear
    # shorter side in pixels below which an image is rejected, upscaling or not; None: 256, or the crop's shorter
    # side where that is smaller (--resolution 64 takes 80 px photos)
    min_size: int | None = None
    background: str = "white"  # what transparent pixels are composited over (any PIL colour: "#808080")
    # captions
    caption: str = "template"
    template: str = "a photo of {token}"  # {token} = --token, {filename} = the words of the file name
    token: str | None = None  # trigger word: fills {token}, else prepended ("sks, ...") unless already present
    replace: str | None = None  # comma-separated words that the token replaces in generated captions
    clip_model: str | None = None  # local CLIP folder for caption=clip-tags
    tags: str | None = None  # file with one phrase per line; None = the built-in vocabulary
    top_k: int = 5  # clip-tags: the k best phrases, best first
    caption_model: str | None = None  # local image-to-text model folder for caption=model
    caption_prompt: str | None = None  # text the model continues / instruction for chat models; None = image only
    max_new_tokens: int = 40
    # masks
    mask: str | None = None  # CLIPSeg text prompt ("face"); None = no masks
    mask_model: str | None = None  # local CLIPSeg folder
    mask_threshold: float = 0.3  # probability >= threshold -> 1, else 0; 0 keeps the soft probabilities
    mask_blur: float = 0.0  # Gaussian blur radius in output pixels, applied after the threshold (soft edges)
    # running
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "auto"  # auto = fp16 on cuda/mps, fp32 on cpu
    batch_size: int = 4  # images per model call
    seed: int = 0  # random crops depend only on the seed and the image content
    force: bool = False  # replace an existing, non-empty lora-ppim output folder

    def __post_init__(self):
        def bad(name, allowed):
            raise LoraKitError(f"{flag(name)} {getattr(self, name)!r} is not allowed; {allowed}")

        for f in fields(self):  # click takes 'nan' and 'inf' as floats; no comparison below would refuse nan
            if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name)):
                bad(f.name, "it must be a finite number")
        for name, allowed in (("caption", CAPTIONS), ("resample", RESAMPLES), ("device", DEVICES),
                              ("dtype", DTYPES)):  # fmt: skip
            if getattr(self, name) not in allowed:
                bad(name, f"choose one of {', '.join(allowed)}")
        if not self.input_dir:
            bad("input_dir", "give the folder of images")
        if not self.output_dir:
            bad("output_dir", "give the folder to write")
        try:
            self.size  # noqa: B018 - parses resolution
        except ValueError:
            bad("resolution", "give a size like 512 or 768x512 (each side at least 8)")
        try:
            self.crop_mode  # noqa: B018 - parses crop
        except ValueError:
            bad("crop", f"choose one of {', '.join(CROPS)} (N a whole number >= 1)")
        if self.min_size is None:
            self.min_size = min(DEFAULT_MIN_SIZE, *self.size)
        if self.crop_mode == "none" and self.size[0] != self.size[1]:
            bad("resolution", "with --crop none give one number, lora-train's --resolution (each image is written "
                "at its bucket: about that squared in pixels, at its own aspect ratio)")  # fmt: skip
        for name in ("min_size", "top_k", "max_new_tokens", "batch_size", "bucket_step"):
            if getattr(self, name) < 1:
                bad(name, "it must be at least 1")
        if not 0 <= self.mask_threshold < 1:
            bad("mask_threshold", "it must be in [0, 1) (0 = soft masks)")
        if self.mask_blur < 0:
            bad("mask_blur", "it must be 0 or more")
        try:
            self.background_rgb  # noqa: B018 - parses background
        except ValueError:
            bad("background", "give a colour name (white, gray) or #rrggbb")
        if self.token is not None and (problem := word_problem(self.token)):
            bad("token", problem)
        if self.caption == "template":
            try:
                used = template_fields(self.template)
            except ValueError as e:
                bad("template", f"only plain {{token}} and {{filename}} may appear in braces, not {e} ({{{{ and }}}} "
                    "write a brace)")  # fmt: skip
            if "token" in used and not self.token:
                bad("template", "it uses {token}: give token (the trigger word), or a template without {token}")
        if self.caption == "clip-tags" and not self.clip_model:
            raise LoraKitError("--caption clip-tags needs --clip-model (a local CLIP model folder)")
        if self.caption == "model" and not self.caption_model:
            raise LoraKitError("--caption model needs --caption-model (a local image-to-text model folder)")
        if self.mask is not None and not self.mask.strip():
            bad("mask", "give a text prompt such as 'face'")
        if self.mask and not self.mask_model:
            raise LoraKitError(f"--mask {self.mask!r} needs --mask-model (a local CLIPSeg model folder)")
        if self.crop_mode == "subject" and not self.mask:
            raise LoraKitError("--crop subject needs --mask (the subject's text prompt) and --mask-model")
        if self.replace is not None and not self.replace_words:
            bad("replace", "give comma-separated words")
        if self.replace and not self.token:
            raise LoraKitError(f"--replace {self.replace!r} needs --token (what the words are replaced by)")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the crops."""
        m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(self.resolution))
        if not m:
            raise ValueError(self.resolution)
        w = int(m.group(1))
        h = int(m.group(2) or w)
        if min(w, h) < 8:
            raise ValueError(self.resolution)
        return w, h

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        from PIL import ImageColor

        return ImageColor.getrgb(self.background)[:3]

    @property
    def crop_mode(self) -> str:
        mode = self.crop.split(":", 1)[0]
        if mode not in ("center", "subject", "random", "none") or (mode == "random") != (":" in self.crop):
            raise ValueError(self.crop)
        self.crops_per_image  # noqa: B018 - parses N
        return mode

    @property
    def crops_per_image(self) -> int:
        if not self.crop.startswith("random:"):
            return 1
        n = int(self.crop.split(":", 1)[1])
        if n < 1:
            raise ValueError(self.crop)
        return n

    @property
    def replace_words(self) -> list[str]:
        return [w.strip() for w in (self.replace or "").split(",") if w.strip()]
