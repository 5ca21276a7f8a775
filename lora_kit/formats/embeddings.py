"""Textual-inversion embedding files: sniff, read into {component: {token: (n, d)}}, write.

Read (safetensors, or pickles with allow_pickle):
- diffusers `{token: (n, d)}` (also cloneofsimo's `.ti.pt` `{token: (d,)}`), one or more tokens;
- A1111 `{"string_to_param": {"*": (n, d)}, "name": ..., ...}`;
- kohya `{"emb_params": (n, d)}`;
- SDXL `{"clip_l": (n, 768), "clip_g": (n, 1280)}` (clip_l -> text_encoder, clip_g -> text_encoder_2);
- tensors flagged "<embed>" in the metadata of a cloneofsimo LoRA `.safetensors`, and its `x.ti.pt` beside `x.pt`.
Files that do not name their token (A1111, kohya, SDXL) get the `token` argument or the file stem, as A1111 does (a
pivotal sidecar `x.emb.safetensors` gives `x`); lora_kit's SDXL files list their tokens in `lora_kit.tokens`. A
token without a component goes to the first text encoder whose width fits.

Write: diffusers `{token: (n, d)}` for one text encoder, `{clip_l, clip_g}` for two (what A1111, ComfyUI and
diffusers' SDXL pivotal tuning read).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import LoraKitError
from . import files
from .legacy import EMBED_FLAG, is_legacy

SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}
TOKENS_KEY = "lora_kit.tokens"  # JSON [[token, n_vectors], ...] in the order of the rows
SIDECAR = ".emb.safetensors"
_NAMED = ("string_to_param", "emb_params", *SDXL_KEYS)


def encoders(target) -> dict[str, tuple[object, nn.Module]]:
    """{component: (tokenizer, text encoder)} of a pipeline; {} for a bare module (it has no tokenizer)."""
    if isinstance(target, nn.Module):
        return {}
    out = {}
    for component, tok_name in TOKENIZERS.items():
        encoder, tokenizer = getattr(target, component, None), getattr(target, tok_name, None)
        if isinstance(encoder, nn.Module) and tokenizer is not None and hasattr(encoder, "get_input_embeddings"):
            out[component] = (tokenizer, encoder)
    return out


def _widths(target) -> dict[str, int]:
    return {c: enc.get_input_embeddings().weight.shape[1] for c, (_, enc) in encoders(target).items()}


def sidecar(path: str | os.PathLike) -> Path:
    """Where pivotal tuning puts the embeddings of LoRA `x.safetensors`: `x.emb.safetensors`."""
    p = Path(path)
    return p.with_name(p.name[: -len(p.suffix)] + SIDECAR if p.suffix else p.name + SIDECAR)


def default_token(path: str | os.PathLike) -> str:
    name = Path(path).name
    return name[: -len(SIDECAR)] if name.endswith(SIDECAR) else Path(name).stem


def looks_like(shapes: Mapping[str, object], metadata: Mapping[str, str], widths: set[int]) -> bool:
    """Is this {key: shape (or a non-tensor value)} a TI embedding rather than a LoRA?

    Named layouts (string_to_param, emb_params, clip_l/clip_g) always are; otherwise every key must be free of
    "lora", hold a 1-2-dim tensor as wide as one of the text encoders (or be flagged "<embed>" by cloneofsimo).
    """
    if not shapes or is_legacy(shapes):
        return False
    if any(k in shapes for k in _NAMED):
        return True
    if all(metadata.get(k) == EMBED_FLAG for k in shapes):
        return True
    return all(
        "lora" not in k.lower() and isinstance(s, tuple) and len(s) in (1, 2) and s[-1] in widths
        for k, s in shapes.items()
    )


def _load(p: Path, allow_pickle: bool) -> tuple[dict, dict[str, str]]:
    if p.suffix in files.PICKLES:
        obj = files.load_pickle(p, allow_pickle)
        if not isinstance(obj, dict):
            raise LoraKitError(f"{p}: not a textual-inversion embedding (the pickle holds a {type(obj).__name__})")
        return obj, {}
    return files.load(p)


def is_embedding_file(path: str | os.PathLike, target, allow_pickle: bool = False) -> bool:
    """Sniff without side effects: safetensors by header only; a pickle only when allowed (else False: the LoRA
    reader then says how to allow it)."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix in files.PICKLES:
        obj, metadata = files.load_pickle(p, allow_pickle) if allow_pickle else None, {}
        if not isinstance(obj, dict):  # cloneofsimo's LoRA lists, or not allowed: the LoRA reader has the say
            return False
        shapes = {str(k): tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in obj.items()}
    else:
        header, metadata = files.read_header(p)
        shapes = {k: tuple(e["shape"]) for k, e in header.items()}
    return looks_like(shapes, metadata, set(_widths(target).values()))


