"""lora_kit: LoRA adapters for diffusion models (SD1/SD2/SDXL UNets, SD3/FLUX transformers, CLIP/T5 encoders).

Importing this package is instant; torch and diffusers load on first use of an attribute below.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "api": ["load", "unload", "save", "collapse", "set_weights", "fuse", "unfuse"],
    "schedule": ["schedule", "unschedule"],
    "layers": ["LoraInjectedLinear", "LoraInjectedConv2d", "LoraAdapter"],
    "inject": [
        "inject_lora", "remove_lora", "collapse_lora", "set_weight", "tune_lora_scale", "enable_lora",
        "extract_lora_ups_down", "lora_modules", "lora_parameters", "find_targets",
    ],
    "targets": ["Target", "PRESETS"],
    "state": ["lora_state_dict", "load_lora_state_dict"],
    "errors": ["LoraKitError"],
    "tools": ["merge", "resize", "extract", "convert", "inspect"],
    "models": ["open_pipeline", "toy_model"],
    "train": ["train", "TrainConfig"],
}  # fmt: skip
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE) + ["__version__"]


def __getattr__(name: str):
    if name in _WHERE:
        module = importlib.import_module(f".{_WHERE[name]}", __name__)
        # `schedule` and `train` are submodules and functions: the package attribute is the (callable) module
        return module if _WHERE[name] == name else getattr(module, name)
    raise AttributeError(f"module 'lora_kit' has no attribute {name!r}")


def __dir__():
    return __all__
