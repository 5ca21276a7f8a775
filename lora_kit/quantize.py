"""A frozen base held quantized, with adapters beside it (QLoRA): `lora-train --quantize-base fp8|int8|nf4`.

`quantize_base(module, scheme)` replaces the weight of every floating-point nn.Linear in `module` by a torchao
weight-only tensor in place (the module stays an nn.Linear; its forward dequantizes as it multiplies): fp8
(Float8WeightOnlyConfig, per-row scales), int8 (Int8WeightOnlyConfig, per-row scales) or nf4 (QLoRA's 4-bit
NormalFloat, blocks of 64 with double-quantized scales). All three run on the CPU as on CUDA, and carry gradients to
their input, so adapters train over them. Convolutions and norms stay as they are (as the peers' trainers keep
them).

Pipelines quantized by their owner load adapters too: diffusers' BitsAndBytesConfig (bitsandbytes' Linear4bit and
Linear8bitLt modules), TorchAoConfig, or this module. A wrapper over a quantized base never touches its weight: the
adapters run on the activations beside the base's own op (layers.LoraWrapper), and a kind that needs the weight
itself (DoRA's norms) reads a dequantized copy for the call (`dense`). Fusing or collapsing into a quantized layer is
refused (it would dequantize the layer in place).
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch import nn

from .errors import LoraKitError

SCHEMES = ("fp8", "int8", "nf4")
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256  # QLoRA's: 64 weights share a scale; 256 scales share their own quantization


def is_quantized(weight: torch.Tensor | None) -> bool:
    """Whether a layer's weight is held quantized: an integer/byte tensor (bitsandbytes' Int8Params, Params4bit) or
    a tensor subclass that computes from packed data (torchao, optimum-quanto). FSDP's DTensor is none."""
    if weight is None:
        return False
    if not weight.is_floating_point():
        return True
    kind = type(weight)
    return kind not in (torch.Tensor, nn.Parameter) and kind.__name__ != "DTensor"


def dense(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a plain floating-point tensor (a dequantized copy of a quantized one, in its compute
    dtype; the weight itself otherwise). Never writes into the layer."""
    w = module.weight
    if not is_quantized(w):
        return w
    with torch.no_grad():
        if type(w).__name__ == "Params4bit":
            import bitsandbytes.functional as bnbf

            return bnbf.dequantize_4bit(w.data, w.quant_state).to(_compute_dtype(module))
        if type(w).__name__ == "Int8Params":  # (LLM.int8: per-row absmax scales SCB, rows scaled to +-127)
            scales = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
            return (w.data.float() * scales.float()[:, None] / 127).to(_compute_dtype(module))
        if hasattr(w, "get_original_weight"):  # torchao NF4Tensor
            return w.get_original_weight()
        if callable(getattr(w, "dequantize", None)):  # torchao's other tensors, optimum-quanto
            return w.dequantize()
    raise LoraKitError(f"{type(module).__name__}: its weight is a {type(w).__name__}, which lora_kit cannot read")


def _compute_dtype(module: nn.Module) -> torch.dtype:
    return getattr(module, "compute_dtype", None) or torch.float32


def shape(module: nn.Module) -> tuple[int, ...]:
    """The layer's weight shape as its op sees it (bitsandbytes' 4-bit weight is packed into another shape)."""
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    return tuple(module.weight.shape)


def refuse(module: nn.Module, name: str, what: str) -> None:
    """One line for an operation that would write into a quantized layer's weight (fuse, collapse)."""
    if is_quantized(getattr(module, "weight", None)):
        raise LoraKitError(f"{name}: {what} into a quantized layer ({type(module.weight).__name__}) would dequantize "
                           "it in place; the adapters run unfused beside it (load the unquantized model to "
                           f"{what})")  # fmt: skip


@contextlib.contextmanager
def _quiet_import():
    """torchao logs a warning per CUDA kernel library it cannot load (every one, on a CPU-only torch)."""
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def torchao():
    """torchao, or one line saying it is missing (check_before_loading asks before the model loads)."""
    try:
        with _quiet_import():
            import torchao
    except ImportError:
        raise LoraKitError("quantizing the base needs torchao (pip install torchao)") from None
    return torchao


def _nf4(weight: torch.Tensor):
    """QLoRA's NF4 of `weight`: blocks of 64, their scales quantized in groups of the largest divisor of their count
    up to 256 (256 where the layer allows, as QLoRA; small layers take a smaller group)."""
    from torchao.quantization import to_nf4

    blocks = weight.numel() // NF4_BLOCK
    group = max(d for d in range(1, min(blocks, NF4_SCALER_BLOCK) + 1) if blocks % d == 0)
    return to_nf4(weight, NF4_BLOCK, group)


def quantizable(module: nn.Module, scheme: str) -> bool:
    """A floating-point nn.Linear the scheme can hold (nf4: a weight of whole blocks of 64)."""
    w = getattr(module, "weight", None)
    if type(module) is not nn.Linear or w is None or is_quantized(w) or w.is_meta:
        return False
    return scheme != "nf4" or w.numel() % NF4_BLOCK == 0


def quantize_base(module: nn.Module, scheme: str) -> int:
    """Hold every floating-point nn.Linear of `module` quantized by `scheme` (fp8, int8, nf4), frozen; returns how
    many layers it quantized. Call it before adapters are added (lora_kit's wrappers keep the layer as `.base`)."""
    if scheme not in SCHEMES:
        raise LoraKitError(f"quantization {scheme!r} is not one of {', '.join(SCHEMES)}")
    torchao()
    layers = [m for m in module.modules() if quantizable(m, scheme)]
    if scheme == "nf4":
        for layer in layers:
            layer.weight = nn.Parameter(_nf4(layer.weight.detach()), requires_grad=False)
        return len(layers)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = Float8WeightOnlyConfig() if scheme == "fp8" else Int8WeightOnlyConfig()
    chosen = {id(m) for m in layers}
    with _quiet_import():
        quantize_(module, config, filter_fn=lambda m, _: id(m) in chosen)
    for layer in layers:
        layer.weight.requires_grad_(False)
    return len(layers)


def describe(module: nn.Module) -> str | None:
    """What a model's linear layers are held in, e.g. 'int8 (Int8Tensor) x 52 of 60 linear layers'; None when none
    is quantized (written into the LoRA's metadata: what it trained on)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    kinds = sorted({type(m.weight).__name__ for m in linears if is_quantized(m.weight)})
    count = sum(is_quantized(m.weight) for m in linears)
    if not count:
        return None
    return f"{', '.join(kinds)} x {count} of {len(linears)} linear layers"


def nbytes(module: nn.Module) -> int:
    """Bytes the module's parameters and buffers hold, quantized ones by their packed data."""
    total = 0
    for t in (*module.parameters(), *module.buffers()):
        inner = getattr(t, "__tensor_flatten__", None)
        if inner is not None and is_quantized(t):
            names, _ = t.__tensor_flatten__()
            total += sum(math.prod(getattr(t, n).shape) * getattr(t, n).element_size() for n in names)
        else:
            total += t.numel() * t.element_size()
    return total


def quantize_pipeline(pipe, base: str = "none", text_encoders: str = "none") -> dict[str, str]:
    """Quantize a pipeline's UNet/transformer by `base` and its text encoders by `text_encoders` ("none" leaves
    them); returns {component: describe()} of every component now holding quantized layers."""
    from .state import components

    done = {}
    for name, module in components(pipe).items():
        scheme = text_encoders if name.startswith("text_encoder") else base
        if scheme != "none":
            quantize_base(module, scheme)
        if (what := describe(module)) is not None:
            done[name] = what
    return done
