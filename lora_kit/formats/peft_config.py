"""The PEFT config a diffusers/PEFT file carries in its `lora_adapter_metadata` header (component-prefixed keys:
`unet.lora_alpha`, `unet.r`, `unet.alpha_pattern`, ...) or a `save_pretrained` folder in adapter_config.json: each
module's alpha, without torch (lora-inspect reads it from the header alone). A LoraConfig says `lora_alpha` (the
scale is lora_alpha / rank, DoRA's included); a LoHaConfig or LoKrConfig says `alpha`, and scales by alpha / r with r
the config's (or rank_pattern's) rank, whatever the factors' shapes. The fields lora_kit reads are checked once,
here, when the config is read."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

from ..errors import LoraKitError

METADATA_KEY = "lora_adapter_metadata"


def _pattern(pattern: str) -> re.Pattern:
    """The regex PEFT matches an alpha_pattern key with (peft.utils.other.get_pattern_key: a suffix of the path)."""
    return re.compile(rf"(.*\.)?({pattern})$")


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_config(config, where: str) -> dict:
    """`config` (a LoraConfig, LoHaConfig or LoKrConfig as JSON) once the fields alpha_for and kind_scale read are
    what PEFT writes: lora_alpha, alpha and r finite numbers, alpha_pattern and rank_pattern {regex: number} objects,
    use_rslora and use_dora true/false. `where` names the config in the error ("x.safetensors: lora_adapter_metadata
    unet.")."""
    if not isinstance(config, Mapping):
        raise LoraKitError(f"{where.rstrip('. ')}: expected a JSON object, got {type(config).__name__}")
    for field in ("lora_alpha", "alpha", "r"):
        if field in config and not _number(config[field]):
            raise LoraKitError(f"{where}{field} is {json.dumps(config[field])}; expected a finite number")
    if config.get("r") == 0:
        raise LoraKitError(f"{where}r is 0; expected a positive rank")
    for field in ("use_rslora", "use_dora"):
        if field in config and not isinstance(config[field], bool):
            raise LoraKitError(f"{where}{field} is {json.dumps(config[field])}; expected true or false")
    for field in ("alpha_pattern", "rank_pattern"):
        patterns = config.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, Mapping):
            raise LoraKitError(f"{where}{field} is {json.dumps(patterns)}; expected an object {{pattern: number}}")
        for pattern, value in patterns.items():
            if not _number(value) or (field == "rank_pattern" and value == 0):
                raise LoraKitError(f"{where}{field}[{pattern!r}] is {json.dumps(value)}; expected a finite number")
            try:
                re.compile(pattern)
            except re.error as e:
                raise LoraKitError(f"{where}{field} key {pattern!r} is not a regular expression ({e})") from None
    return dict(config)


def _matched(patterns: Mapping | None, path: str, default: float) -> float:
    """The value of the first pattern that matches `path` (as in PEFT), else `default`."""
    for pattern, value in (patterns or {}).items():
        if _pattern(pattern).match(path):
            return float(value)
    return float(default)


def alpha_for(path: str, rank: int, config: Mapping | None) -> float | None:
    """A module's alpha under a LoraConfig checked by check_config (None without one)."""
    if config is None:
        return None
    alpha = _matched(config.get("alpha_pattern"), path, config.get("lora_alpha", config.get("r", rank)))
    if config.get("use_rslora"):  # scale alpha / sqrt(r) == (alpha * sqrt(r)) / r
        alpha *= math.sqrt(rank)
    return alpha


PEFT_KIND_DEFAULT = 8  # LoHaConfig's and LoKrConfig's default r and alpha (a config that leaves them out means it)


def kind_scale(path: str, config: Mapping) -> tuple[float, float]:
    """(alpha, r) of a LoHa or LoKr module under its PEFT config (checked by check_config): its scale is alpha / r."""
    rank = _matched(config.get("rank_pattern"), path, config.get("r", PEFT_KIND_DEFAULT))
    return _matched(config.get("alpha_pattern"), path, config.get("alpha", PEFT_KIND_DEFAULT)), rank


def configs_of(metadata: Mapping[str, str], source: str) -> dict[str, dict]:
    """{component: LoraConfig fields} from the `lora_adapter_metadata` header, if any, checked (check_config)."""
    configs: dict[str, dict] = {}
    if metadata.get(METADATA_KEY):
        try:
            flat = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError:
            raise LoraKitError(f"{source}: its {METADATA_KEY} header is not JSON") from None
        if not isinstance(flat, dict):
            kind = type(flat).__name__
            raise LoraKitError(f"{source}: its {METADATA_KEY} header is a JSON {kind}, not an object")
        for key, value in flat.items():
            component, _, field = key.partition(".")
            configs.setdefault(component, {})[field] = value
    return {c: check_config(config, f"{source}: {METADATA_KEY} {c}.") for c, config in configs.items()}
