"""kohya (sd-scripts) names on the original module trees of FLUX.1 (Black Forest Labs, "BFL") and SD3 (MMDiT).

sd-scripts trains FLUX on BFL's module tree and SD3 on MMDiT's (networks/lora_flux.py, lora_sd3.py), naming each module
`lora_unet_` + its original path with "." -> "_": `lora_unet_double_blocks_0_img_attn_qkv` where diffusers has three
layers `transformer_blocks.0.attn.to_q/to_k/to_v`, `lora_unet_single_blocks_0_linear1` (q, k, v and `proj_mlp`),
`lora_unet_joint_blocks_0_x_block_attn_qkv` (SD3), `lora_unet_final_layer_adaLN_modulation_1`. musubi-tuner's FLUX.1
LoRAs (networks/lora_flux.py: prefix `lora_unet`, BFL's DoubleStreamBlock/SingleStreamBlock modules, the same
flattening) are these names too. The trees, fused orders and exactness are formats/original.py's; this file holds
BFL's name tables (which single_file/layout.py reads too) and the kohya flattening.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from . import original

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


def kohya_stem(name: str) -> str:
    """`double_blocks.0.img_attn.qkv` -> `lora_unet_double_blocks_0_img_attn_qkv`."""
    return "lora_unet_" + name.replace(".", "_")


def _table(transformer: nn.Module) -> dict[str, original.Fused]:
    return {kohya_stem(name): fused for name, fused in original.layout(transformer).items()}


def bfl_names(transformer: nn.Module) -> dict[str, tuple[str, ...]]:
    """{kohya stem of an original module: the diffusers paths of its parts, in fused order} for every layer this
    FLUX (BFL names) or SD3 (MMDiT names) transformer has; {} for other transformers."""
    return {stem: fused.paths for stem, fused in _table(transformer).items()}


def from_bfl(
    tensors: Mapping[str, torch.Tensor], transformer: nn.Module, source: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(canonical `transformer.*` dict of the keys named after original modules, the other keys). Suffixes other
    than LoRA's (other adapter kinds) go with their module (original.split)."""
    table = _table(transformer)
    found: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, tensor in tensors.items():
        stem, _, suffix = key.partition(".")
        if stem in table and suffix:
            found.setdefault(stem, {})[suffix] = tensor
        else:
            rest[key] = tensor
    out = {}
    for stem, parts in found.items():
        out.update(original.split(stem, table[stem], parts, transformer, source))
    return out, rest


def to_bfl(groups: Mapping[str, Mapping[str, torch.Tensor]], transformer: nn.Module) -> dict[str, torch.Tensor]:
    """{diffusers path: {'down', 'up', 'alpha'}} of a FLUX or SD3 transformer -> kohya tensors on original names."""
    out = {}
    for name, factors in original.to_original(groups, transformer, "kohya").items():
        stem = kohya_stem(name)
        out[stem + ".lora_down.weight"] = factors["down"]
        out[stem + ".lora_up.weight"] = factors["up"]
        out[stem + ".alpha"] = factors["alpha"]
    return out
