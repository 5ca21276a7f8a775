"""LoRA factors on the original (pre-diffusers) module trees of DiT transformers: FLUX's Black Forest Labs ("BFL")
tree and SD3's MMDiT tree, where diffusers splits fused layers.

FLUX.1 and SD3 were released as `double_blocks.0.img_attn.qkv` / `joint_blocks.0.x_block.attn.qkv`; sd-scripts,
musubi-tuner, ComfyUI and ai-toolkit name LoRA modules after those trees, where diffusers has three layers
`attn.to_q/to_k/to_v` (and FLUX's `single_blocks.N.linear1` is q, k, v and `proj_mlp`). The names, the order of
fused parts and which modules store (shift, scale) where diffusers has (scale, shift) are single_file/layout.py's
checkpoint key tables (checked there against diffusers' own readers); part sizes are read from the model.

Both directions are exact. Read (fused -> split): every part keeps the file's down, rank and alpha and takes its own
rows of up. Write (split -> fused): parts that share one down and alpha (what a read produced) keep them and stack
their ups, so file -> memory -> file is bit-exact; otherwise the downs are stacked along the rank and up is
block-diagonal, each block rescaled so that the fused alpha / rank gives every part its own delta. A part without
an adapter gets zero rows of up. Adapter kinds other than LoRA pass through unchanged on unfused modules and are
split by rows (lora_kit.kinds.split_rows: each part's exact delta) on fused ones. Pure functions over dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LoraKitError
from ..inject import _base, _layers
from ..state import alpha_of

LORA = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}  # canonical suffixes of a LoRA


@dataclass(frozen=True)
class Fused:
    """The diffusers layers one original module stands for, in its row order; `swapped`: its two output halves are
    (shift, scale) where diffusers' are (scale, shift) (an involution: the same swap both ways)."""

    paths: tuple[str, ...]
    swapped: bool = False


def layout_name(transformer: nn.Module) -> str | None:
    """ "FLUX (BFL)" or "SD3 (MMDiT)": the original tree a transformer has, or None for a model without one."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if isinstance(transformer, FluxTransformer2DModel):
        return "FLUX (BFL)"
    if isinstance(transformer, SD3Transformer2DModel):
        return "SD3 (MMDiT)"
    return None


def layout(transformer: nn.Module) -> dict[str, Fused]:
    """{original dotted module name (`double_blocks.0.img_attn.qkv`): its diffusers layers} for every Linear/Conv2d
    of a FLUX or SD3 transformer that the original tree names; {} for other models."""
    from ..single_file import layout as checkpoint

    namer = {"FLUX (BFL)": checkpoint.bfl, "SD3 (MMDiT)": checkpoint.mmdit}.get(layout_name(transformer) or "")
    if namer is None:
        return {}
    parts: dict[str, dict[int, str]] = {}
    swapped = set()
    for path, _ in _layers(transformer):
        piece = namer(path + ".weight", transformer.config)
        if piece is None:
            continue
        name = piece.key.removesuffix(".weight")
        parts.setdefault(name, {})[piece.index] = path
        if piece.op == "swap":
            swapped.add(name)
    return {
        name: Fused(tuple(found[i] for i in sorted(found)), name in swapped)
        for name, found in parts.items()
        if sorted(found) == list(range(len(found)))  # every part present (a model without one has no such module)
    }


def out_sizes(transformer: nn.Module, paths: tuple[str, ...]) -> list[int]:
    layers = dict(_layers(transformer))
    return [_base(layers[p]).weight.shape[0] for p in paths]


def swap_halves(up: torch.Tensor) -> torch.Tensor:
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first])


def split(
    written: str, fused: Fused, parts: Mapping[str, torch.Tensor], transformer: nn.Module, source: str
) -> dict[str, torch.Tensor]:
    """Canonical `transformer.<path>.<suffix>` tensors of one original module's factors, named `written` in the file.
    `parts` is {canonical suffix: tensor}: lora_down.weight / lora_up.weight / alpha, or another kind's suffixes."""
    paths = fused.paths
    if len(paths) == 1 and not fused.swapped:  # one diffusers layer: every kind's tensors as they are
        return {f"transformer.{paths[0]}.{suffix}": t for suffix, t in parts.items()}
    if any(s not in LORA for s in parts):  # another kind (LoHa, LoKr, IA3, diff, DoRA): split as a whole
        return _split_other(written, fused, parts, transformer, source)
    return _split_lora(written, fused, {LORA[s]: t for s, t in parts.items()}, transformer, source)