def _tensor(value, what: str, source: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() not in (1, 2):
        raise LoraKitError(f"{source}: {what} must be a float tensor of shape (d,) or (n, d)")
    return value.detach().reshape(-1, value.shape[-1]).float()


def _split(vectors: torch.Tensor, metadata: Mapping[str, str], token: str | None, source: str) -> dict:
    """Rows of an unnamed block -> {token: rows}: by `lora_kit.tokens`, else one token named `token`."""
    if token is None and metadata.get(TOKENS_KEY):
        try:
            spec = [(str(t), int(n)) for t, n in json.loads(metadata[TOKENS_KEY])]
        except (ValueError, TypeError):
            raise LoraKitError(f"{source}: metadata {TOKENS_KEY} must be [[token, n], ...]") from None
        if sum(n for _, n in spec) != vectors.shape[0]:
            raise LoraKitError(
                f"{source}: {TOKENS_KEY} counts {sum(n for _, n in spec)} vectors, the file has {len(vectors)}"
            )
        out, start = {}, 0
        for t, n in spec:
            out[t] = vectors[start : start + n]
            start += n
        return out
    return {token or default_token(source): vectors}


def entries(
    obj: Mapping, metadata: Mapping[str, str], source: str, token: str | None = None
) -> list[tuple[str, torch.Tensor, str | None]]:
    """A loaded TI file -> [(token, (n, d) fp32 vectors, component or None)], checked without a model: a known
    layout, float tensors, SDXL's clip_l and clip_g both there (as A1111 requires) with rows split by
    `lora_kit.tokens`. Component None: the first text encoder as wide as the vectors (parse places them)."""
    extra = sorted(set(obj) - set(_NAMED))
    if "string_to_param" in obj:  # A1111; its other keys (name, step, string_to_token, ...) are bookkeeping
        params = obj["string_to_param"]
        if not isinstance(params, Mapping) or list(params) != ["*"]:
            raise LoraKitError(f"{source}: string_to_param must be {{'*': tensor}}")
        return [(token or default_token(source), _tensor(params["*"], "string_to_param['*']", source), None)]
    if any(k in obj for k in SDXL_KEYS):
        if extra:
            raise LoraKitError(f"{source}: SDXL embedding with unknown keys {extra[:3]} (only clip_l, clip_g)")
        missing = [k for k in SDXL_KEYS if k not in obj]
        if missing:
            raise LoraKitError(f"{source}: SDXL embedding without {missing[0]} (it needs both clip_l and clip_g)")
        found = []
        for key, component in SDXL_KEYS.items():
            rows = _split(_tensor(obj[key], key, source), metadata, token, source)
            found += [(tok, vectors, component) for tok, vectors in rows.items()]
        return found
    if "emb_params" in obj:  # kohya
        if extra:
            raise LoraKitError(f"{source}: kohya embedding with unknown keys {extra[:3]} (only emb_params)")
        return [(token or default_token(source), _tensor(obj["emb_params"], "emb_params", source), None)]
    # diffusers {token: vectors}, cloneofsimo <embed> tensors
    if token is not None and len(obj) != 1:
        raise LoraKitError(f"{source}: holds {len(obj)} tokens; token= renames only a file with one")
    found = [(token or str(key), _tensor(value, f"embedding {key!r}", source), None) for key, value in obj.items()]
    if not found:
        raise LoraKitError(f"{source}: holds no embeddings")
    return found


def parse(
    obj: Mapping, metadata: Mapping[str, str], target, source: str, token: str | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """A loaded TI file -> {component: {token: (n, d) fp32}} for `target`'s text encoders (checked: known layout,
    widths fit; whether the tokens are new is checked when they are added)."""
    widths = _widths(target)
    if not widths:
        raise LoraKitError(
            f"{source}: a textual-inversion embedding needs a pipeline with a tokenizer and text encoder"
        )
    placed: dict[str, dict[str, torch.Tensor]] = {}
    for tok, vectors, component in entries(obj, metadata, source, token):
        d = vectors.shape[1]
        if component is None:  # the first text encoder as wide as the vectors
            component = next((c for c, w in widths.items() if w == d), None)
            if component is None:
                raise LoraKitError(f"{source}: embedding {tok!r} has width {d}, which fits no text encoder {widths}")
        elif component not in widths:
            raise LoraKitError(f"{source}: has vectors for a {component}, which this pipeline does not have")
        elif widths[component] != d:
            raise LoraKitError(f"{source}: {tok!r} has width {d} but the {component} needs {widths[component]}")
        placed.setdefault(component, {})[tok] = vectors
    return placed


def read_unplaced(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {token: (n, d)}} of a safetensors TI file without a model (lora-merge's sidecars): checked as
    `read` checks it; tokens that do not say their text encoder are the first one's (`text_encoder`)."""
    p = files.check_input(path)
    obj, metadata = files.load(p)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for tok, vectors, component in entries(obj, metadata, str(p)):
        out.setdefault(component or "text_encoder", {})[tok] = vectors
    return out


def read(
    path: str | os.PathLike, target, *, token: str | None = None, allow_pickle: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """A TI embedding file -> {component: {token: (n, d)}} placed on `target`'s text encoders."""
    p = files.check_input(path)
    obj, metadata = _load(p, allow_pickle)
    return parse(obj, metadata, target, str(p), token)


def read_bundled(
    path: str | os.PathLike, target, token: str | None = None, allow_pickle: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """Embeddings that travel with LoRA file `path`: the `x.emb.safetensors` sidecar, tensors a cloneofsimo
    `.safetensors` flags "<embed>", and cloneofsimo's `x.ti.pt` beside `x.pt`. {} when there are none, or when
    `target` is a bare module (which takes only its own part of a file, and has no tokenizer for tokens)."""
    p = Path(path)
    out: dict[str, dict[str, torch.Tensor]] = {}
    if not encoders(target) or not p.is_file():
        return out
    if p.suffix == ".safetensors":
        _, metadata = files.read_header(p)
        flagged = sorted(k for k, v in metadata.items() if v == EMBED_FLAG)
        if flagged:
            tensors, _ = files.load(p)
            out = parse({k: tensors[k] for k in flagged if k in tensors}, {}, target, str(p))
        sides = [sidecar(p)]
    elif p.suffix == ".pt":  # cloneofsimo's triple: x.pt, x.text_encoder.pt, x.ti.pt
        sides = [p.with_name(p.name[: -len(".pt")].removesuffix(".text_encoder") + ".ti.pt")]
    else:
        sides = []
    for side in sides:
        if side.is_file():
            for component, embeds in read(side, target, token=token, allow_pickle=allow_pickle).items():
                clash = set(embeds) & set(out.get(component, {}))
                if clash:
                    raise LoraKitError(f"{side}: tokens {sorted(clash)} are also in {p}")
                out.setdefault(component, {}).update(embeds)
    return out


def write(
    path: str | os.PathLike, embeddings: Mapping[str, Mapping[str, torch.Tensor]], *, force: bool = False
) -> Path:
    """{component: {token: (n, d)}} -> a TI file: diffusers `{token: (n, d)}` for one text encoder, SDXL
    `{clip_l, clip_g}` (with the tokens in `lora_kit.tokens`) for text_encoder + text_encoder_2."""
    tensors, metadata = file_tensors(embeddings, path)
    files.check_output(path, force)
    return files.write_atomic(path, files.serialize(tensors, metadata), force)


def file_tensors(
    embeddings: Mapping[str, Mapping[str, torch.Tensor]],
    path: str | os.PathLike,
    owners: Mapping[str, os.PathLike] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the TI file `write` makes, checked so that a model can load it: the vectors of one
    text encoder share a width, SDXL's two hold the same tokens. Callers that write other files first (lora-merge)
    call it before any of them; `owners` ({token: file it came from}) lets a refusal name those files."""
    comps = {c: dict(e) for c, e in embeddings.items() if e}
    if not comps:
        raise LoraKitError(f"{path}: no embeddings to write")
    for component, embeds in comps.items():
        widths = {t: v.shape[-1] for t, v in embeds.items()}
        if len(set(widths.values())) > 1:
            a, wa = next(iter(widths.items()))
            b, wb = next((t, w) for t, w in widths.items() if w != wa)
            where, other = (owners[b], f" in {owners[a]}") if owners else (path, "")
            raise LoraKitError(
                f"{where}: the {component} token {b!r} is {wb} wide but {a!r}{other} is {wa}: they are for different "
                f"text encoders, and no model loads them from one file ({path})"
            )
    if len(comps) == 1:
        (embeds,) = comps.values()
        tensors = {t: v.detach().reshape(-1, v.shape[-1]).contiguous() for t, v in embeds.items()}
        metadata = {"format": "pt"}
    elif set(comps) == set(SDXL_KEYS.values()):
        spec = {c: [(t, v.reshape(-1, v.shape[-1]).shape[0]) for t, v in e.items()] for c, e in comps.items()}
        if spec["text_encoder"] != spec["text_encoder_2"]:
            raise LoraKitError(f"{path}: SDXL embeddings need the same tokens and vector counts in both text encoders")
        tensors = {
            key: torch.cat([v.detach().reshape(-1, v.shape[-1]) for v in comps[c].values()]).contiguous()
            for key, c in SDXL_KEYS.items()
        }
        metadata = {"format": "pt", TOKENS_KEY: json.dumps(spec["text_encoder"])}
    else:
        raise LoraKitError(
            f"{path}: cannot write embeddings for {sorted(comps)} in one file (one encoder or SDXL's two)"
        )
    return tensors, metadata
