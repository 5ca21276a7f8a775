"""Textual-inversion tokens in a tokenizer + text encoder pair: add, get, set and remove.

A token with n vectors becomes n tokenizer entries named as diffusers names them: `<tok>`, `<tok>_1`, ...,
`<tok>_{n-1}` (diffusers' `maybe_convert_prompt` expands `<tok>` in a prompt to all of them). New tokens take the ids
after the tokenizer's last one and the embedding matrix grows by exactly that many rows, so removing them restores
the tokenizer and the matrix bit-exactly. No file I/O here: `formats/embeddings.py` reads and writes the files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .errors import LoraKitError


def expand(token: str, n: int) -> list[str]:
    """The tokenizer entries of a token with n vectors: `<tok>`, `<tok>_1`, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def _matrix(text_encoder: nn.Module) -> torch.Tensor:
    return text_encoder.get_input_embeddings().weight


def check_new(
    tokenizer,
    text_encoder: nn.Module,
    embeddings: Mapping[str, torch.Tensor],
    where: str = "",
    leaving: Sequence[str] = (),
) -> None:
    """Raise LoraKitError unless every token of `embeddings` ({token: (n, d)}) can be added as a new token.
    `leaving`: tokenizer entries that will be removed first (those of an adapter being replaced), so free."""
    where = f"{where}: " if where else ""
    vocab = tokenizer.get_vocab()
    rows, width = _matrix(text_encoder).shape
    if rows != len(tokenizer):
        # new ids must be new rows; with a padded matrix they would land on (and later delete) existing rows
        raise LoraKitError(
            f"{where}{type(text_encoder).__name__} has {rows} embedding rows but its tokenizer {len(tokenizer)} "
            "tokens; lora_kit adds tokens only where the two agree"
        )
    seen: set[str] = set()
    for token, vectors in embeddings.items():
        if vectors.dim() != 2 or vectors.shape[0] == 0 or vectors.shape[1] != width:
            raise LoraKitError(
                f"{where}embedding {token!r} has shape {tuple(vectors.shape)}; {type(text_encoder).__name__} needs "
                f"(n, {width})"
            )
        if not torch.isfinite(vectors).all():
            raise LoraKitError(f"{where}embedding {token!r} holds NaN or inf")
        for entry in expand(token, vectors.shape[0]):
            if entry in vocab and entry not in leaving:
                raise LoraKitError(f"{where}token {entry!r} already exists in the tokenizer; choose another token")
            if entry in seen:
                raise LoraKitError(f"{where}token {entry!r} is given twice")
            seen.add(entry)


def add_tokens(tokenizer, text_encoder: nn.Module, embeddings: Mapping[str, torch.Tensor]) -> list[str]:
    """Add every {token: (n, d)} as n new tokens with those rows; returns the tokenizer entries added, in id order.

    Everything is checked first (a token that already exists is an error, as in diffusers), so on error nothing
    has changed.
    """
    check_new(tokenizer, text_encoder, embeddings)
    entries, rows = [], []
    for token, vectors in embeddings.items():
        entries += expand(token, vectors.shape[0])
        rows.append(vectors)
    start = len(tokenizer)
    added = tokenizer.add_tokens(entries)
    ids = tokenizer.convert_tokens_to_ids(entries)
    if added != len(entries) or ids != list(range(start, start + len(entries))):
        raise LoraKitError(f"the tokenizer did not give {entries} the ids after its last one")  # never seen; be loud
    # mean_resizing=False: the new rows are overwritten at once, so sampling them from the old rows' covariance
    # would only cost time (a 49408 x 768 covariance for SD)
    text_encoder.resize_token_embeddings(start + len(entries), mean_resizing=False)
    weight = _matrix(text_encoder)
    with torch.no_grad():
        weight[start:] = torch.cat(rows).to(weight.dtype)
    return entries


def token_ids(tokenizer, entries: Sequence[str]) -> list[int]:
    vocab = tokenizer.get_vocab()
    missing = [e for e in entries if e not in vocab]
    if missing:
        raise LoraKitError(f"tokens {missing} are not in the tokenizer")
    return [vocab[e] for e in entries]


def _entries(tokenizer, token: str) -> list[str]:
    """`<tok>`, `<tok>_1`, ... as far as the tokenizer has them (diffusers' rule for multi-vector tokens)."""
    added = tokenizer.get_added_vocab()
    if token not in tokenizer.get_vocab():
        raise LoraKitError(f"token {token!r} is not in the tokenizer")
    entries = [token]
    while f"{token}_{len(entries)}" in added:
        entries.append(f"{token}_{len(entries)}")
    return entries


def get_embedding(tokenizer, text_encoder: nn.Module, token: str) -> torch.Tensor:
    """The (n, d) vectors of `token` (`<tok>`, `<tok>_1`, ...), detached copies."""
    ids = token_ids(tokenizer, _entries(tokenizer, token))
    return _matrix(text_encoder).detach()[ids].clone()


def set_embedding(tokenizer, text_encoder: nn.Module, token: str, vectors: torch.Tensor) -> None:
    """Overwrite the rows of an existing token; `vectors` must have its shape (n, d)."""
    ids = token_ids(tokenizer, _entries(tokenizer, token))
    weight = _matrix(text_encoder)
    if tuple(vectors.shape) != (len(ids), weight.shape[1]):
        raise LoraKitError(
            f"token {token!r} has {len(ids)} vectors of width {weight.shape[1]}, got {tuple(vectors.shape)}"
        )
    with torch.no_grad():
        weight[ids] = vectors.to(weight.dtype)


def remove_tokens(tokenizer, text_encoder: nn.Module, entries: Sequence[str]) -> None:
    """Remove tokenizer entries and their embedding rows; later added tokens move down so ids stay row numbers.

    Removing what `add_tokens` added (in any order relative to other additions) gives back the tokenizer and the
    embedding matrix exactly as they were.
    """
    ids = token_ids(tokenizer, entries)
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise LoraKitError(f"cannot remove tokens from a {type(tokenizer).__name__} (no `tokenizers` backend)")
    base = tokenizer.vocab_size  # ids below this belong to the BPE model itself, not to added tokens
    if min(ids) < base:
        raise LoraKitError(f"tokens {list(entries)} are part of the tokenizer's own vocabulary, not added tokens")
    from tokenizers import Tokenizer

    # the `tokenizers` library cannot delete an added token: rewrite its JSON without them, renumbering the rest
    spec = json.loads(backend.to_str())
    gone = set(ids)
    kept = []
    for entry in spec["added_tokens"]:
        if entry["id"] in gone:
            continue
        entry["id"] -= sum(1 for i in gone if i < entry["id"])
        kept.append(entry)
    spec["added_tokens"] = kept
    weight = _matrix(text_encoder)
    keep = [i for i in range(weight.shape[0]) if i not in gone]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))
    with torch.no_grad():  # move the surviving rows up, then let transformers cut the tail (it keeps its config)
        weight[: len(keep)] = weight[keep].clone()
    text_encoder.resize_token_embeddings(len(keep), mean_resizing=False)
