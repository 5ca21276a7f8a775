"""Read other trainers' key dialects (ComfyUI / ai-toolkit / SimpleTuner `diffusion_model.`, XLabs, OneTrainer,
LyCORIS standalone; see formats/dialects.py for each one's keys) into the canonical dict, and write ComfyUI's.

Every key is mapped through the model's own module lists: a name of the original checkpoint tree (formats/original.py:
fused q/k/v split exactly), a diffusers path, or an SGM path of a UNet (formats/kohya.py's tables). A key that names
no layer is an error, never dropped; two spellings of one module are an error too (the last would win silently).
Suffixes other than LoRA's (other adapter kinds) are kept with their module.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import LoraKitError
from ..inject import _layers
from ..state import clip_path, group
from . import dialects, kohya, kohya_flux, original
from .original import Fused


class _Names:
    """The module names of a pipeline's components, in every spelling the dialects use."""

    def __init__(self, comps: Mapping[str, nn.Module], arch: str):
        self.comps, self.arch = comps, arch
        self.main = dialects.main_component(arch)
        module = comps.get(self.main)
        self.layers = {c: {p for p, _ in _layers(m)} for c, m in comps.items()}
        paths = self.layers.get(self.main, set())
        self.flat = {p.replace(".", "_"): p for p in paths}
        self.original = original.layout(module) if self.main == "transformer" and module is not None else {}
        self.sgm = {}  # a UNet's `lora_unet_<flat SGM or diffusers path>` -> path (kohya's spellings)
        if self.main == "unet" and module is not None:
            for path, names in kohya.stems("unet", module, arch).items():
                self.sgm.update(dict.fromkeys(names, path))

    def main_module(self, name: str) -> Fused | None:
        """A main-model module named by its original (BFL/MMDiT/SGM) or diffusers dotted path."""
        if name in self.original:
            return self.original[name]
        if name in self.layers.get(self.main, ()):
            return Fused((name,))
        path = self.sgm.get("lora_unet_" + name.replace(".", "_"))
        return Fused((path,)) if path is not None else None

    def text_module(self, component: str, path: str) -> str | None:
        layers = self.layers.get(component, set())
        return next((p for p in (path, *clip_path(path)) if p in layers), None)


def _suffix(suffix: str) -> str:
    return dialects.LORA_SUFFIXES.get(suffix, suffix)


def _locate(key: str, fmt: str, names: _Names) -> tuple[str, Fused, str, str] | None:
    """(component, its layers, the module's name as written, canonical suffix) of a dialect key; None if unknown."""
    if fmt == "xlabs":
        return _locate_xlabs(key, names)
    if fmt in dialects.FLAT_PREFIX:
        stem, _, suffix = key.partition(".")
        path = names.flat.get(stem.removeprefix(dialects.FLAT_PREFIX[fmt]))
        if not stem.startswith(dialects.FLAT_PREFIX[fmt]) or path is None or not suffix:
            return None
        return names.main, Fused((path,)), stem, _suffix(suffix)
    pieces = key.split(".")
    for cut in (1, 2):  # suffixes are one or two dotted words (alpha, lora_A.weight, hada_w1_a, lora_mid.weight)
        module, suffix = ".".join(pieces[:-cut]), ".".join(pieces[-cut:])
        if module.startswith(dialects.COMFY_MAIN):
            found = names.main_module(module[len(dialects.COMFY_MAIN) :])
            if found is not None:
                return names.main, found, module, _suffix(suffix)
        elif module.startswith(dialects.COMFY_TEXT):
            encoder, _, path = module[len(dialects.COMFY_TEXT) :].partition(".")
            component = dialects.COMFY_ENCODERS.get(names.arch, {}).get(encoder)
            resolved = names.text_module(component, path.removeprefix("transformer.")) if component else None
            if resolved is not None:
                return component, Fused((resolved,)), module, _suffix(suffix)
    return None


_DOUBLE, _SINGLE = kohya_flux.DOUBLE, kohya_flux.SINGLE
_XLABS_LAYERS = {  # (block, layer, stream) -> the BFL module whose diffusers layers it adds to (x-flux's processors)
    ("double", "qkv", "1"): _DOUBLE["img_attn_qkv"], ("double", "proj", "1"): _DOUBLE["img_attn_proj"],
    ("double", "qkv", "2"): _DOUBLE["txt_attn_qkv"], ("double", "proj", "2"): _DOUBLE["txt_attn_proj"],
    ("single", "qkv", ""): _SINGLE["linear1"][:3],  # the q, k, v rows of linear1; not proj_mlp's
    ("single", "proj", ""): _SINGLE["linear2"],
}  # fmt: skip


