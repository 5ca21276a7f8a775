"""Sharded training through accelerate's FSDP (version 2): what the shared loop needs besides data parallelism.

Under `accelerate launch --config_file lora_kit/assets/accelerate/fsdp.yaml` accelerate shards the UNet or
transformer (`fully_shard` on each repeated block, backbone.REPEATED_BLOCKS, and on the rest), so no process holds
the whole frozen model, and FSDP reduces the gradients itself. The adapters' tensors are then DTensors, each process
holding a slice; `gathered` shows them (and the optimizer's state) whole for the main process to write a checkpoint
or the output, in the very format of a one-process run, and puts back what a --resume loaded into them. The text
encoders and the VAE stay whole in every process (frozen, and small beside a 12-32B transformer).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from ..errors import LoraKitError
from .backbone import REPEATED_BLOCKS
from .config import ConfigError, TrainConfig

EXAMPLE = "lora_kit/assets/accelerate/fsdp.yaml"


def requested() -> bool:
    """accelerate launch was given an FSDP config (it passes the config on to each process in the environment)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check(cfg: TrainConfig) -> None:
    """Refuse, before the model loads, what sharded training does not cover (one line each)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise LoraKitError(f"DeepSpeed is not supported: lora-train shards through accelerate's FSDP (see {EXAMPLE})")
    if not requested():
        return
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise LoraKitError(f"FSDP version {os.environ.get('FSDP_VERSION', '1')} is not supported: set fsdp_version: 2 "
                           f"in the accelerate config (see {EXAMPLE})")  # fmt: skip
    # each of these reads or writes the sharded model in the main process alone, or keeps tensors FSDP cannot shard
    unsupported = {
        "mode": (cfg.mode not in ("lora", "dreambooth"), "only lora and dreambooth (token rows do not shard)"),
        "text_encoder_rank": (cfg.text_encoder_rank > 0, "0 (the text encoders are not sharded)"),
        "validation_prompt": (bool(cfg.validation_prompt and cfg.validate_every), "none (samples run in one process)"),
        "ema": (cfg.ema is not None, "none"),
        "optimizer": (cfg.optimizer != "adamw", "adamw"),
        "compile": (cfg.compile, "off"),
        "offload_blocks": (cfg.offload_blocks > 0, "0 (FSDP holds a slice of every block instead)"),
        "quantize_base": (cfg.quantize_base != "none", "none (torchao's quantized weights do not shard)"),
        "mixed_precision": (cfg.mixed_precision == "fp16", "no or bf16"),
    }
    for name, (refused, allowed) in unsupported.items():
        if refused:
            raise ConfigError(name, getattr(cfg, name), f"under FSDP sharding it must be {allowed}")


def enable_on_cpu(accelerator) -> None:
    """accelerate 1.16 turns an FSDP config into plain data parallelism on the CPU (its state takes the FSDP branch
    for GPUs and other accelerators only), though torch's fully_shard runs there over gloo: set the state as
    accelerate sets it on a GPU, so that 2 CPU processes test the code path the GPUs run."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if requested() and state.distributed_type == DistributedType.MULTI_CPU:
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
        if accelerator.mixed_precision != "no":  # (bf16: FSDP gathers the weights and reduces the gradients in it)
            state.fsdp_plugin.set_mixed_precision(accelerator.mixed_precision)
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def prepare(accelerator, recipe, main: torch.nn.Module, optimizer):
    """The optimizer prepared by accelerate; under FSDP together with `main` (the UNet or transformer), which it
    shards in place, wrapping each repeated block unless the config names its own classes. The recipe's groups then
    hold the sharded parameters (the optimizer's)."""
    if not sharded(accelerator):
        return accelerator.prepare(optimizer)
    plugin = accelerator.state.fsdp_plugin
    if plugin.transformer_cls_names_to_wrap is None:
        present = {type(m).__name__ for m in main.modules()}
        names = set(REPEATED_BLOCKS) | set(getattr(main, "_repeated_blocks", None) or ())
        plugin.transformer_cls_names_to_wrap = sorted(names & present)
    prepared, optimizer = accelerator.prepare(main, optimizer)
    if prepared is not main:  # (fully_shard works in place; the pipeline must run the sharded module)
        raise LoraKitError("accelerate returned another module than the one it sharded; this version is not supported")
    for group, prepared_group in zip(recipe.groups, optimizer.param_groups, strict=True):
        group["params"] = prepared_group["params"]
    recipe.lora = recipe.trainable()  # (lora and dreambooth: the UNet's or transformer's adapters alone)
    return optimizer


def described(accelerator, main: torch.nn.Module) -> str:
    """What the start line says of the sharding: how many FSDP units (the repeated blocks, the rest of the model)."""
    if not sharded(accelerator):
        return ""
    from torch.distributed.fsdp import FSDPModule

    units = sum(isinstance(m, FSDPModule) for m in main.modules())
    return f", the {'UNet' if 'UNet' in type(main).__name__ else 'transformer'} sharded by FSDP in {units} units"


@contextlib.contextmanager
def gathered(accelerator, main: torch.nn.Module, optimizer) -> Iterator[None]:
    """Inside, every process sees the trainable tensors of `main` and their optimizer state whole (plain tensors, as
    in a one-process run); on leaving, each takes its own slice of what they then hold back (a --resume loads into
    them). Every process must enter it: gathering is collective. Outside FSDP it does nothing."""
    if not sharded(accelerator):
        yield
        return
    from torch.distributed.tensor import DTensor

    inner = getattr(optimizer, "optimizer", optimizer)
    params = [p for g in inner.param_groups for p in g["params"]]
    ids = {id(p) for p in params}
    owners = [(m, n, p) for m in main.modules() for n, p in m._parameters.items() if id(p) in ids]
    with torch.no_grad():
        whole = {id(p): torch.nn.Parameter(p.full_tensor(), requires_grad=False) for _, _, p in owners}
        for module, name, p in owners:
            module._parameters[name] = whole[id(p)]
        for p in [p for p in params if p in inner.state]:  # AdamW's moments are sharded as their parameter is
            inner.state[p] = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in inner.state[p].items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, p in owners:
                module._parameters[name] = p
                p.copy_(_slice(whole[id(p)], p))
            for p in [p for p in params if p in inner.state]:  # (its step count is a plain number: left as it is)
                inner.state[p] = {k: _slice(v, p) if _whole(v, p) else v for k, v in inner.state[p].items()}


def _whole(t, param) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, torch.Tensor) and not isinstance(t, DTensor) and t.shape == param.shape


def _slice(t: torch.Tensor, like):
    """This process's part of the whole tensor `t`, laid out as the DTensor `like` (each process slices its own: no
    communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
