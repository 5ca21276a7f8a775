"""Sniff a LoRA file's format and read it into a canonical state dict, or write one (see the package docstring)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from .. import __version__
from ..errors import LoraKitError
from ..models import ARCHITECTURES, architecture, base_model_metadata, prediction_type, spec_architecture
from ..ops import cast, uniform_alpha
from ..state import COMPONENTS, components, modules, plain_pair, split_key
from ..state import SUFFIXES as STATE_SUFFIXES
from . import check, dialects, files, kind_rules, kohya, legacy, peft, trainers
from .header import architectures_for, check_lora, guess_architecture
from .peft_config import METADATA_KEY

NATIVE = tuple(f".{suffix}" for suffix in STATE_SUFFIXES)  # the canonical dict's key endings (state.SUFFIXES)
FORMATS = ("kohya", "peft", "native", "comfyui")  # what write() writes; read() also takes dialects.READERS
DEFAULT_FORMAT = {"sd1": "kohya", "sd2": "kohya", "sdxl": "kohya", "sd3": "peft", "flux": "kohya"}


def sniff(keys, source: str = "file") -> str:
    """kohya, legacy, native, peft or one of dialects.READERS (comfyui, xlabs, onetrainer, lycoris); LoRA variants
    lora_kit does not read and other files are refused."""
    keys = list(keys)
    check.check_variants(keys, source)
    if dialect := dialects.reader_of(keys):  # before kohya: OneTrainer's files hold kohya text-encoder keys too
        return dialect
    if kohya.is_kohya(keys):
        return "kohya"
    if legacy.is_legacy(keys):
        return "legacy"
    if _native(keys):
        return "native"
    if peft.is_peft(keys):
        return "peft"
    raise check.not_a_lora(source, keys)


def _native(keys: list[str]) -> bool:
    """Whether every key is a canonical one, `{component}.{path}.{suffix}` of some kind (PEFT's own LoHa/LoKr keys look
    the same: read() takes those with their config); `x.weight` only beside IA3's `x.on_input`."""
    ia3 = {k.removesuffix(".on_input") for k in keys if k.endswith(".on_input")}
    return bool(keys) and all(
        k.split(".", 1)[0] in COMPONENTS
        and k.endswith(NATIVE)
        and (
            not k.endswith(".weight")
            or k.endswith((".lora_down.weight", ".lora_up.weight", ".lora_mid.weight"))
            or k.removesuffix(".weight") in ia3
        )
        for k in keys
    )


def read(path: str | os.PathLike, target, *, allow_pickle: bool = False) -> tuple[dict, dict[str, str]]:
    """(canonical state dict, header metadata) of a LoRA file, with names mapped onto `target`'s modules.

    Pickles (`.pt`, `.bin`, ...) are read only with allow_pickle, and then with torch.load(weights_only=True).
    """
    comps = components(target)
    if peft.is_standalone(path):  # PEFT's save_pretrained folder: names one model, found by its module paths
        state, metadata = peft.read_standalone(path, comps, allow_pickle)
        return checked(state, path), metadata
    p = files.check_input(path)
    if p.suffix in files.PICKLES:
        obj = files.load_pickle(p, allow_pickle)
        if isinstance(obj, list):  # cloneofsimo's positional [up0, down0, up1, down1, ...]
            return checked(legacy.from_pt(obj, p, comps, allow_pickle), p), {}
        tensors, metadata = files.tensor_dict(obj, p), {}
    else:
        tensors, metadata = files.load(p)
    fmt = sniff(tensors, str(p))
    if isinstance(target, nn.Module) and fmt != "legacy":  # a bare UNet / transformer / text encoder takes its part
        ((component, module),) = comps.items()
        arch = architecture(comps)
        tensors = _only(tensors, component, kohya.prefix(component, module, arch), fmt, arch, str(p))
    if fmt == "legacy":
        state = legacy.from_safeloras(tensors, metadata, comps, str(p))
    elif fmt == "kohya":
        state = kohya.from_kohya(tensors, comps, architecture(comps), str(p))
    elif fmt == "peft" or fmt == "native" and METADATA_KEY in metadata:  # (PEFT's own LoHa/LoKr: its scales)
        state = peft.from_peft(tensors, metadata, comps, str(p))
    elif fmt in dialects.READERS:
        state = trainers.read(tensors, fmt, comps, architecture(comps), str(p))
    else:
        state = dict(tensors)
    return checked(state, p), metadata


