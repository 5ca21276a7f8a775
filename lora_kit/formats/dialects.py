"""Which trainer's key dialect a LoRA file speaks, and the grammar of each, without torch (lora-inspect uses it).

Dialects, as each peer writes them (their own code is the reference):
- `kohya`: sd-scripts `lora_unet_<diffusers or SGM path>` / `lora_te*_` (formats/kohya.py).
- `kohya-bfl`: sd-scripts' and musubi-tuner's FLUX.1 names on Black Forest Labs' tree, `lora_unet_double_blocks_0_
  img_attn_qkv` (q/k/v fused); `sd-scripts-sd3`: sd-scripts' SD3 names on MMDiT's tree, `lora_unet_joint_blocks_0_
  x_block_attn_qkv` (networks/lora_sd3.py). Both read and written by formats/kohya.py through formats/original.py.
- `comfyui`: ComfyUI's LoraSave, ai-toolkit and SimpleTuner's `--lora_format comfyui`: `diffusion_model.<module>.
  <suffix>` where the module is the original checkpoint's path (BFL `double_blocks.0.img_attn.qkv`, MMDiT
  `joint_blocks.0.x_block.attn.qkv`, SGM `input_blocks.4.1...` for UNets) or a diffusers path (ai-toolkit, for some
  models), suffixes lora_A/lora_B or lora_down/lora_up, `.alpha` where written (none: alpha = rank, as ComfyUI
  reads it); text encoders `text_encoders.<clip_l|clip_g|clip_h|t5xxl>.transformer.<path>` (comfy/lora.py's
  generic text-encoder keys). Written by `lora-convert --to comfyui`.
- `xlabs`: XLabs' x-flux, `double_blocks.N.processor.qkv_lora1.down.weight` (lora1 = image stream: img_attn qkv and
  proj; lora2 = text stream), `single_blocks.N.processor.qkv_lora` (q, k, v rows of linear1) / `proj_lora`
  (linear2), no alpha (x-flux's processors scale by 1); optionally under `diffusion_model.`.
- `onetrainer`: OneTrainer's older DiT files, `lora_transformer_<diffusers path with _>` (ComfyUI's key map
  "onetrainer"); its text encoders are kohya's `lora_te1_`/`lora_te2_`.
- `lycoris`: the LyCORIS standalone wrapper (SimpleTuner's LyCORIS files), `lycoris_<diffusers path with _>` of the
  UNet or transformer it wrapped (ComfyUI's "simpletuner lycoris format").
- `peft` (diffusers/PEFT, formats/peft.py) and `legacy` (cloneofsimo, formats/legacy.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

READERS = ("comfyui", "xlabs", "onetrainer", "lycoris")  # the dialects formats/trainers.py reads
COMFY_MAIN, COMFY_TEXT = "diffusion_model.", "text_encoders."
FLAT_PREFIX = {"onetrainer": "lora_transformer_", "lycoris": "lycoris_"}
# ComfyUI's text encoder names -> the pipeline component each is, per architecture (its CLIP/T5 wrappers' names)
COMFY_ENCODERS = {
    "sd1": {"clip_l": "text_encoder"}, "sd2": {"clip_h": "text_encoder"},
    "sdxl": {"clip_l": "text_encoder", "clip_g": "text_encoder_2"},
    "sd3": {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"},
    "flux": {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
}  # fmt: skip
XLABS = re.compile(
    r"(?:diffusion_model\.)?(?P<block>double|single)_blocks\.(?P<i>\d+)\.processor\."
    r"(?P<layer>qkv|proj)_lora(?P<stream>[12]?)\.(?P<part>down|up)\.weight"
)
# canonical suffix of every LoRA factor spelling these dialects use; other suffixes (other adapter kinds) pass as is
LORA_SUFFIXES = {"lora_A.weight": "lora_down.weight", "lora_down.weight": "lora_down.weight",
                 "lora_B.weight": "lora_up.weight", "lora_up.weight": "lora_up.weight", "alpha": "alpha"}  # fmt: skip
_KOHYA_TE = {"lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}


def dialect_of(keys: Iterable[str]) -> str:
    """The dialect of a LoRA file's keys (or of its module stems): kohya, kohya-bfl, sd-scripts-sd3, comfyui,
    xlabs, onetrainer, lycoris, peft or legacy."""
    keys = list(keys)
    if any(":" in k for k in keys):
        return "legacy"
    reader = reader_of(keys)
    if reader is not None:
        return reader
    if any(k.startswith("lora_unet_joint_blocks_") for k in keys):
        return "sd-scripts-sd3"
    if any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in keys):
        return "kohya-bfl"
    return "kohya" if any(k.startswith("lora_") for k in keys) else "peft"


def reader_of(keys: Iterable[str]) -> str | None:
    """The dialect of READERS a file's keys are in (what dispatch.sniff reads it as), or None."""
    keys = list(keys)
    if any(XLABS.fullmatch(k) or ".processor.qkv_lora" in k or ".processor.proj_lora" in k for k in keys):
        return "xlabs"
    if any(k.startswith((COMFY_MAIN, COMFY_TEXT)) for k in keys):
        return "comfyui"
    for dialect, prefix in FLAT_PREFIX.items():
        if any(k.startswith(prefix) for k in keys):
            return dialect
    return None


