"""Describe a base model: which architecture a pipeline or module is (sd1, sd2, sdxl, sd3, flux)."""

from __future__ import annotations

from torch import nn

ARCHITECTURES = ("sd1", "sd2", "sdxl", "sd3", "flux")

# kohya `ss_base_model_version` and SAI `modelspec.architecture` (for a LoRA) per architecture
SS_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1"}
MODELSPEC_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-768-v/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
    "sd3": "stable-diffusion-3-medium/lora",
    "flux": "flux-1-dev/lora",
}


def architecture(comps: dict[str, nn.Module]) -> str:
    """The architecture of a pipeline's components ({'unet': ..., 'text_encoder': ...})."""
    if "transformer" in comps:
        cls = type(comps["transformer"]).__name__
        return "flux" if "Flux" in cls else "sd3"
    if "unet" in comps:
        config = comps["unet"].config
        if config.get("addition_embed_type") == "text_time":
            return "sdxl"
        cross = config.get("cross_attention_dim")
        return "sd2" if cross == 1024 or config.get("use_linear_projection") else "sd1"
    if "text_encoder_2" in comps:
        return "sdxl"
    return "sd1"