def precheck(path: str | os.PathLike, allow_pickle: bool = False, model: str | None = None) -> None:
    """The checks of a LoRA (or embedding) file that need no model, made before one is opened so that a bad file
    costs no model load: it exists and is a regular file (or PEFT folder), a pickle is allowed and loads, a safetensors
    header is valid, and a LoRA (keys of LoRA factors) is one every reader takes: no base model or variant, modules
    well formed, factors floating point, every factor and alpha finite. Given `model` (a --model spec), the LoRA must
    be for its architecture, where both tell theirs without loading (header.architectures_for,
    models.spec_architecture). What only the model can say (names and shapes that fit its layers) comes later."""
    from ..single_file.sniff import ARCH_NAMES, looks_like_lora
    from ..single_file.sniff import sniff as sniff_model

    if peft.is_standalone(path):
        return
    p = files.check_input(path)
    tensors = None
    if p.suffix in files.PICKLES:
        obj = files.load_pickle(p, allow_pickle)
        if not isinstance(obj, dict) or not looks_like_lora(map(str, obj)):
            return  # cloneofsimo's lists, embeddings: their readers check them against the model
        tensors, metadata = files.tensor_dict(obj, p), {}
        dtypes = {k: str(t.dtype).removeprefix("torch.") for k, t in tensors.items()}
        header = {k: {"shape": list(t.shape), "dtype": dtypes[k]} for k, t in tensors.items()}
    else:
        header, metadata = files.read_header(p)
        if not looks_like_lora(header):  # an embedding, cloneofsimo's positional keys; or a base model given here
            if found := sniff_model(p, header, metadata):
                raise LoraKitError(f"{p}: is {found.describe()}, a base model, not a LoRA")
            return
    parts, shapes = check_lora(header, str(p))
    with contextlib.ExitStack() as stack:
        if tensors is not None:
            get = tensors.__getitem__
        else:  # one tensor at a time: a large LoRA is never held whole
            from safetensors import safe_open

            get = stack.enter_context(safe_open(str(p), framework="pt")).get_tensor
        for key in parts:
            t = get(key)
            if t.is_floating_point() and not t.isfinite().all():
                raise LoraKitError(f"{p}: tensor {key} holds NaN or inf")
    if model is None or (arch := spec_architecture(model)) is None:
        return
    widths = {stem: s["down"][1] for stem, s in shapes.items() if len(s.get("down", ())) > 1}
    fits = architectures_for(list(shapes), metadata, widths)
    if arch not in fits:
        wanted = " or ".join(ARCH_NAMES[a] for a in ARCHITECTURES if a in fits)
        raise LoraKitError(f"{p}: is a LoRA for {wanted}, but the model {model} is {ARCH_NAMES[arch]}")


def checked(state: dict, source) -> dict:
    """A LoRA dict as read from `source`, once every module is well formed (check.module_problem: both factors,
    agreeing ranks, the shapes of a linear or conv adapter, a scalar alpha), its factors floating point and every
    tensor finite."""
    shapes = {stem: {part: tuple(t.shape) for part, t in parts.items()} for stem, parts in modules(state).items()}
    check.check_modules(shapes, str(source))
    for key, t in state.items():
        check.check_factor_dtype(key, split_key(key)[1], str(t.dtype).removeprefix("torch."), str(source))
        if t.is_floating_point() and not t.isfinite().all():
            raise LoraKitError(f"{source}: tensor {key} holds NaN or inf")
    return state


