"""What a single `.safetensors` (or, allowed, pickled) file holds, told from its keys alone: a whole checkpoint of
SD1/SD2/SDXL/SD3/FLUX, one part (a FLUX/SD3 transformer, a VAE, a CLIP or T5 text encoder), a LoRA, or none of these.

Reads the header only. The parts and the prefixes they sit under are what a writer needs to give back the same
layout (`LAYOUTS`: A1111/SGM names for SD1/SD2/SDXL, ComfyUI's for SD3/FLUX).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# per architecture: component -> (namer in layout.NAMERS, the prefix a whole checkpoint keeps it under)
LAYOUTS = {
    "sd1": {"unet": ("unet", "model.diffusion_model."), "vae": ("vae", "first_stage_model."),
            "text_encoder": ("clip", "cond_stage_model.transformer.")},
    "sd2": {"unet": ("unet", "model.diffusion_model."), "vae": ("vae", "first_stage_model."),
            "text_encoder": ("openclip", "cond_stage_model.model.")},
    "sdxl": {"unet": ("unet", "model.diffusion_model."), "vae": ("vae", "first_stage_model."),
             "text_encoder": ("clip", "conditioner.embedders.0.transformer."),
             "text_encoder_2": ("openclip", "conditioner.embedders.1.model.")},
    "sd3": {"transformer": ("mmdit", "model.diffusion_model."), "vae": ("vae", "first_stage_model."),
            "text_encoder": ("clip", "text_encoders.clip_l.transformer."),
            "text_encoder_2": ("clip", "text_encoders.clip_g.transformer."),
            "text_encoder_3": ("t5", "text_encoders.t5xxl.transformer.")},
    "flux": {"transformer": ("bfl", "model.diffusion_model."), "vae": ("vae", "first_stage_model."),
             "text_encoder": ("clip", "text_encoders.clip_l.transformer."),
             "text_encoder_2": ("t5", "text_encoders.t5xxl.transformer.")},
}  # fmt: skip
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}  # fmt: skip

_UNET = "model.diffusion_model.input_blocks.0.0.weight"
_MAIN = {"mmdit": "joint_blocks.0.x_block.attn.qkv.weight", "bfl": "double_blocks.0.img_attn.qkv.weight"}
_VAE = ("encoder.conv_in.weight", "decoder.conv_out.weight")
_CLIP = "text_model.embeddings.token_embedding.weight"
_OPENCLIP = "token_embedding.weight"
_T5 = "encoder.block.0.layer.0.SelfAttention.q.weight"
_LORA_MARKS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1", ".lokr_w1", ".alpha", "lora_unet_",
               "lora_te", ".diff", ".dora_scale", ".lora_magnitude_vector")  # fmt: skip
_PREDICTION = {"v": "v_prediction", "epsilon": "epsilon"}


@dataclass
class Checkpoint:
    """One file's contents: `arch` (None for a part alone), `parts` {component: prefix}, `namers` {component: namer}.
    A part alone (a VAE, a CLIP, a T5, a FLUX/SD3 transformer file) names its component by what it is: "vae",
    "clip", "t5", "transformer"; an assembly assigns it to the pipeline's slot."""

    path: Path
    arch: str | None
    parts: dict[str, str] = field(default_factory=dict)
    namers: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    part_arch: str | None = None  # a transformer alone: the architecture it is of

    def describe(self) -> str:
        parts = ", ".join(sorted(self.parts))
        what = f"a {ARCH_NAMES[self.arch]} checkpoint" if self.arch else "a model part"
        return f"{what} ({parts})"

    def prediction(self) -> str | None:
        """The prediction type the file states: lora_kit's/SAI's modelspec entry, or the `v_pred` key A1111 and
        ComfyUI read; None when it does not say."""
        stated = _PREDICTION.get(self.metadata.get("modelspec.prediction_type", ""))
        if stated:
            return stated
        return "v_prediction" if "v_pred" in self.shapes else None


ARCH_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX.1"}


def looks_like_lora(keys) -> bool:
    return any(mark in k for k in keys for mark in _LORA_MARKS)


def sniff(path: str | Path, entries: dict | None = None, metadata: dict | None = None) -> Checkpoint | None:
    """The checkpoint (or part) a file holds, or None when its keys are of no model lora_kit knows. `entries`
    and `metadata` are the file's header when the caller read it already (safetensors; a pickle's keys and shapes)."""
    from ..formats import files

    if entries is None:
        entries, metadata = files.read_header(path)
    shapes = {k: list(e["shape"]) for k, e in entries.items()}
    dtypes = {k: e.get("dtype", "") for k, e in entries.items()}
    found = Checkpoint(Path(path), None, metadata=dict(metadata or {}), shapes=shapes, dtypes=dtypes)
    main = None
    if _UNET in shapes:
        main = ("unet", "model.diffusion_model.")
    for namer, key in _MAIN.items():
        for prefix in ("model.diffusion_model.", ""):
            if prefix + key in shapes:
                main = (namer, prefix)
    if main is not None:
        namer, prefix = main
        comp = "unet" if namer == "unet" else "transformer"
        found.parts[comp], found.namers[comp] = prefix, namer
        if prefix:
            found.arch = _arch(namer, shapes)
        else:  # a transformer alone (BFL's flux1-dev.safetensors): a part, of this architecture
            found.part_arch = _arch(namer, shapes)
    for comp, (namer, prefix) in LAYOUTS.get(found.arch or "", {}).items():
        for p in () if comp in found.parts else _prefixes(comp, prefix):
            if _holds(namer, p, shapes):
                found.parts[comp], found.namers[comp] = p, namer
                break
    if not found.parts:  # a part alone, stored under its own names
        for namer in ("vae", "clip", "t5"):
            if _holds(namer, "", shapes):
                found.parts[namer], found.namers[namer] = "", namer
                break
    return found if found.parts else None


def _holds(namer: str, prefix: str, shapes) -> bool:
    if namer == "vae":
        return all(prefix + k in shapes for k in _VAE)
    if namer == "t5":
        return prefix + "shared.weight" in shapes or prefix + _T5 in shapes
    return prefix + (_CLIP if namer == "clip" else _OPENCLIP) in shapes


def _prefixes(comp: str, prefix: str) -> tuple[str, ...]:
    """The prefixes a component is found under in the wild: the VAE of a ComfyUI FLUX file may be `vae.`."""
    return (prefix, "vae.") if comp == "vae" else (prefix,)


def _arch(main: str, shapes: dict[str, list[int]]) -> str:
    if main == "mmdit":
        return "sd3"
    if main == "bfl":
        return "flux"
    if "model.diffusion_model.label_emb.0.0.weight" in shapes or any(k.startswith("conditioner.") for k in shapes):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "sd2"  # OpenCLIP ViT-H: SD2's encoder
    if any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        return "sd1"
    # a UNet without its text encoder: SD2 projects with linears and attends to 1024-wide text
    for key, shape in shapes.items():
        if key.endswith("transformer_blocks.0.attn2.to_k.weight"):
            if shape[-1] == 1024:
                return "sd2"
        if key.endswith(".1.proj_in.weight") and key.startswith("model.diffusion_model.input_blocks."):
            if len(shape) == 2:
                return "sd2"
    return "sd1"
