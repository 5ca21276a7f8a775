"""Files on disk: safetensors header reads without torch, validated loads, atomic writes, opt-in pickles.

Every problem with a file becomes one LoraKitError that names the file and what is wrong with it. Pickles (`.pt`,
`.bin`, ...) are unpickled only when the caller passes allow_pickle, and then with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from ..errors import LoraKitError

PICKLES = (".pt", ".ckpt", ".bin", ".pth")
_DTYPE_BITS = {  # every dtype safetensors 0.8 knows -> bits per element
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6,
    "F4": 4, "C64": 64, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8,
}  # fmt: skip


def check_input(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise LoraKitError(f"{p}: no such file")
    if p.is_dir():
        raise LoraKitError(f"{p}: is a folder, expected a .safetensors file")
    if not p.is_file():  # reading a named pipe blocks until a writer comes; a device never ends
        raise LoraKitError(f"{p}: not a regular file ({special_kind(p)}); expected a .safetensors file")
    return p


def special_kind(p: Path) -> str:
    """What a path that exists but is neither a folder nor a regular file is, in words."""
    if p.is_fifo():
        return "a named pipe"
    if p.is_socket():
        return "a socket"
    return "a device" if p.is_block_device() or p.is_char_device() else "a special file"


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """(tensor entries, metadata) of a safetensors file, checked against the file size; no torch needed."""
    p = check_input(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoraKitError(f"{p}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > size - 8 or n > 100_000_000:
            raise LoraKitError(f"{p}: not a safetensors file (bad header length {n} for a file of {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoraKitError(f"{p}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise LoraKitError(f"{p}: not a safetensors file (its header is not a JSON object)")
    metadata = _metadata(header.pop("__metadata__", None), p)
    _check_entries(header, size - 8 - n, p)
    return header, metadata


def _count(value) -> bool:
    """A whole number >= 0 as safetensors reads one (a JSON bool or float is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entries(header: dict, data_size: int, p: Path) -> None:
    """What safetensors checks of the tensor entries, so that a header read here is one safetensors loads: each a
    known dtype, a shape of whole numbers, [start, end] offsets holding prod(shape) elements, and the tensors,
    in the order of their offsets, covering the data exactly, without gaps or overlaps."""
    spans = []
    for key, entry in header.items():
        try:
            offsets, dtype, shape = entry["data_offsets"], entry["dtype"], entry["shape"]
            valid = isinstance(offsets, list) and len(offsets) == 2 and all(map(_count, offsets))
            valid = valid and isinstance(dtype, str) and isinstance(shape, list) and all(map(_count, shape))
        except (KeyError, TypeError):
            valid = False
        if not valid or offsets[0] > offsets[1]:
            raise LoraKitError(f"{p}: corrupt safetensors header (entry {key!r})")
        start, end = offsets
        if dtype not in _DTYPE_BITS:
            raise LoraKitError(f"{p}: tensor {key!r} has dtype {dtype!r}, which safetensors does not know")
        if end > data_size:
            raise LoraKitError(f"{p}: truncated: tensor {key!r} ends at byte {end} but the data holds {data_size}")
        if end - start != (math.prod(shape) * _DTYPE_BITS[dtype] + 7) // 8:
            raise LoraKitError(f"{p}: corrupt safetensors header (tensor {key!r} has the wrong byte size)")
        spans.append((start, end, key))
    covered = 0
    for start, end, key in sorted(spans):
        if start != covered:
            how = "overlaps another tensor" if start < covered else f"leaves {start - covered} bytes unused before it"
            raise LoraKitError(f"{p}: corrupt safetensors header (tensor {key!r} at bytes {start}-{end} {how})")
        covered = end
    if covered != data_size:
        what = f"the tensors cover {covered} of its {data_size} data bytes"
        raise LoraKitError(f"{p}: corrupt safetensors header ({what})")


def _metadata(metadata, p: Path) -> dict[str, str]:
    """The `__metadata__` entry: safetensors allows only a {str: str} object there."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        kind = type(metadata).__name__
        raise LoraKitError(f"{p}: corrupt safetensors header (__metadata__ is a {kind}, not a {{str: str}} object)")
    bad = next((k for k, v in metadata.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise LoraKitError(f"{p}: corrupt safetensors header (__metadata__ entry {bad!r} is not a string)")
    return metadata


def load(path: str | os.PathLike):
    """(tensors, metadata) of a validated safetensors file, on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _, metadata = read_header(path)
    try:
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraKitError(f"{path}: cannot read safetensors ({e})") from None


def load_pickle(path: str | os.PathLike, allow_pickle: bool = False):
    """The object in a torch pickle, loaded with weights_only=True (tensors, lists, dicts, numbers, strings only)."""
    import pickle

    import torch

    p = check_input(path)
    if not allow_pickle:
        raise LoraKitError(
            f"{p}: pickled files are not read unless you ask: pass allow_pickle=True (--allow-pickle) to load it "
            "with torch.load(weights_only=True), or convert it to safetensors"
        )
    try:
        with warnings.catch_warnings():  # torch's notes on odd pickles: the error below says what matters
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to unpickle: bytes that are no pickle fail as KeyError, struct.error, ...
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, pickle.UnpicklingError | RuntimeError | OSError | EOFError | ValueError):
            raise LoraKitError(f"{p}: not a torch pickle (unpickling it failed: {type(e).__name__} {first})") from None
        raise LoraKitError(f"{p}: cannot load this pickle with weights_only=True ({first})") from None