def _only(tensors: Mapping, component: str, kohya_prefix: str, fmt: str, arch: str, source: str) -> dict:
    if fmt in dialects.READERS:
        keep = {k: t for k, t in tensors.items() if dialects.component_of(k, arch) == component}
    elif fmt == "kohya":
        prefixes = {"lora_unet": ("lora_unet_", "lora_transformer_"), "lora_te": ("lora_te_", "lora_te1_"),
                    "lora_te1": ("lora_te_", "lora_te1_")}.get(kohya_prefix, (kohya_prefix + "_",))  # fmt: skip
        keep = {k: t for k, t in tensors.items() if k.startswith(prefixes)}
    else:
        keep = {k: t for k, t in tensors.items() if k.split(".", 1)[0] == component}
    if not keep:
        raise LoraKitError(f"{source}: holds no adapters for a {component}")
    return keep


# which text encoder of its pipeline a bare transformers module can be, by architecture and class
_TEXT_ENCODERS = {
    "sd1": {"CLIPTextModel": ("text_encoder",)}, "sd2": {"CLIPTextModel": ("text_encoder",)},
    "sdxl": {"CLIPTextModel": ("text_encoder",), "CLIPTextModelWithProjection": ("text_encoder_2",)},
    "sd3": {"CLIPTextModelWithProjection": ("text_encoder", "text_encoder_2"), "T5EncoderModel": ("text_encoder_3",)},
    "flux": {"CLIPTextModel": ("text_encoder",), "T5EncoderModel": ("text_encoder_2",)},
}  # fmt: skip
_KOHYA_TE = {"lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}


def bare_component(module: nn.Module, path, component: str | None = None) -> tuple[str | None, str | None]:
    """(the component a bare module plays for the LoRA file at `path` (None: the one its class says), the
    architecture the file is for when the module can be that component there (None: its class says)).

    `component` (the caller's word) is checked against the module's kind. A bare text encoder of a safetensors file
    is the one text encoder the file holds adapters for that a module of its class can be in the file's
    architecture (a CLIPTextModelWithProjection is SDXL's text_encoder_2); when two remain (SD3's two CLIPs) the
    caller must say which, rather than load another encoder's factors. The architecture goes with it because a
    bare encoder's class does not tell it (SD3's text_encoder_2 is SDXL's class): models.architecture reads it.
    """
    module = getattr(module, "_orig_mod", module)
    cls = type(module).__name__
    text_encoder = type(module).__module__.startswith("transformers")
    if component is not None:
        encoders = [c for c in COMPONENTS if c.startswith("text_encoder")]
        if not text_encoder:
            raise LoraKitError(f"component={component!r}: only a bare text encoder needs one, not a {cls}")
        if component not in encoders:
            raise LoraKitError(f"component={component!r}: a bare {cls} is one of {', '.join(encoders)}")
    held, arch = _held_encoders(path) if text_encoder else (set(), None)
    allowed = _TEXT_ENCODERS.get(arch, {}).get(cls)
    if component is not None:
        return component, arch if allowed is not None and component in allowed else None
    if not held:  # no text-encoder adapters (or no LoRA): the reader says what is wrong with the file
        return None, None
    fits = sorted(c for c in held if allowed is None or c in allowed)
    if len(fits) == 1:
        return fits[0], arch if allowed is not None else None
    p = Path(path)
    if not fits:
        raise LoraKitError(f"{p}: holds no adapters for a bare {cls} (it has adapters for {', '.join(sorted(held))})")
    raise LoraKitError(
        f"{p}: holds adapters for {' and '.join(fits)}, and a bare {cls} could be either; pass component= one of them"
    )


def _held_encoders(path) -> tuple[set[str], str | None]:
    """(the text encoders a safetensors LoRA file holds adapters for, the architecture it is for); nothing for
    other files (pickles, PEFT folders, cloneofsimo's positional keys: each of those is for one module)."""
    p = Path(path) if path is not None else None
    if p is None or not p.is_file() or p.suffix in files.PICKLES or peft.is_standalone(p):
        return set(), None
    header, metadata = files.read_header(p)
    if legacy.is_legacy(header):
        return set(), None
    arch = guess_architecture(list(header), metadata)
    held = set()
    if dialects.reader_of(header):
        held = {dialects.component_of(key, arch) for key in header} - {"unet", "transformer", None}
        return held, arch if arch in ARCHITECTURES else None
    for key in header:
        first = key.split(".", 1)[0]
        te = next((c for pre, c in _KOHYA_TE.items() if key.startswith(pre)), None)
        if key.startswith("lora_te3_"):
            te = "text_encoder_2" if arch == "flux" else "text_encoder_3"
        held.add(te or (first if first.startswith("text_encoder") else None))
    held.discard(None)
    return held, arch if arch in ARCHITECTURES else None


def metadata_for(
    state: Mapping, arch: str | None, extra: Mapping[str, object] | None = None, prediction: str | None = None
) -> dict[str, str]:
    """kohya `ss_*`, SAI `modelspec.*` and `lora_kit.*` header entries (all strings); arch None (a file that does
    not say what it is for) leaves out the entries that name the base model, whose SD1/SD2 names depend on the
    scheduler's `prediction` type (models.base_model_metadata)."""
    groups = modules(state)
    ranks = sorted({parts["down"].shape[0] for parts in groups.values() if "down" in parts})
    alphas = sorted({float(parts["alpha"]) for parts in groups.values() if "alpha" in parts})
    algos = sorted({kind_rules.kind_of(parts) for parts in groups.values() if not plain_pair(parts)})
    module = "networks.lora_flux" if arch == "flux" else "networks.lora"
    meta = {
        "ss_network_module": "lycoris.kohya" if algos else module,  # (as LyCORIS's kohya wrapper writes)
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": f"{alphas[0]:g}" if len(alphas) == 1 else "Dynamic",
        "ss_v2": str(arch == "sd2"),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.implementation": "diffusers",
        "lora_kit.version": __version__,
    }
    if algos:
        meta["ss_network_args"] = json.dumps({"algo": algos[0] if len(algos) == 1 else "mixed"})
    if arch is not None:
        meta.update(base_model_metadata(arch, prediction))
        meta["lora_kit.architecture"] = arch
    if extra is not None and not isinstance(extra, Mapping):
        raise LoraKitError(f"metadata {extra!r}: give a dict {{key: value}}")
    for key, value in (extra or {}).items():
        try:
            text = value if isinstance(value, str) else json.dumps(value)
        except TypeError:
            raise LoraKitError(f"metadata {key!r}: {type(value).__name__} is neither text nor JSON") from None
        meta[key if "." in str(key) or str(key).startswith("ss_") else f"lora_kit.{key}"] = text
    return meta


def write(
    path: str | os.PathLike,
    state: Mapping,
    target,
    *,
    format: str | None = None,
    dtype=None,
    metadata: Mapping[str, object] | None = None,
    force: bool = False,
    prediction: str | None = None,
) -> Path:
    """Write a canonical state dict as a LoRA file for `target`'s architecture; returns the path. The base model's
    names follow the target's scheduler, else `prediction` (what an input file said)."""
    comps = components(target)
    arch = architecture(comps)
    fmt = format or DEFAULT_FORMAT[arch]
    if format is None and fmt == "peft" and not all(map(plain_pair, modules(state).values())):
        fmt = "kohya"  # (PEFT/diffusers files hold no LoHa/LoKr/IA3/full: LyCORIS's names, which ComfyUI reads)
    if fmt not in FORMATS:
        raise LoraKitError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    files.check_output(path, force)
    unknown = sorted({k.split(".", 1)[0] for k in state} - set(COMPONENTS))
    if unknown:
        raise LoraKitError(f"state dict has keys of unknown components {unknown}")
    state = cast(uniform_alpha(state), dtype)
    header = metadata_for(state, arch, metadata, prediction_type(target) or prediction)
    if fmt == "kohya":
        tensors = kohya.to_kohya(state, comps, arch)
    elif fmt == "peft":
        tensors, extra = peft.to_peft(state, comps)
        header.update(extra)
    elif fmt == "comfyui":
        tensors = trainers.to_comfyui(state, comps, arch)
    else:
        tensors = dict(state)
    ss_only = {k: v for k, v in header.items() if k.startswith("ss_")}
    header.update(files.addnet_hashes(files.serialize(tensors, ss_only)))
    return files.write_atomic(path, files.serialize(tensors, header), force)
