"""The PEFT LoraConfig a diffusers/PEFT LoRA file carries in its `lora_adapter_metadata` header (component-prefixed
keys: `unet.lora_alpha`, `unet.r`, `unet.alpha_pattern`, ...): each module's alpha, without torch (lora-inspect
reads it from the header alone)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

from ..errors import LoraKitError

METADATA_KEY = "lora_adapter_metadata"


def alpha_for(path: str, rank: int, config: Mapping | None) -> float | None:
    if config is None:
        return None
    alpha = float(config.get("lora_alpha", config.get("r", rank)))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):  # peft.utils.other.get_pattern_key: the first match wins
            alpha = float(value)
            break
    if config.get("use_rslora"):  # scale alpha / sqrt(r) == (alpha * sqrt(r)) / r
        alpha *= math.sqrt(rank)
    return alpha


def configs_of(metadata: Mapping[str, str], source: str) -> dict[str, dict]:
    """{component: LoraConfig fields} from the `lora_adapter_metadata` header, if any."""
    configs: dict[str, dict] = {}
    if metadata.get(METADATA_KEY):
        try:
            flat = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError:
            raise LoraKitError(f"{source}: its {METADATA_KEY} header is not JSON") from None
        for key, value in flat.items():
            component, _, field = key.partition(".")
            configs.setdefault(component, {})[field] = value
    return configs