def _split_lora(written: str, fused: Fused, parts: Mapping[str, torch.Tensor], transformer, source) -> dict:
    paths = fused.paths
    if "down" not in parts or "up" not in parts:
        raise LoraKitError(f"{source}: {written} needs both lora_down and lora_up")
    down, up = parts["down"], parts["up"]
    sizes = out_sizes(transformer, paths)
    if down.dim() != 2 or up.shape != (sum(sizes), down.shape[0]):
        raise LoraKitError(
            f"{source}: {written} has down {tuple(down.shape)} / up {tuple(up.shape)}, but its layers "
            f"{', '.join(paths)} need a 2-d down and an up of {sum(sizes)} rows x down's rank"
        )
    alpha = parts.get("alpha", torch.tensor(float(down.shape[0])))  # no alpha means alpha = rank
    if fused.swapped:
        up = swap_halves(up)
    blocks = up.split(sizes)
    # A part whose rows are all zero carries no delta (a lora_kit file writes them for layers it had no adapter on);
    # leave that layer alone, unless the whole module is zero (an untrained file still loads everywhere).
    keep = [i for i, block in enumerate(blocks) if block.any()] or range(len(paths))
    out = {}
    for i in keep:
        prefix = f"transformer.{paths[i]}."
        out[prefix + "lora_down.weight"] = down
        out[prefix + "lora_up.weight"] = blocks[i].contiguous()
        out[prefix + "alpha"] = alpha
    return out


def _split_other(written: str, fused: Fused, parts: Mapping[str, torch.Tensor], transformer, source) -> dict:
    """Another adapter kind's tensors on a fused module as one adapter per part, by rows (kinds.split_rows)."""
    from ..kinds import split_rows

    why = "its (shift, scale) halves are swapped" if fused.swapped else None
    if why is None:
        try:
            pieces = split_rows(dict(parts), out_sizes(transformer, fused.paths))
        except ValueError as e:
            why = str(e)
    if why is not None:
        kinds = ", ".join(sorted(parts))
        raise LoraKitError(f"{source}: {written} fuses {', '.join(fused.paths)}; its {kinds} cannot be split: {why}")
    pairs = zip(fused.paths, pieces, strict=True)
    return {f"transformer.{path}.{suffix}": t for path, piece in pairs for suffix, t in piece.items()}


def fuse(parts: list[Mapping[str, torch.Tensor] | None], sizes: list[int]) -> dict[str, torch.Tensor]:
    """One down/up/alpha for a fused module from its parts (None: no adapter), with every part's delta exact."""
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


def to_original(
    groups: Mapping[str, Mapping[str, torch.Tensor]], transformer: nn.Module, writer: str
) -> dict[str, dict[str, torch.Tensor]]:
    """{diffusers path: {'down', 'up', 'alpha'}} of a FLUX/SD3 transformer -> {original module name: fused factors}.
    A layer the original tree has no name for is an error naming `writer` (whose layout it is)."""
    table = layout(transformer)
    owner = {path for fused in table.values() for path in fused.paths}
    unnamed = sorted(set(groups) - owner)
    if unnamed:
        tree = layout_name(transformer) or f"{type(transformer).__name__}'s original"
        raise LoraKitError(
            f"transformer.{unnamed[0]} has no name in {writer}'s {tree} layout; save with format='peft'"
        )
    out = {}
    for name, fused in table.items():
        parts = [groups.get(p) for p in fused.paths]
        if all(p is None for p in parts):
            continue
        factors = fuse(parts, out_sizes(transformer, fused.paths))
        if fused.swapped:
            factors["up"] = swap_halves(factors["up"])
        out[name] = factors
    return out
