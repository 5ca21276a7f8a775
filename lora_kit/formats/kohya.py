"""kohya-compatible LoRA files (what sd-scripts, A1111, ComfyUI, Forge and diffusers all read).

Keys are `<prefix>_<module path with "." -> "_">.lora_down.weight / .lora_up.weight / .alpha`:
`lora_unet` (SD1/SD2: diffusers paths; SDXL: SGM paths such as `input_blocks_4_1_...`), `lora_te` (the one CLIP of
SD1/SD2), `lora_te1`/`lora_te2` (two CLIPs), `lora_te3` (T5). Text-encoder paths are spelled `text_model_<rest>`
whatever transformers calls them, except the layers outside the text model (`lora_te2_text_projection`). Names are
mapped back through the model's own module list, never by splitting.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import torch
from torch import nn

from ..errors import LoraKitError
from ..inject import _layers
from ..state import SUFFIXES as STATE_SUFFIXES
from ..state import clip_path, group, plain_pair, split_key
from . import kohya_flux

# every tensor a module may hold (LoRA's, then the other kinds' LyCORIS names: kind_rules), as `.suffix` -> part
SUFFIXES = {f".{suffix}": part for suffix, part in STATE_SUFFIXES.items()}
RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}  # fmt: skip


def sgm_blocks(config: Mapping) -> dict[str, str]:
    """diffusers UNet block paths -> SGM (`input_blocks`/`middle_block`/`output_blocks`) paths, for any depth."""
    n = len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n
    table = {
        "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_out": "out.2", "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1", "mid_block.resnets.1": "middle_block.2",
    }  # fmt: skip
    i = 1
    for b in range(n):
        for j in range(lpb[b]):
            table[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            table[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
            i += 1
        if b < n - 1:
            table[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    i = 0
    up_lpb = list(reversed(lpb))
    for b in range(n):
        has_attention = "CrossAttn" in config["up_block_types"][b]
        for j in range(up_lpb[b] + 1):
            table[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{i}.0"
            table[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
            i += 1
        if b < n - 1:
            table[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{i - 1}.{2 if has_attention else 1}.conv"
    return table


def to_sgm(path: str, table: Mapping[str, str]) -> str | None:
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        head, rest = ".".join(parts[:cut]), parts[cut:]
        if head in table:
            if ".resnets." in f".{head}." and rest:
                inner = RESNET_SGM.get(".".join(rest))
                return None if inner is None else f"{table[head]}.{inner}"
            return ".".join([table[head], *rest])
    return None


def prefix(component: str, module: nn.Module, arch: str) -> str:
    if component in ("unet", "transformer"):
        return "lora_unet"
    if "T5" in type(module).__name__:
        return "lora_te3"
    if component == "text_encoder":
        return "lora_te" if arch in ("sd1", "sd2") else "lora_te1"
    return "lora_te2"


def stems(component: str, module: nn.Module, arch: str) -> dict[str, list[str]]:
    """{module path: [stem to write, other stems that mean the same module]} for every layer of a component."""
    pre = prefix(component, module, arch)
    table = sgm_blocks(module.config) if component == "unet" else None
    out = {}
    for path, _ in _layers(module, norms=True):
        flat = path.replace(".", "_")
        if component.startswith("text_encoder") and pre != "lora_te3":  # a CLIP: written as clip_path says, the
            canonical, written = (p.replace(".", "_") for p in clip_path(path))  # other spelling read too
            tails = dict.fromkeys([written, f"text_model_{canonical}", canonical])
            names = [f"{pre}_{tail}" for tail in tails]
            if pre in ("lora_te", "lora_te1"):  # SD1 files written by diffusers' converter say te1
                other = "lora_te1" if pre == "lora_te" else "lora_te"
                names += [f"{other}_{tail}" for tail in tails]
        else:
            names = [f"{pre}_{flat}"]
            sgm = to_sgm(path, table) if table is not None else None
            if sgm is not None:
                names.insert(0 if arch == "sdxl" else 1, f"{pre}_{sgm.replace('.', '_')}")
        out[path] = names
    return out


def to_kohya(state: Mapping[str, torch.Tensor], comps: Mapping[str, nn.Module], arch: str) -> dict[str, torch.Tensor]:
    """Canonical dict -> kohya keys."""
    names = {c: stems(c, m, arch) for c, m in comps.items()}
    groups = group(state)
    out = {}
    if arch in ("flux", "sd3") and "transformer" in comps:  # BFL / MMDiT names (sd-scripts'), q/k/v fused
        mine = {path: parts for (component, path), parts in groups.items() if component == "transformer"}
        if all(plain_pair(parts) for parts in mine.values()):
            out.update(kohya_flux.to_bfl(mine, comps["transformer"]))
            groups = {key: parts for key, parts in groups.items() if key[0] != "transformer"}
        else:  # another kind on q/k/v has no fused form short of a full diff: LyCORIS's own names for a diffusers
            # transformer (`lycoris_<path>`), which ComfyUI reads ("simpletuner lycoris format"), q/k/v as slices
            names["transformer"] = {path: [f"lycoris_{path.replace('.', '_')}"] for path in names["transformer"]}
    for (component, path), parts in groups.items():
        stem = names[component][path][0]
        if not plain_pair(parts):  # another kind: its tensors under their LyCORIS names, as LyCORIS's kohya wrapper
            out.update({f"{stem}{suffix}": parts[part] for suffix, part in SUFFIXES.items() if part in parts})
            continue
        out[stem + ".lora_down.weight"] = parts["down"]
        out[stem + ".lora_up.weight"] = parts["up"]
        out[stem + ".alpha"] = parts.get("alpha", torch.tensor(float(parts["down"].shape[0])))
    return out


@lru_cache
def _named(arch: str) -> dict[str, tuple[str, str]]:
    """{every stem stems() reads: (the module it names, the stem lora_kit writes for it)} over the real base model
    of `arch`, built on the meta device (models.meta_pipeline): a file's names are mapped without a model."""
    from ..models import meta_pipeline
    from ..state import components

    out: dict[str, tuple[str, str]] = {}
    for component, module in components(meta_pipeline(arch)).items():
        for path, names in stems(component, module, arch).items():
            for name in names:
                out.setdefault(name, (f"{component}.{path}", names[0]))
    return out


