"""Training: a flat config, one shared loop, and short recipes for lora, dreambooth, textual inversion, pivotal.

from lora_kit.train import TrainConfig, train
train(TrainConfig(model="toy", data="photos/", output="sks.safetensors", mode="dreambooth", ...))
"""

from .._callable import callable_module


def __getattr__(name: str):
    # lazy, so that importing lora_kit.train (the CLI's --help) does not load torch
    if name == "train":
        from .loop import train

        return train
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'lora_kit.train' has no attribute {name!r}")


callable_module(__name__, "train")  # lora_kit.train(config), as exported from lora_kit: see _callable