def _locate_xlabs(key: str, names: _Names) -> tuple[str, Fused, str, str] | None:
    m = dialects.XLABS.fullmatch(key)
    inner = _XLABS_LAYERS.get((m["block"], m["layer"], m["stream"])) if m else None
    if inner is None:
        return None
    block = "transformer_blocks" if m["block"] == "double" else "single_transformer_blocks"
    paths = tuple(f"{block}.{m['i']}.{p}" for p in inner)
    if not all(p in names.layers.get("transformer", ()) for p in paths):
        return None
    return "transformer", Fused(paths), dialects.xlabs_part(key)[0], f"lora_{m['part']}.weight"


def read(
    tensors: Mapping[str, torch.Tensor], fmt: str, comps: Mapping[str, nn.Module], arch: str, source: str
) -> dict[str, torch.Tensor]:
    """A dialect file's tensors (fmt one of dialects.READERS) -> canonical dict for this pipeline's components.
    kohya keys beside them (OneTrainer's and LyCORIS' text encoders: `lora_te1_...`) are read by formats/kohya."""
    names = _Names(comps, arch)
    found: dict[tuple[str, Fused, str], dict[str, torch.Tensor]] = {}
    kohya_keys, unknown = {}, []
    for key, tensor in tensors.items():
        located = _locate(key, fmt, names)
        if located is not None:
            component, fused, written, suffix = located
            found.setdefault((component, fused, written), {})[suffix] = tensor
        elif kohya.is_kohya([key]) and fmt in dialects.FLAT_PREFIX:
            kohya_keys[key] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise LoraKitError(
            f"{source}: {len(unknown)} keys of this {fmt} file name no layer of this {arch} model, "
            f"e.g. {', '.join(unknown[:3])}"
        )
    out: dict[str, torch.Tensor] = {}
    owner: dict[tuple[str, str], str] = {}
    for (component, fused, written), parts in found.items():
        for path in fused.paths:  # two spellings of one module: the last one read would win silently
            first = owner.setdefault((component, path), written)
            if first != written:
                raise LoraKitError(f"{source}: {first} and {written} name one module ({component}.{path}); keep one")
        if component == "transformer":
            out.update(original.split(written, fused, parts, comps["transformer"], source))
        else:
            out.update({f"{component}.{fused.paths[0]}.{suffix}": t for suffix, t in parts.items()})
    if kohya_keys:
        for key, tensor in kohya.from_kohya(kohya_keys, comps, arch, source).items():
            if key in out:
                raise LoraKitError(f"{source}: {key} is named twice (a {fmt} key and a kohya key); keep one")
            out[key] = tensor
    return out


def to_comfyui(state: Mapping[str, torch.Tensor], comps: Mapping[str, nn.Module], arch: str) -> dict:
    """Canonical dict -> ComfyUI's keys: `diffusion_model.<original path>` (BFL for FLUX and MMDiT for SD3 with
    q/k/v fused, SGM for UNets, the diffusers path for other transformers) and `text_encoders.<name>.transformer.
    <path>`, each with lora_down / lora_up / alpha."""
    groups = group(state)
    kinds = [f"{c}.{p}" for (c, p), parts in groups.items() if not set(parts) <= {"down", "up", "alpha"}]
    if kinds:
        raise LoraKitError(
            f"{kinds[0]} is not a LoRA pair (LoHa, LoKr, DoRA, ...): ComfyUI files are written for LoRA; save with "
            "format='kohya' (LyCORIS's names, which ComfyUI reads) or convert it with lora-convert --rank"
        )
    out = {}

    def put(stem: str, factors: Mapping[str, torch.Tensor]) -> None:
        out[stem + ".lora_down.weight"] = factors["down"]
        out[stem + ".lora_up.weight"] = factors["up"]
        out[stem + ".alpha"] = factors.get("alpha", torch.tensor(float(factors["down"].shape[0])))

    main = dialects.main_component(arch)
    mine = {path: parts for (component, path), parts in groups.items() if component == main}
    module = comps.get(main)
    if mine and main == "transformer" and original.layout(module):
        for name, factors in original.to_original(mine, module, "ComfyUI").items():
            put(dialects.COMFY_MAIN + name, factors)
    elif mine and main == "unet":
        table = kohya.sgm_blocks(module.config)
        for path, parts in mine.items():
            sgm = kohya.to_sgm(path, table)
            if sgm is None:
                raise LoraKitError(f"unet.{path} has no name in ComfyUI's (SGM) UNet layout; save with format='kohya'")
            put(dialects.COMFY_MAIN + sgm, parts)
    else:
        for path, parts in mine.items():
            put(dialects.COMFY_MAIN + path, parts)
    encoders = {c: name for name, c in dialects.COMFY_ENCODERS.get(arch, {}).items()}
    for (component, path), parts in groups.items():
        if component == main:
            continue
        if component not in encoders:
            raise LoraKitError(f"{component}.{path}: ComfyUI has no name for a {arch} {component}")
        written = clip_path(path)[1] if "CLIP" in type(comps[component]).__name__ else path
        put(f"{dialects.COMFY_TEXT}{encoders[component]}.transformer.{written}", parts)
    return out