def spelling(stem: str, arch: str | None) -> tuple[str, str]:
    """(what module a stored kohya stem names, the stem lora_kit writes for it), without a model: every spelling
    stems() reads on the real model of `arch` (`lora_te_`/`lora_te1_`, with or without `text_model_`, SGM and
    diffusers UNet block names). A file of no known architecture is taken as SD1/SD2's; stems the model does not
    have name themselves."""
    if arch not in ("sd1", "sd2", "sdxl", "sd3", "flux"):
        arch = "sd1"
    return _named(arch).get(stem, (stem, stem))


def is_kohya(keys) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te")) for k in keys)


def from_kohya(
    tensors: Mapping[str, torch.Tensor], comps: Mapping[str, nn.Module], arch: str, source: str
) -> dict[str, torch.Tensor]:
    """kohya keys -> canonical dict; every key must name a module of this model (variants are refused by sniff)."""
    out: dict[str, torch.Tensor] = {}
    if arch in ("flux", "sd3") and "transformer" in comps:  # BFL / MMDiT names first; diffusers paths still read
        out, tensors = kohya_flux.from_bfl(tensors, comps["transformer"], source)
    lookup = {}
    for component, module in comps.items():
        for path, names in stems(component, module, arch).items():
            for name in names:
                lookup.setdefault(name, (component, path))
    # who named each module: two spellings of one (lora_te_ and lora_te1_, SGM and diffusers block names, a BFL
    # fused name and a diffusers path) would silently keep only the last one read
    owner = {}
    if out:
        bfl = {path: stem for stem, paths in kohya_flux.bfl_names(comps["transformer"]).items() for path in paths}
        for key in out:
            path = split_key(key)[0].removeprefix("transformer.")
            owner.setdefault(("transformer", path), f"{bfl[path]}.lora_down.weight")
    unknown = []
    for key, tensor in tensors.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        stem = key[: -len(suffix)] if suffix else None
        if stem is None or stem not in lookup:
            unknown.append(key)
            continue
        component, path = lookup[stem]
        first = owner.setdefault((component, path), key)
        if not first.startswith(stem + "."):
            raise LoraKitError(
                f"{source}: {first} and {key} name one module ({component}.{path}); keep one spelling "
                "(lora-merge FILE -o OUT sums them)"
            )
        out[f"{component}.{path}.{suffix[1:]}"] = tensor
    if unknown:
        raise LoraKitError(
            f"{source}: {len(unknown)} keys name no layer of this {arch} model, e.g. {', '.join(unknown[:3])}"
        )
    return out
