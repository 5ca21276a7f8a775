"""Captions by template, by CLIP tags (phrases ranked by image-text similarity), or by any local image-to-text model;
then the trigger word is put in.

Every captioner is called with a list of final (cropped) RGB images and their source paths and returns one caption
per image. Models run with greedy decoding, so the same image and model always give the same caption.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import LoraKitError
from .loading import load_model, load_processor, model_config, quiet_transformers, to_device

# What chat models (LLaVA, Qwen2-VL, SmolVLM, ...) are asked when no --caption-prompt is given.
DEFAULT_INSTRUCTION = "Describe this image in one sentence."


def build(config, device: str | None = None, dtype=None):
    """The captioner the config asks for; models are loaded (and checked) here, before anything is written."""
    if config.caption == "template":
        return TemplateCaptioner(config.template, config.token)
    if config.caption == "clip-tags":
        return ClipTagger(config.clip_model, read_tags(config.tags), config.top_k, device, dtype, config.batch_size)
    return ModelCaptioner(config.caption_model, config.caption_prompt, config.max_new_tokens, device, dtype,
                          config.batch_size)  # fmt: skip


def apply_token(caption: str, token: str | None, replace: list[str] | None = None) -> str:
    """Put the trigger word in: as a substitute for any of `replace` (whole words, any case), else in front, unless
    the caption already has it."""
    if not token:
        return caption
    if replace:
        # a function, not the token itself: subn would read a backslash in the token as a group reference
        new, n = token_pattern(*replace, ignore_case=True).subn(lambda _: token, caption)
        if n:
            return new
    if token_pattern(token).search(caption):
        return caption
    return f"{token}, {caption}" if caption else token


def token_pattern(*words: str, ignore_case: bool = False) -> re.Pattern:
    """Any of `words` as a whole word, the one rule of where a caption has a trigger word (lora-ppim, lora-train):
    "sks" is in "sks, a dog" and "a (sks)", not in "asks" or "sks_1"."""
    alternatives = "|".join(map(re.escape, words))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE if ignore_case else 0)


def filename_words(path: Path) -> str:
    """'red_dog-01.jpg' -> 'red dog': the stem split on _ - . and spaces, pure numbers dropped (IMG_0042)."""
    words = [w for w in re.split(r"[_\-.\s]+", Path(path).stem) if w and not w.isdigit()]
    return " ".join(words)


def read_tags(path: str | None) -> list[str]:
    if path is None:
        from .tags import TAGS

        return list(TAGS)
    p = Path(path)
    if not p.is_file():
        raise LoraKitError(f"--tags {path}: no such file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise LoraKitError(f"--tags {path}: not a UTF-8 text file (one phrase per line)") from None
    tags = list(dict.fromkeys(t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")))
    if not tags:
        raise LoraKitError(f"--tags {path}: no phrases in it (one phrase per line)")
    return tags


class TemplateCaptioner:
    """`a photo of {token}` with {token} and {filename} filled in; no model."""

    def __init__(self, template: str, token: str | None):
        self.template = template
        self.token = token

    def __call__(self, images, sources) -> list[str]:
        out = []
        for src in sources:
            text = " ".join(self.template.format(token=self.token or "", filename=filename_words(src)).split())
            out.append(text)
        return out


class ClipTagger:
    """Caption-free tagging: the `top_k` phrases of a vocabulary with the highest CLIP similarity, best first."""

    def __init__(self, path: str, tags: list[str], top_k: int, device: str, dtype, batch_size: int = 4):
        from transformers import CLIPConfig, CLIPModel

        config = model_config(path, "--clip-model")
        if not isinstance(config, CLIPConfig):
            raise LoraKitError(f"--clip-model {path}: a {config.model_type!r} model, not a CLIP model (CLIPModel)")
        self.model = load_model(CLIPModel, path, "--clip-model", device, dtype)
        self.processor = load_processor(path, "--clip-model")
        if not hasattr(self.processor, "image_processor") or not hasattr(self.processor, "tokenizer"):
            raise LoraKitError(f"--clip-model {path}: needs both an image processor and a tokenizer (CLIPProcessor)")
        self.tags, self.top_k, self.device, self.dtype = tags, min(top_k, len(tags)), device, dtype
        self.batch_size = batch_size
        self.text_features = self._embed_tags()

    def _embed_tags(self):
        import torch

        max_len = self.model.config.text_config.max_position_embeddings
        feats = []
        with torch.no_grad(), quiet_transformers():
            for i in range(0, len(self.tags), 256):
                t = self.processor.tokenizer(self.tags[i : i + 256], padding=True, truncation=True, max_length=max_len,
                                             return_tensors="pt")  # fmt: skip
                feats.append(_features(self.model.get_text_features(**to_device(t, self.device, self.dtype))))
        f = torch.cat(feats).float()
        return f / f.norm(dim=-1, keepdim=True)

    def __call__(self, images, sources) -> list[str]:
        import torch

        out = []
        with torch.no_grad(), quiet_transformers():
            for i in range(0, len(images), self.batch_size):
                px = self.processor.image_processor(images=images[i : i + self.batch_size], return_tensors="pt")
                f = _features(self.model.get_image_features(**to_device(px, self.device, self.dtype))).float()
                scores = (f / f.norm(dim=-1, keepdim=True)) @ self.text_features.T
                # stable: equal scores keep vocabulary order, so captions do not depend on the sort implementation
                order = torch.argsort(-scores.cpu(), dim=-1, stable=True)[:, : self.top_k]
                out += [", ".join(self.tags[j] for j in row.tolist()) for row in order]
        return out


class ModelCaptioner:
    """Any local transformers image-to-text model (GIT, BLIP/BLIP-2, Florence-2, LLaVA-style chat models, ...),
    loaded through the Auto classes and decoded greedily."""

    def __init__(self, path: str, prompt: str | None, max_new_tokens: int, device: str, dtype, batch_size: int = 4):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        )

        config = model_config(path, "--caption-model")
        kind = config.model_type
        if kind in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            cls = AutoModelForImageTextToText
        elif kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and getattr(config, "vision_config", None) is not None:
            cls = AutoModelForCausalLM  # vision models registered only as causal LMs
        else:
            raise LoraKitError(f"--caption-model {path}: a {kind!r} model is not an image-to-text model "
                               "(e.g. GIT, BLIP-2, Florence-2, LLaVA)")  # fmt: skip
        self.processor = load_processor(path, "--caption-model")
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if not hasattr(self.processor, "image_processor") or self.tokenizer is None:
            raise LoraKitError(f"--caption-model {path}: needs a processor with an image processor and a tokenizer "
                               "(processor_config.json / preprocessor_config.json)")  # fmt: skip
        self.model = load_model(cls, path, "--caption-model", device, dtype)
        self.encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        if not self.encoder_decoder:
            self.tokenizer.padding_side = "left"  # a batch of prompts must end where generation starts
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.device, self.dtype, self.batch_size = device, dtype, batch_size

    def _texts(self, n: int) -> list[str] | None:
        """One text per image: the chat template around the instruction for chat models, else the plain prompt."""
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}, {"type": "text", "text": self.prompt or DEFAULT_INSTRUCTION}]
            text = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=False)  # fmt: skip
            return [text] * n
        return None if self.prompt is None else [self.prompt] * n

    def __call__(self, images, sources) -> list[str]:
        import torch

        out = []
        with torch.no_grad(), quiet_transformers():
            for i in range(0, len(images), self.batch_size):
                batch = images[i : i + self.batch_size]
                texts = self._texts(len(batch))
                kw = {"text": texts, "padding": True} if texts is not None else {}
                inputs = to_device(self.processor(images=batch, return_tensors="pt", **kw), self.device, self.dtype)
                ids = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens)
                prompt_ids = inputs.get("input_ids")
                if not self.encoder_decoder and prompt_ids is not None and ids.shape[1] >= prompt_ids.shape[1]:
                    if torch.equal(ids[:, : prompt_ids.shape[1]], prompt_ids):
                        ids = ids[:, prompt_ids.shape[1] :]  # decoder-only models echo the prompt
                for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True):
                    text = " ".join(text.split())
                    if self.prompt and text.lower().startswith(self.prompt.lower()):
                        text = text[len(self.prompt) :].strip()  # some encoder-decoders repeat a text prefix
                    out.append(text)
        return out


def _features(output):
    """transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor."""
    return output if hasattr(output, "norm") else output.pooler_output
