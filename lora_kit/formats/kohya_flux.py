"""kohya (sd-scripts) names for FLUX.1 transformers: the original Black Forest Labs ("BFL") module layout.

sd-scripts trains FLUX on BFL's module tree, so its files say `lora_unet_double_blocks_0_img_attn_qkv` where diffusers
has three layers `transformer_blocks.0.attn.to_q/to_k/to_v`, and `lora_unet_single_blocks_0_linear1` where diffusers
has `attn.to_q/to_k/to_v` plus `proj_mlp`. Names, and the order and sizes of fused parts, follow diffusers' own
converters (`convert_flux_transformer_checkpoint_to_diffusers` for weights, `_convert_kohya_flux_lora_to_diffusers`
for LoRAs); part sizes are read from the model, never assumed.

Both directions are exact. Read (fused -> split): every part keeps the file's down, rank and alpha and takes its own
rows of up. Write (split -> fused): parts that share one down and alpha (what a read produced) keep them and stack
their ups, so file -> memory -> file is bit-exact; otherwise the downs are stacked along the rank and up is
block-diagonal, each block rescaled so that the fused alpha / rank gives every part its own delta. A part without
an adapter gets zero rows of up. Pure functions over dicts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import LoraKitError
from ..inject import _base, _layers
from ..state import alpha_of

PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# BFL's final layer modulation splits its output as (shift, scale); diffusers' AdaLayerNormContinuous as (scale,
# shift). The two halves of up swap places between the layouts (an involution, so the same swap both ways).
SWAPPED = {"norm_out.linear"}
DOUBLE = {  # BFL double block name -> diffusers paths inside transformer_blocks.{i}, in fused order
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",), "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}  # fmt: skip
SINGLE = {  # BFL single block name -> diffusers paths inside single_transformer_blocks.{i}
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}  # fmt: skip
OUTSIDE = {  # BFL names of the layers outside the blocks
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out", "final_layer_adaLN_modulation_1": "norm_out.linear",
}  # fmt: skip


def bfl_names(transformer: nn.Module) -> dict[str, tuple[str, ...]]:
    """{kohya BFL stem: the diffusers paths of its parts, in fused order} for every layer this transformer has."""
    table = {f"lora_unet_{name}": (path,) for name, path in OUTSIDE.items()}
    for i in range(transformer.config.num_layers):
        table |= {f"lora_unet_double_blocks_{i}_{n}": tuple(f"transformer_blocks.{i}.{p}" for p in ps)
                  for n, ps in DOUBLE.items()}  # fmt: skip
    for i in range(transformer.config.num_single_layers):
        table |= {f"lora_unet_single_blocks_{i}_{n}": tuple(f"single_transformer_blocks.{i}.{p}" for p in ps)
                  for n, ps in SINGLE.items()}  # fmt: skip
    layers = {path for path, _ in _layers(transformer)}
    return {stem: paths for stem, paths in table.items() if all(p in layers for p in paths)}


def _out_sizes(layers: Mapping[str, nn.Module], paths: tuple[str, ...]) -> list[int]:
    return [_base(layers[p]).weight.shape[0] for p in paths]


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first])


def from_bfl(
    tensors: Mapping[str, torch.Tensor], transformer: nn.Module, source: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(canonical `transformer.*` dict of the BFL-named keys, the keys that are not BFL names)."""
    table, layers = bfl_names(transformer), dict(_layers(transformer))
    found: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, tensor in tensors.items():
        stem, _, suffix = key.partition(".")
        if stem in table and suffix in PARTS:
            found.setdefault(stem, {})[PARTS[suffix]] = tensor
        else:
            rest[key] = tensor
    out = {}
    for stem, parts in found.items():
        if "down" not in parts or "up" not in parts:
            raise LoraKitError(f"{source}: {stem} needs both lora_down and lora_up")
        paths = table[stem]
        down, up = parts["down"], parts["up"]
        sizes = _out_sizes(layers, paths)
        if down.dim() != 2 or up.shape != (sum(sizes), down.shape[0]):
            raise LoraKitError(
                f"{source}: {stem} has down {tuple(down.shape)} / up {tuple(up.shape)}, but its layers "
                f"{', '.join(paths)} need a 2-d down and an up of {sum(sizes)} rows x down's rank"
            )
        alpha = parts.get("alpha", torch.tensor(float(down.shape[0])))  # kohya: no alpha means alpha = rank
        if paths[0] in SWAPPED:
            up = _swap_halves(up)
        blocks = up.split(sizes)
        # A part whose rows are all zero carries no delta (a lora_kit file writes them for layers it had no adapter
        # on); leave that layer alone, unless the whole module is zero (an untrained file still loads everywhere).
        keep = [i for i, block in enumerate(blocks) if block.any()] or range(len(paths))
        for i in keep:
            prefix = f"transformer.{paths[i]}."
            out[prefix + "lora_down.weight"] = down
            out[prefix + "lora_up.weight"] = blocks[i].contiguous()
            out[prefix + "alpha"] = alpha
    return out, rest


def fuse(parts: list[Mapping[str, torch.Tensor] | None], sizes: list[int]) -> dict[str, torch.Tensor]:
    """One down/up/alpha for a fused BFL module from its parts (None: no adapter), with every part's delta exact."""
    given = [p for p in parts if p is not None]
    first = given[0]
    dtype = first["up"].dtype
    alpha = alpha_of(first)
    if all(torch.equal(p["down"], first["down"]) and alpha_of(p) == alpha for p in given):
        rank = first["down"].shape[0]  # one shared down: stack the ups as they are (bit-exact)
        ups = [
            p["up"] if p is not None else torch.zeros(size, rank, dtype=dtype)
            for p, size in zip(parts, sizes, strict=True)
        ]
        return {"down": first["down"], "up": torch.cat(ups), "alpha": first.get("alpha", torch.tensor(alpha))}
    total = sum(p["down"].shape[0] for p in given)
    up = torch.zeros(sum(sizes), total, dtype=dtype)
    row = col = 0
    for p, size in zip(parts, sizes, strict=True):
        if p is not None:
            rank = p["down"].shape[0]
            # fused scale alpha / total must give this part's alpha_i / rank_i: fold the ratio into its block
            factor = (alpha_of(p) / rank) / (alpha / total)
            up[row : row + size, col : col + rank] = (p["up"].float() * factor).to(dtype)
            col += rank
        row += size
    down = torch.cat([p["down"].to(first["down"].dtype) for p in given])
    return {"down": down, "up": up, "alpha": torch.tensor(alpha, dtype=torch.float32)}


def to_bfl(groups: Mapping[str, Mapping[str, torch.Tensor]], transformer: nn.Module) -> dict[str, torch.Tensor]:
    """{diffusers path: {'down', 'up', 'alpha'}} of a FLUX transformer -> kohya BFL tensors."""
    table, layers = bfl_names(transformer), dict(_layers(transformer))
    owner = {path for paths in table.values() for path in paths}
    unnamed = sorted(set(groups) - owner)
    if unnamed:
        raise LoraKitError(
            f"transformer.{unnamed[0]} has no name in kohya's FLUX (BFL) layout; save with format='peft'"
        )
    out = {}
    for stem, paths in table.items():
        parts = [groups.get(p) for p in paths]
        if all(p is None for p in parts):
            continue
        fused = fuse(parts, _out_sizes(layers, paths))
        up = _swap_halves(fused["up"]) if paths[0] in SWAPPED else fused["up"]
        out[stem + ".lora_down.weight"] = fused["down"]
        out[stem + ".lora_up.weight"] = up
        out[stem + ".alpha"] = fused["alpha"]
    return out
