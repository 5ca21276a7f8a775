"""Adapters under accelerate's sequential CPU offload (pipe.enable_sequential_cpu_offload, accelerate.cpu_offload).

Sequential offload keeps every module's weights on the meta device and brings them onto the execution device only
while that module is called (an AlignDevicesHook with offload=True on each module that holds tensors). A wrapper
reads its adapters' tensors itself, never calling the adapter modules, so adapters are kept out of the offload:
they live on the execution device (a LoRA is a few percent of the model) and the base layer streams as before.

- loaded into an offloaded layer: the adapter is created on the hook's execution device (`home`);
- offloaded after the load (accelerate put the adapter's tensors on meta, their values in its weights map): the
  layer takes them back when it next builds its cached pair (`reclaim`: the adapter's hook removed, which restores
  the values, then moved to the execution device), once, not per call.

Whole-model offload (enable_model_cpu_offload) moves whole components and needs none of this.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import LoraKitError


def execution_device(module: nn.Module) -> torch.device | None:
    """The device an offloading accelerate hook on `module` (not its children) computes on; None without one."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", (hook,)):  # (a SequentialHook chains several)
        if getattr(h, "offload", False) and getattr(h, "execution_device", None) is not None:
            device = h.execution_device
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return None


def home(base: nn.Module) -> torch.device:
    """Where a new adapter of the layer `base` goes: beside its weight, or, where sequential offload holds that
    weight on meta, on the execution device (a meta model without offload, as lora_kit builds to map names, keeps
    its adapters on meta)."""
    device = base.weight.device
    if device.type == "meta":
        return execution_device(base) or device
    return device


def reclaim(adapters, strict: bool = True) -> None:
    """Give every adapter whose factors are on meta its values back from the accelerate hook that offloaded it, on
    that hook's execution device; with `strict` (about to compute with them), LoraKitError for one that has no
    values anywhere."""
    for adapter in adapters:
        if not (adapter.down.is_meta or adapter.up.is_meta or adapter.alpha.is_meta):
            continue
        device = execution_device(adapter)
        if device is None:
            if not strict:
                continue
            raise LoraKitError(
                "an adapter's factors are on the meta device with no values to compute with (a model built on meta "
                "computes nothing); load the LoRA into a model with weights"
            )
        from accelerate.hooks import remove_hook_from_module

        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, even within a pipeline call under it
            remove_hook_from_module(adapter)  # (its detach puts the values back where they were before offload)
            adapter.to(device)