def tensor_dict(obj, source) -> dict:
    """A pickled {name: tensor} (e.g. diffusers' pytorch_lora_weights.bin), checked."""
    import torch

    if not isinstance(obj, dict) or not obj or not all(isinstance(t, torch.Tensor) for t in obj.values()):
        raise LoraKitError(f"{source}: not a LoRA file lora_kit knows (the pickle holds no {{name: tensor}} dict)")
    return {str(k): t for k, t in obj.items()}


def check_output(path: str | os.PathLike, force: bool = False, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Refuse an existing output (unless force), a folder, an output that is one of the `inputs` or lies in one
    that is a folder (a model, a dataset: never overwritten, even with force), or an output folder that is missing
    or not writable."""
    p = Path(path)
    if p.is_dir() or str(path).endswith(("/", os.sep)):
        raise LoraKitError(f"{path}: is a folder; give the file to write")
    if p.suffix in PICKLES:
        raise LoraKitError(f"{p}: lora_kit writes safetensors, which loaders refuse under a pickle name ({p.suffix})")
    for i in map(Path, inputs):
        inside = i.is_dir() and i.resolve() in p.resolve().parents
        if inside or (p.exists() and i.exists() and os.path.samefile(p, i)):
            raise LoraKitError(f"{p}: is {'in ' if inside else ''}the input {i}, never overwritten; write elsewhere")
    if p.exists() and not force:
        raise LoraKitError(f"{p}: already exists (use --force / force=True to overwrite)")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise LoraKitError(f"{p}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise LoraKitError(f"{p}: the folder {parent} is not writable")
    return p


def ordinary(path: str | os.PathLike) -> None:
    """Give a file or folder made by mkstemp / mkdtemp (private to the owner) the permissions an ordinary one
    gets from the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def serialize(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes of {name: tensor}. Tensors that share memory (one down read for a fused FLUX group's q/k/v,
    views of one up) are written as copies: safetensors refuses shared storage, and every key is its own tensor."""
    from safetensors.torch import save

    seen, own = set(), {}
    for key, t in tensors.items():
        t = t.contiguous()
        storage = (t.device, t.untyped_storage().data_ptr())
        own[key] = t.clone() if storage in seen and t.numel() else t
        seen.add(storage)
    return save(own, metadata=metadata)


def write_atomic(path: str | os.PathLike, data: bytes, force: bool = False) -> Path:
    """Write bytes to a temp file beside `path`, then rename: readers never see a partial file, and a failure (a
    full disk) leaves nothing behind and says so in one line."""
    return write_with(path, lambda f: f.write(data), force)


def write_with(path: str | os.PathLike, fill, force: bool = False) -> Path:
    """`fill(f)` writes the file's content to an open binary file: into a temp file beside `path`, renamed into
    place when it is complete (write_atomic's guarantees, for content written piece by piece)."""
    p = check_output(path, force)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        ordinary(tmp)
        os.replace(tmp, p)
    except OSError as e:
        raise LoraKitError(f"{p}: cannot write it ({e.strerror or e})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return p


def addnet_hashes(data: bytes) -> dict[str, str]:
    """sd-webui-additional-networks hashes of a serialized file: sha256 of the bytes after the header, and the
    legacy hash (sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits)."""
    (n,) = struct.unpack("<Q", data[:8])
    return {
        "sshs_model_hash": hashlib.sha256(data[8 + n :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
    }
