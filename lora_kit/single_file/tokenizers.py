"""The tokenizers a single-file checkpoint does not carry: OpenAI's CLIP vocabulary, rebuilt from the BPE merges
lora_kit ships (lora_kit/assets/tokenizers), so that SD1/SD2/SDXL/SD3/FLUX checkpoints open with no download."""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

MERGES = Path(__file__).resolve().parents[1] / "assets" / "tokenizers" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_vocab(folder: Path) -> None:
    """vocab.json and merges.txt of the exact OpenAI CLIP tokenizer (ids as openai/clip-vit-large-patch14)."""
    folder.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(MERGES).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def write_clip_tokenizer(folder: Path, *, pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> None:
    """A CLIP tokenizer folder as the SD repos hold it: `pad_token` is "<|endoftext|>" for OpenAI's CLIP-L and "!"
    for the OpenCLIP encoders (SD2, SDXL's and SD3's second tokenizer)."""
    write_clip_vocab(folder)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "pad_token": pad_token,
              "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "do_lower_case": True}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def is_standard_clip(tokenizer) -> bool:
    """True when `tokenizer` is OpenAI's CLIP vocabulary with nothing added (what write_clip_tokenizer rebuilds)."""
    if type(tokenizer).__name__ not in ("CLIPTokenizer", "CLIPTokenizerFast") or len(tokenizer) != CLIP_VOCAB_SIZE:
        return False
    return _standard_vocab() == tokenizer.get_vocab()


@lru_cache(maxsize=1)
def _standard_vocab() -> dict[str, int]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_vocab(Path(tmp))
        return json.loads((Path(tmp) / "vocab.json").read_text())
