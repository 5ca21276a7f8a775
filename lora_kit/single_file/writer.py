"""Write a pipeline as a single-file checkpoint, streamed: one tensor in flight, never a second state dict.

The layout is the input's (its prefixes, and every key the pipeline has no place for kept as it was: EMA weights,
SD2's unused last OpenCLIP layer, `logit_scale`, buffers), or for a pipeline opened from a folder the layout A1111 and
ComfyUI save for its architecture (sniff.LAYOUTS). Each tensor keeps the dtype the input stored it in unless a dtype
is given. The pipeline's configs (and any tokenizer whose vocabulary lora_kit does not ship) go into the header
(`lora_kit.pipeline`), so lora_kit opens the file again as exactly this pipeline; other readers ignore it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import LoraKitError
from . import layout
from .reader import PIPELINE_KEY, SOURCE_ATTR, Source, tensor_reader, tokenizer_slots
from .sniff import LAYOUTS

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}  # fmt: skip
NAMED_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def _op(tensors: list[torch.Tensor], op: str) -> torch.Tensor:
    t = tensors[0] if len(tensors) == 1 else torch.cat(tensors, 0)
    if op == "conv":
        return t.reshape(*t.shape, 1, 1)
    if op == "T":
        return t.T
    if op == "swap":
        a, b = t.chunk(2, 0)
        return torch.cat([b, a], 0)
    return t


def _shape(shapes: list[torch.Size], op: str) -> list[int]:
    first = list(shapes[0])
    first[0] = sum(s[0] for s in shapes) if first else 0
    if op == "conv":
        return first + [1, 1]
    if op == "T":
        return first[::-1]
    return first


def plan(
    pipe, components: dict[str, str], source: Source | None
) -> dict[str, tuple[list[int], torch.dtype, Callable]]:
    """{original key: (shape, dtype, a function giving the tensor)} for the components {name: prefix} of `pipe`;
    the dtype is the pipeline's (the writer casts)."""
    from ..models import architecture
    from ..state import components as parts_of

    arch = architecture(parts_of(pipe)) if source is None else (source.main.arch or source.main.part_arch)
    out = {}
    for comp, prefix in components.items():
        module = getattr(pipe, comp)
        namer = LAYOUTS[arch][comp][0]
        state = module.state_dict()
        names = [k for k in state if not k.endswith("position_ids")]
        config = dict(module.config) if hasattr(module.config, "keys") else module.config.to_dict()
        try:
            table = layout.original_keys(names, namer, config, prefix)
        except KeyError as e:
            raise LoraKitError(f"{comp}: parameter {e.args[0]} has no place in a {arch} checkpoint") from None
        for key, parts in table.items():
            tensors = [state[name] for name, _ in parts]
            op = parts[0][1]
            shape = _shape([t.shape for t in tensors], op)
            out[key] = (shape, tensors[0].dtype, lambda ts=tensors, op=op: _op([t.detach() for t in ts], op))
    return out


def write_single_file(
    pipe, output: str | os.PathLike, *, dtype: torch.dtype | None = None, metadata: dict | None = None,
    force: bool = False, inputs: tuple = (),
) -> Path:  # fmt: skip
    """Write `pipe` to `output` as one checkpoint (the layout of the file it was opened from, if any); atomic."""
    from ..formats import files
    from ..models import architecture
    from ..state import components as parts_of

    out = Path(output)
    files.check_output(out, force, list(inputs))
    source: Source | None = getattr(pipe, SOURCE_ATTR, None)
    if source is not None:
        comps = {c: prefix for c, (cp, prefix) in source.slots.items() if cp is source.main}
        input_dtypes, kept = source.main.dtypes, dict(source.main.shapes)
        stored_meta = {k: v for k, v in source.main.metadata.items() if k != PIPELINE_KEY}
    else:
        arch = architecture(parts_of(pipe))
        comps = {c: prefix for c, (_, prefix) in LAYOUTS[arch].items() if getattr(pipe, c, None) is not None}
        input_dtypes, kept, stored_meta = {}, {}, {}
    entries = plan(pipe, comps, source)
    for key in entries:
        kept.pop(key, None)
    # keys the pipeline has no place for (EMA, buffers, SD2's last OpenCLIP layer): as they were, read when written
    passthrough = tensor_reader(source.main.path) if source is not None and kept else None
    header_meta = stored_meta | {k: str(v) for k, v in (metadata or {}).items()}
    header_meta[PIPELINE_KEY] = json.dumps(_config_files(pipe))
    rows = []
    for key, (shape, own, fn) in entries.items():
        stored = NAMED_DTYPES.get(input_dtypes.get(key, ""), own)
        rows.append((key, shape, _cast(stored, dtype), fn))
    for key, shape in kept.items():
        stored = NAMED_DTYPES.get(input_dtypes.get(key, ""))
        if stored is None:  # a pickle's dtype names: read the tensor for it
            stored = passthrough(key).dtype
        rows.append((key, shape, _cast(stored, dtype), lambda key=key: passthrough(key)))
    return stream(out, rows, header_meta, force)


def _cast(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and stored.is_floating_point else stored


def stream(
    out: Path, rows: list[tuple[str, list[int], torch.dtype, Callable]], metadata: dict[str, str], force: bool = False
) -> Path:
    """Write a safetensors file tensor by tensor (header first, from shapes and dtypes), to a temp file renamed into
    place; a full disk or a failure leaves nothing behind."""
    import math

    from ..formats import files

    header, offset = {"__metadata__": metadata}, 0
    for key, shape, dtype, _ in rows:
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def fill(f) -> None:
        from tqdm.auto import tqdm

        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, shape, dtype, fn in tqdm(rows, desc=f"writing {out.name}", unit="tensor", leave=False):
            t = fn().to(dtype).contiguous()
            if list(t.shape) != list(shape):
                raise LoraKitError(f"{out}: {key} came out {list(t.shape)}, not {list(shape)}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    return files.write_with(out, fill, force)


def _config_files(pipe) -> dict[str, str]:
    """{relative path: text} of the pipeline's config files (model_index.json, each component's config, and the
    tokenizers whose vocabulary lora_kit does not ship: OpenAI's CLIP and T5 v1.1 are left to tokenizers.py)."""
    from .tokenizers import VOCAB_FILES, is_shipped

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pipe.save_config(folder)
        index = json.loads((folder / "model_index.json").read_text())
        for name, value in index.items():
            module = getattr(pipe, name, None) if isinstance(value, list) else None  # (not its config attributes)
            if module is None:
                continue
            sub = folder / name
            if name in tokenizer_slots(index):
                module.save_pretrained(sub)
                if is_shipped(module):  # its settings only: the vocabulary is lora_kit's own (tokenizers.py)
                    for big in VOCAB_FILES:
                        (sub / big).unlink(missing_ok=True)
            elif hasattr(module, "save_config"):  # diffusers models and schedulers
                module.save_config(sub)
            elif hasattr(module, "config") and hasattr(module.config, "save_pretrained"):
                module.config.save_pretrained(sub)
        return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}
