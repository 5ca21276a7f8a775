"""The tokenizers a single-file checkpoint does not carry: OpenAI's CLIP vocabulary, rebuilt from the BPE merges
lora_kit ships, and T5 v1.1's (SD3's and FLUX's third/second), shipped compressed (lora_kit/assets/tokenizers), so
that SD1/SD2/SDXL/SD3/FLUX checkpoints open with no download. The settings of each (padding, length) are the config
folder's `tokenizer_config.json`; these functions add only the vocabulary files."""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tokenizers"
MERGES = ASSETS / "bpe_simple_vocab_16e6.txt.gz"
T5 = ASSETS / "t5_v1_1_tokenizer.json.gz"  # google/t5-v1_1-xxl's tokenizer.json (32,100 tokens; see README there)
CLIP_VOCAB_SIZE = 49408
T5_VOCAB_SIZE = 32100


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


def write_t5_vocab(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_bytes(gzip.open(T5).read())


_CLIP, _T5 = (write_clip_vocab, CLIP_VOCAB_SIZE), (write_t5_vocab, T5_VOCAB_SIZE)
VOCABULARIES = {"CLIPTokenizer": _CLIP, "CLIPTokenizerFast": _CLIP, "T5TokenizerFast": _T5, "T5Tokenizer": _T5}
VOCAB_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "spiece.model")


def add_vocabulary(folder: Path, cls_name: str) -> None:
    """Put the shipped vocabulary of a `cls_name` tokenizer into `folder` (which holds its settings), unless the
    folder has one of its own."""
    if cls_name in VOCABULARIES and not any((folder / f).is_file() for f in VOCAB_FILES):
        VOCABULARIES[cls_name][0](folder)


def is_shipped(tokenizer) -> bool:
    """True when `tokenizer`'s vocabulary is one lora_kit ships (OpenAI's CLIP, T5 v1.1) with nothing added: a file
    may then store the tokenizer's settings alone."""
    name = type(tokenizer).__name__
    if name not in VOCABULARIES or len(tokenizer) != VOCABULARIES[name][1]:
        return False
    return _shipped_vocab(name) == tokenizer.get_vocab()


@lru_cache(maxsize=4)
def _shipped_vocab(cls_name: str) -> dict[str, int]:
    import tempfile

    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        VOCABULARIES[cls_name][0](Path(tmp))
        return getattr(transformers, cls_name).from_pretrained(tmp).get_vocab()