def main_component(arch: str | None) -> str:
    return "transformer" if arch in ("sd3", "flux") else "unet"


def component_of(key: str, arch: str | None) -> str | None:
    """The pipeline component a key of a dialect file (READERS) holds factors for, or None when it names none."""
    if XLABS.fullmatch(key) or key.startswith((COMFY_MAIN, *FLAT_PREFIX.values())):
        return main_component(arch)
    if key.startswith(COMFY_TEXT):
        encoder = key[len(COMFY_TEXT) :].split(".", 1)[0]
        return COMFY_ENCODERS.get(arch or "", {}).get(encoder)
    if key.startswith("lora_te3_"):
        return "text_encoder_2" if arch == "flux" else "text_encoder_3"
    return next((c for prefix, c in _KOHYA_TE.items() if key.startswith(prefix)), None)


def xlabs_part(key: str) -> tuple[str, str] | None:
    """('double_blocks.0.processor.qkv_lora1', 'down') for an XLabs factor key; None for other keys."""
    m = XLABS.fullmatch(key)
    if m is None:
        return None
    return key[: -len(f".{m['part']}.weight")], m["part"]


def as_stored(tensors: Mapping, fmt: str) -> dict:
    """A dialect file's tensors keyed `<stem>.lora_down.weight / .lora_up.weight / .alpha` with each stem as stored
    (what lora-merge A B and lora-resize work on without a model); to_stored undoes it. Other kinds' keys as they
    are."""
    out = {}
    for key, tensor in tensors.items():
        if fmt == "xlabs" and (split := xlabs_part(key)):
            out[f"{split[0]}.lora_{split[1]}.weight"] = tensor
            continue
        for spelling, canonical in LORA_SUFFIXES.items():
            if key.endswith("." + spelling):
                key = key[: -len(spelling)] + canonical
                break
        out[key] = tensor
    return out


def to_stored(state: Mapping, fmt: str) -> dict:
    """as_stored's keys back in the dialect's spelling. XLabs files have no alpha (x-flux scales by 1): each module's
    alpha / rank is folded into its up (bit-exact where alpha = rank, as read) and the alpha dropped."""
    if fmt != "xlabs":
        return dict(state)
    out = {}
    for key, tensor in state.items():
        if key.endswith(".alpha"):
            continue
        if key.endswith(".lora_up.weight"):
            stem = key[: -len(".lora_up.weight")]
            rank = state[stem + ".lora_down.weight"].shape[0]
            factor = float(state[stem + ".alpha"]) / rank if stem + ".alpha" in state else 1.0
            tensor = tensor if factor == 1.0 else (tensor.float() * factor).to(tensor.dtype)
        out[re.sub(r"\.lora_(down|up)\.weight$", r".\1.weight", key)] = tensor
    return out
