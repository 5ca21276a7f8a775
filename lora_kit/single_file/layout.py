"""Key names of single-file checkpoints (A1111/SGM for SD1/SD2/SDXL, the ComfyUI layout for SD3/FLUX), from the
diffusers modules that hold the weights.

diffusers reads these files (`from_single_file`) but cannot write them; this file is the mapping it lacks, the other
way: for every parameter of a diffusers component, the original key it is stored under and how (`Piece`). The tests
check each table against diffusers' own readers: a file written through it is read back by `from_single_file` to the
same tensors. Pure functions over names and configs; no file I/O.

Ops: "" (the tensor as it is), "conv" (a linear weight stored as a 1x1 conv: the VAE's mid attention), "T" (stored
transposed: OpenCLIP's text_projection), "swap" (halves swapped: BFL/SD3 (shift, scale) vs diffusers (scale, shift)).
Several diffusers keys under one original key are concatenated along dim 0 in their order (fused qkv).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    key: str  # the original key
    index: int  # the place of this diffusers tensor among the key's concatenated parts
    op: str = ""


def _sgm_table(config: Mapping) -> dict[str, str]:
    from ..formats.kohya import sgm_blocks

    return sgm_blocks(config) | {"conv_norm_out": "out.0"}


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip


def unet(key: str, config: Mapping) -> Piece | None:
    """A UNet2DConditionModel parameter -> its SGM key (`input_blocks.4.1.proj_in.weight`), without prefix."""
    table = _cached_sgm(config)
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head, rest = ".".join(parts[:cut]), parts[cut:]
        if head not in table:
            continue
        if ".resnets." in f".{head}.":
            inner = _RESNET.get(rest[0])
            return None if inner is None else Piece(".".join([table[head], inner, *rest[1:]]), 0)
        return Piece(".".join([table[head], *rest]), 0)
    return None


_SGM_CACHE: dict[str, dict[str, str]] = {}


def _cached_sgm(config: Mapping) -> dict[str, str]:
    import json

    spec = json.dumps({k: config[k] for k in ("block_out_channels", "layers_per_block", "up_block_types")},
                      default=list)  # fmt: skip
    if spec not in _SGM_CACHE:
        _SGM_CACHE[spec] = _sgm_table(config)
    return _SGM_CACHE[spec]


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_OUTER = {"conv_norm_out": "norm_out"}


def vae(key: str, config: Mapping) -> Piece | None:
    """An AutoencoderKL parameter -> its LDM key (`decoder.up.3.block.0.conv1.weight`), without prefix."""
    n = len(config["block_out_channels"])
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if m is None:
        return Piece(key, 0)  # quant_conv, post_quant_conv
    side, rest = m.groups()
    if m2 := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", rest):
        kind, b, j, layer, p = m2.groups()
        b = int(b) if kind == "down" else n - 1 - int(b)
        layer = "nin_shortcut" if layer == "conv_shortcut" else layer
        return Piece(f"{side}.{kind}.{b}.block.{j}.{layer}.{p}", 0)
    if m2 := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", rest):
        return Piece(f"{side}.down.{m2.group(1)}.downsample.conv.{m2.group(2)}", 0)
    if m2 := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", rest):
        return Piece(f"{side}.up.{n - 1 - int(m2.group(1))}.upsample.conv.{m2.group(2)}", 0)
    if m2 := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", rest):
        return Piece(f"{side}.mid.block_{int(m2.group(1)) + 1}.{m2.group(2)}", 0)
    if m2 := re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)", rest):
        layer, p = m2.groups()
        op = "conv" if p == "weight" and layer != "group_norm" else ""
        return Piece(f"{side}.mid.attn_1.{_VAE_ATTN[layer]}.{p}", 0, op)
    head, _, p = rest.rpartition(".")
    return Piece(f"{side}.{_VAE_OUTER.get(head, head)}.{p}", 0)


def clip(key: str, config: Mapping) -> Piece | None:
    """A transformers CLIP text model parameter -> its key in the HF layout the checkpoints keep
    (`text_model.encoder.layers.0...`): transformers 5 flattened CLIPTextModel (no `text_model.`); files did not."""
    if key.startswith(("text_model.", "text_projection.")):
        return Piece(key, 0)
    return Piece("text_model." + key, 0)


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def openclip(key: str, config: Mapping) -> Piece | None:
    """A CLIP text model parameter -> its OpenCLIP key (SD2's and SDXL's big encoder: fused in_proj, resblocks)."""
    key = key.removeprefix("text_model.")
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}  # fmt: skip
    if key in fixed:
        return Piece(fixed[key], 0)
    if key == "text_projection.weight":
        return Piece("text_projection", 0, "T")
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m is None:
        return None
    i, layer, p = m.groups()
    if layer.startswith("self_attn.") and layer[10:] in _QKV:
        return Piece(f"transformer.resblocks.{i}.attn.in_proj_{p}", _QKV[layer[10:]])
    if layer in _OPENCLIP_LAYER:
        return Piece(f"transformer.resblocks.{i}.{_OPENCLIP_LAYER[layer]}.{p}", 0)
    return None


def t5(key: str, config: Mapping) -> Piece | None:
    """A T5 encoder parameter: stored under its own name."""
    return Piece(key, 0)


_MMDIT_OUTSIDE = {
    "pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear",
}  # fmt: skip
_MMDIT_BLOCK = {  # diffusers layer inside transformer_blocks.{i} -> (original layer inside joint_blocks.{i}, part)
    "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1), "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2), "attn.to_out.0": ("x_block.attn.proj", 0),
    "attn.to_add_out": ("context_block.attn.proj", 0), "attn.norm_q": ("x_block.attn.ln_q", 0),
    "attn.norm_k": ("x_block.attn.ln_k", 0), "attn.norm_added_q": ("context_block.attn.ln_q", 0),
    "attn.norm_added_k": ("context_block.attn.ln_k", 0), "attn2.to_q": ("x_block.attn2.qkv", 0),
    "attn2.to_k": ("x_block.attn2.qkv", 1), "attn2.to_v": ("x_block.attn2.qkv", 2),
    "attn2.to_out.0": ("x_block.attn2.proj", 0), "attn2.norm_q": ("x_block.attn2.ln_q", 0),
    "attn2.norm_k": ("x_block.attn2.ln_k", 0), "norm1.linear": ("x_block.adaLN_modulation.1", 0),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", 0), "ff.net.0.proj": ("x_block.mlp.fc1", 0),
    "ff.net.2": ("x_block.mlp.fc2", 0), "ff_context.net.0.proj": ("context_block.mlp.fc1", 0),
    "ff_context.net.2": ("context_block.mlp.fc2", 0),
}  # fmt: skip


def mmdit(key: str, config: Mapping) -> Piece | None:
    """An SD3Transformer2DModel parameter -> its MMDiT key (`joint_blocks.0.x_block.attn.qkv.weight`)."""
    layer, _, p = key.rpartition(".")
    if key == "pos_embed.pos_embed":
        return Piece("pos_embed", 0)
    if layer in _MMDIT_OUTSIDE:
        return Piece(f"{_MMDIT_OUTSIDE[layer]}.{p}", 0)
    if layer == "norm_out.linear":
        return Piece(f"final_layer.adaLN_modulation.1.{p}", 0, "swap")
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", layer)
    if m is None or m.group(2) not in _MMDIT_BLOCK:
        return None
    i, inner = int(m.group(1)), m.group(2)
    name, part = _MMDIT_BLOCK[inner]
    # the last block's context side only modulates (context_pre_only): stored (shift, scale) like the final layer
    last = inner == "norm1_context.linear" and i == config["num_layers"] - 1
    return Piece(f"joint_blocks.{i}.{name}.{p}", part, "swap" if last else "")


def bfl(key: str, config: Mapping) -> Piece | None:
    """A FluxTransformer2DModel parameter -> its Black Forest Labs key (`double_blocks.0.img_attn.qkv.weight`)."""
    from ..formats.kohya_flux import DOUBLE, OUTSIDE, SINGLE

    layer, _, p = key.rpartition(".")
    outside = {path: name for name, path in OUTSIDE.items()}
    norms = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
             "attn.norm_added_q": "txt_attn.norm.query_norm",
             "attn.norm_added_k": "txt_attn.norm.key_norm"}  # fmt: skip
    if layer in outside:
        name = _bfl_dotted(outside[layer])
        return Piece(f"{name}.{p}", 0, "swap" if layer == "norm_out.linear" else "")
    if m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", layer):
        i, inner = m.groups()
        if inner in norms:
            return Piece(f"double_blocks.{i}.{norms[inner]}.scale", 0)
        for name, paths in DOUBLE.items():
            if inner in paths:
                return Piece(f"double_blocks.{i}.{_bfl_dotted(name)}.{p}", paths.index(inner))
    if m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", layer):
        i, inner = m.groups()
        if inner in ("attn.norm_q", "attn.norm_k"):
            return Piece(f"single_blocks.{i}.norm.{'query' if inner[-1] == 'q' else 'key'}_norm.scale", 0)
        for name, paths in SINGLE.items():
            if inner in paths:
                return Piece(f"single_blocks.{i}.{_bfl_dotted(name)}.{p}", paths.index(inner))
    return None


_BFL_DOTS = {"img_attn_qkv": "img_attn.qkv", "img_attn_proj": "img_attn.proj", "img_mlp_0": "img_mlp.0",
             "img_mlp_2": "img_mlp.2", "img_mod_lin": "img_mod.lin", "txt_attn_qkv": "txt_attn.qkv",
             "txt_attn_proj": "txt_attn.proj", "txt_mlp_0": "txt_mlp.0", "txt_mlp_2": "txt_mlp.2",
             "txt_mod_lin": "txt_mod.lin", "linear1": "linear1", "linear2": "linear2",
             "modulation_lin": "modulation.lin",
             "img_in": "img_in", "txt_in": "txt_in", "time_in_in_layer": "time_in.in_layer",
             "time_in_out_layer": "time_in.out_layer", "vector_in_in_layer": "vector_in.in_layer",
             "vector_in_out_layer": "vector_in.out_layer", "guidance_in_in_layer": "guidance_in.in_layer",
             "guidance_in_out_layer": "guidance_in.out_layer", "final_layer_linear": "final_layer.linear",
             "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1"}  # fmt: skip


def _bfl_dotted(name: str) -> str:
    return _BFL_DOTS[name]


NAMERS = {"unet": unet, "vae": vae, "clip": clip, "openclip": openclip, "t5": t5, "mmdit": mmdit, "bfl": bfl}


def original_keys(names: Iterable[str], namer: str, config: Mapping, prefix: str) -> dict[str, list[tuple[str, str]]]:
    """{original key: [(diffusers key, op), ...] in concatenation order} for a component's parameter names; a name
    the layout has no place for raises KeyError (a writer must not drop weights silently)."""
    fn = NAMERS[namer]
    grouped: dict[str, dict[int, tuple[str, str]]] = {}
    for name in names:
        piece = fn(name, config)
        if piece is None:
            raise KeyError(name)
        grouped.setdefault(prefix + piece.key, {})[piece.index] = (name, piece.op)
    return {k: [parts[i] for i in sorted(parts)] for k, parts in grouped.items()}
