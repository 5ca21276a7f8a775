"""Target presets as data: which Linear/Conv2d layers of a model get adapters.

A `Target` names parent module classes (matched by isinstance, never by class name) and a regex over the path of a
layer relative to that parent; with no parents the regex runs over the full module path. `kinds` says which layers
qualify: `linear`, `conv1x1` (1x1 convs, which kohya treats like linears) and `conv` (kernels larger than 1x1).

A parent is an nn.Module class or a "package.module:Class" string. The presets use strings so that they can name
classes some installed library versions lack (FLUX's on an older diffusers): a string whose module or class this
install lacks is skipped, but a Target none of whose parents exists is an error, not a Target that matches nothing.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

from torch import nn

from .errors import LoraKitError

KINDS = ("linear", "conv1x1", "conv")


# "package.module:Class" (the class may be nested: "module:Outer.Inner")
_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_PARENT_FORMS = 'give nn.Module classes or "package.module:Class" strings'


def _as_tuple(value, field: str) -> tuple:
    """A field's value as a tuple: one bare entry (a string, a class) counts as a tuple of one, so that
    parents="pkg.mod:Class" is not read as its characters."""
    if isinstance(value, (str, type)):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise LoraKitError(f"Target.{field} is {value!r}; give a tuple") from None


def _is_module_class(value) -> bool:
    return isinstance(value, type) and issubclass(value, nn.Module)


@dataclass(frozen=True)
class Target:
    parents: tuple[type | str, ...] = ()  # nn.Module classes or "package.module:Class"; () = the whole model
    children: str | None = None  # regex, fullmatch on the layer path relative to the parent; None = every layer
    kinds: tuple[str, ...] = ("linear", "conv1x1")

    def __post_init__(self):
        parents, kinds = _as_tuple(self.parents, "parents"), _as_tuple(self.kinds, "kinds")
        for parent in parents:
            if isinstance(parent, str) and not _SPEC.fullmatch(parent):
                raise LoraKitError(f"Target.parents has {parent!r}, which is not \"package.module:Class\"; "
                                   + _PARENT_FORMS)  # fmt: skip
            if not isinstance(parent, str) and not _is_module_class(parent):
                raise LoraKitError(f"Target.parents has {parent!r}, which is not an nn.Module class; {_PARENT_FORMS}")
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise LoraKitError(f"Target.kinds has {bad}; allowed: {list(KINDS)}")
        if self.children is not None:
            try:
                re.compile(self.children)
            except (re.error, TypeError) as e:
                raise LoraKitError(f"Target.children {self.children!r} is not a regular expression ({e})") from None
        object.__setattr__(self, "parents", parents)  # frozen: the normalised tuples replace what was given
        object.__setattr__(self, "kinds", kinds)

    def parent_classes(self) -> tuple[type, ...]:
        """The parent classes: those given as classes, and those strings name that exist in the installed libraries
        (a preset may name classes of several versions). LoraKitError when none exists, or when a string names
        something that is not an nn.Module class."""
        found = []
        for parent in self.parents:
            if not isinstance(parent, str):
                found.append(parent)
                continue
            module_name, _, qualname = parent.partition(":")
            try:
                value = importlib.import_module(module_name)
                for attr in qualname.split("."):
                    value = getattr(value, attr)
            except (ImportError, AttributeError):
                continue  # e.g. a FLUX class on a diffusers without FLUX; other parents of the preset still match
            if not _is_module_class(value):
                raise LoraKitError(f"Target.parents has {parent!r}, which names {value!r}, not an nn.Module class")
            found.append(value)
        if self.parents and not found:
            raise LoraKitError(f"Target.parents: none of {', '.join(map(repr, self.parents))} exists in the installed "
                               "libraries")  # fmt: skip
        return tuple(found)


def layer_kind(layer: nn.Module) -> str | None:
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, nn.Conv2d):
        return "conv1x1" if tuple(layer.kernel_size) == (1, 1) else "conv"
    return None


_ATTN = (
    "diffusers.models.attention_processor:Attention",
    "diffusers.models.transformers.transformer_flux:FluxAttention",
)
_TRANSFORMER_2D = ("diffusers.models.transformers.transformer_2d:Transformer2DModel",)
_RESNET = (
    "diffusers.models.resnet:ResnetBlock2D",
    "diffusers.models.downsampling:Downsample2D",
    "diffusers.models.upsampling:Upsample2D",
)
_CLIP_ATTN = ("transformers.models.clip.modeling_clip:CLIPAttention",)
_CLIP_MLP = ("transformers.models.clip.modeling_clip:CLIPMLP",)
_DIT_BLOCKS = (
    "diffusers.models.attention:JointTransformerBlock",
    "diffusers.models.transformers.transformer_sd3:SD3SingleTransformerBlock",
    "diffusers.models.transformers.transformer_flux:FluxTransformerBlock",
    "diffusers.models.transformers.transformer_flux:FluxSingleTransformerBlock",
)

PRESETS: dict[str, tuple[Target, ...]] = {
    # diffusers training examples: the attention projections only
    "attn": (Target(_ATTN, r"to_q|to_k|to_v|to_out\.0"),),
    # kohya's default: every Linear / 1x1 conv inside the transformer blocks (attn1/attn2, proj_in/out, ff)
    "kohya": (Target(_TRANSFORMER_2D),),
    # LoCon / LoRA-C3Lier: kohya plus the resnet convs (3x3 too), conv_shortcut, time_emb_proj, down/upsamplers
    "locon": (Target(_TRANSFORMER_2D), Target(_RESNET, kinds=("linear", "conv1x1", "conv"))),
    "clip-attn": (Target(_CLIP_ATTN, r"q_proj|k_proj|v_proj|out_proj"),),
    "clip-all": (Target(_CLIP_ATTN, r"q_proj|k_proj|v_proj|out_proj"), Target(_CLIP_MLP, r"fc1|fc2")),
    # SD3 / FLUX transformer blocks: attention and MLP linears, not the AdaLN modulation
    "dit": (Target(_DIT_BLOCKS, r"(attn\d?|ff|ff_context)\..+|proj_mlp|proj_out"),),
}


def resolve(targets) -> tuple[Target, ...]:
    """A preset name, a Target, or a sequence of them -> a tuple of Targets."""
    if isinstance(targets, str):
        if targets not in PRESETS:
            raise LoraKitError(f"unknown target preset {targets!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[targets]
    if isinstance(targets, Target):
        return (targets,)
    out: list[Target] = []
    for t in targets:
        out.extend(resolve(t))
    if not out:
        raise LoraKitError("targets is empty")
    return tuple(out)
