"""Describe a base model: which architecture a pipeline or module is (sd1, sd2, sdxl, sd3, flux)."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

ARCHITECTURES = ("sd1", "sd2", "sdxl", "sd3", "flux")
ARCH_TAG = "_lora_kit_architecture"  # on a bare module: the architecture of the file it was loaded from (api.load)

# kohya `ss_base_model_version` and SAI `modelspec.architecture` (for a LoRA) per architecture, for epsilon
# prediction; v-prediction SD1/SD2 differ (base_model_metadata)
SS_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1"}
MODELSPEC_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-512/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
    "sd3": "stable-diffusion-3-medium/lora",
    "flux": "flux-1-dev/lora",
}


def base_model_metadata(arch: str, prediction: str | None = None) -> dict[str, str]:
    """`ss_base_model_version` and `modelspec.architecture` (and `modelspec.prediction_type` when known) as
    sd-scripts writes them: SD1/SD2 with v-prediction are `sd_v1_v` / `sd_v2_v`, and SD2's SAI architecture is
    `stable-diffusion-v2-768-v` for v-prediction, `stable-diffusion-v2-512` for epsilon. `prediction` is a diffusers
    scheduler's prediction_type ("epsilon", "v_prediction") or None (unknown: epsilon's names, no prediction_type)."""
    meta = {"ss_base_model_version": SS_BASE_MODEL_VERSION[arch]}
    meta["modelspec.architecture"] = MODELSPEC_ARCHITECTURE[arch]
    if arch in ("sd1", "sd2") and prediction in ("epsilon", "v_prediction"):
        v = prediction == "v_prediction"
        meta["modelspec.prediction_type"] = "v" if v else "epsilon"
        if v:
            meta["ss_base_model_version"] += "_v"
            if arch == "sd2":
                meta["modelspec.architecture"] = "stable-diffusion-v2-768-v/lora"
    return meta


def prediction_type(target) -> str | None:
    """The prediction type of a pipeline's scheduler ("epsilon", "v_prediction", ...), None without one."""
    config = getattr(getattr(target, "scheduler", None), "config", None)
    return config.get("prediction_type") if config is not None else None


def prediction_in(metadata) -> str | None:
    """The prediction type a LoRA file's header states (sd-scripts' and lora_kit's entries), or None."""
    stated = metadata.get("modelspec.prediction_type")
    if stated in ("v", "epsilon"):
        return "v_prediction" if stated == "v" else "epsilon"
    version, spec = metadata.get("ss_base_model_version", ""), metadata.get("modelspec.architecture", "")
    if version in ("sd_v1_v", "sd_v2_v") or spec.startswith("stable-diffusion-v2-768-v"):
        return "v_prediction"
    if version in ("sd_v1", "sd_v2") and metadata.get("ss_v_parameterization") == "True":
        return "v_prediction"
    return None


def architecture(comps: dict[str, nn.Module]) -> str:
    """The architecture of a pipeline's components ({'unet': ..., 'text_encoder': ...}); a bare module loaded
    from a file that said it (ARCH_TAG) is of that architecture, else its class says."""
    if len(comps) == 1 and (tagged := next(iter(comps.values())).__dict__.get(ARCH_TAG)):
        return tagged
    if "transformer" in comps:
        cls = type(comps["transformer"]).__name__
        return "flux" if "Flux" in cls else "sd3"
    if "unet" in comps:
        return _unet_architecture(comps["unet"].config)
    if "text_encoder_3" in comps:
        return "sd3"
    if "text_encoder_2" in comps:  # (a bare T5 loaded as text_encoder_2 is FLUX's)
        return "flux" if "T5" in type(comps["text_encoder_2"]).__name__ else "sdxl"
    return "sd1"


def _unet_architecture(config) -> str:
    """sd1, sd2 or sdxl from a UNet's config (a dict)."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    cross = config.get("cross_attention_dim")
    return "sd2" if cross == 1024 or config.get("use_linear_projection") else "sd1"


def spec_architecture(spec: str) -> str | None:
    """The architecture of a --model told without opening it: a pipeline folder's model_index.json (and its UNet's
    config.json), a single-file checkpoint's header (single_file.sniff); None where that cannot tell it (a hub id, a
    pickle, a folder or file that opening it will refuse)."""
    import json
    from pathlib import Path

    from .errors import LoraKitError
    from .formats.files import PICKLES
    from .single_file.reader import check, is_single_file, items

    if is_single_file(spec):
        if any(Path(item).suffix.lower() in PICKLES for item in items(spec)):
            return None
        try:
            main = check(spec)[0]
        except LoraKitError:
            return None
        return main.arch or main.part_arch
    folder = Path(toy_model() if spec == TOY else spec)
    try:
        index = json.loads((folder / "model_index.json").read_text())
        transformer, unet = (str((index.get(c) or [None, None])[1]) for c in ("transformer", "unet"))
        if transformer != "None":
            return "flux" if "Flux" in transformer else "sd3"
        if unet != "None":
            return _unet_architecture(json.loads((folder / "unet" / "config.json").read_text()))
    except (OSError, ValueError, AttributeError, IndexError, KeyError, TypeError):  # what opening it will report
        pass
    return None


TOY = "toy"  # --model toy: the toy-world base model shipped in lora_kit/assets/toyworld/model


def toy_model() -> str:
    """The folder of the shipped toy-world base model (an SD 1.x pipeline trained by datasets/toyworld/pretrain.py)."""
    from pathlib import Path

    return str(Path(__file__).resolve().parent / "assets" / "toyworld" / "model")


def local_path(spec: str):
    """The folder a --model names on this machine (`toy`: the shipped model), or None for a hub id."""
    from pathlib import Path

    path = Path(toy_model() if spec == TOY else spec)
    return path if path.exists() else None


def local_paths(spec: str) -> list:
    """Every file or folder on this machine a --model names (a single-file spec may name several), [] for a hub id."""
    from .single_file.reader import items

    return [p for p in map(local_path, items(spec)) if p is not None]


def check_spec(spec: str, allow_pickle: bool = False) -> str:
    """The folder, hub id or single-file checkpoint(s) a --model names (`toy`: the shipped model's folder), checked
    without opening it: a pipeline folder with model_index.json, something shaped like a hub id (owner/name), or
    checkpoint files whose headers say what they hold (single_file.check)."""
    from pathlib import Path

    from .errors import LoraKitError

    if spec == TOY:
        spec = toy_model()
        if not Path(spec, "model_index.json").is_file():
            raise LoraKitError(f"toy: the toy-world model is missing from this install ({spec})")
    from .single_file.reader import check, is_single_file

    if is_single_file(spec):
        check(spec, allow_pickle)  # every file's header: one line naming a file that is no checkpoint
        return spec
    path = Path(spec)
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise LoraKitError(f"{spec}: not a diffusers pipeline folder (no model_index.json)")
    if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") != 1):
        raise LoraKitError(f"{spec}: no such folder, and not a hub id (owner/name)")
    return spec


@contextmanager
def _quiet_loggers():
    """diffusers', transformers' and huggingface_hub's log lines silenced while a model opens: their notes on a
    missing weight file ("An error occurred while trying to fetch ...", "Defaulting to unsafe serialization"), on
    the hub offline ("Couldn't connect to the Hub") or on optional backends would turn our one-line error into three
    (diffusers logs some at ERROR level, then raises: the exception is what we report). Their verbosity is restored
    afterwards."""
    import logging

    import huggingface_hub.utils.logging as hub_logging
    import transformers
    from diffusers.utils import logging as diffusers_logging

    loggers = (diffusers_logging, transformers.utils.logging, hub_logging)
    levels = [logging_module.get_verbosity() for logging_module in loggers]
    for logging_module in loggers:
        logging_module.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        for logging_module, level in zip(loggers, levels, strict=True):
            logging_module.set_verbosity(level)


def open_pipeline(spec: str, dtype=None, prediction_type: str | None = None, allow_pickle: bool = False):
    """A diffusers pipeline from a local folder or a hub id (the same code path), `toy` for the shipped toy-world
    model, or a single-file checkpoint (`model.safetensors`, or FLUX's parts joined by commas: see single_file);
    one clear error otherwise. `prediction_type` overrides the scheduler's ("epsilon", "v_prediction")."""
    from .errors import LoraKitError

    if spec == TOY:
        import torch

        dtype = dtype or torch.float32  # its files hold fp16 and fp32 parts
    spec = check_spec(spec, allow_pickle)
    from .single_file.reader import is_single_file, open_single_file

    if is_single_file(spec):
        return open_single_file(spec, dtype, prediction_type, allow_pickle)
    import transformers
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    # loading a local model takes a second: its per-component progress bars would only bury our own output
    diffusers_logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        with _quiet_loggers():
            pipe = DiffusionPipeline.from_pretrained(spec, **({"dtype": dtype} if dtype else {}))
    except (OSError, ValueError) as e:
        raise LoraKitError(f"{spec}: cannot open the model ({str(e).splitlines()[0]})") from None
    pipe.set_progress_bar_config(disable=True)
    if prediction_type is not None and pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    return pipe


def refuse_guessed_prediction(pipe, spec: str, prediction_type: str | None) -> None:
    """Training and sampling need the prediction type: an SD2 single file that does not state it (768-v and
    512-base share every key) is refused until --prediction-type says it."""
    from .errors import LoraKitError
    from .single_file.reader import SOURCE_ATTR

    source = getattr(pipe, SOURCE_ATTR, None)
    if prediction_type is None and source is not None and source.prediction_guessed:
        raise LoraKitError(f"{source.main.path}: an SD2 checkpoint does not say whether it predicts v (768-v) or "
                           "noise (512-base); pass --prediction-type v_prediction or epsilon")  # fmt: skip


def loads_in_fp32(folder) -> None:
    """Make a saved pipeline's transformers components (text encoders) open in fp32 by default, as its diffusers
    models do. Their weights keep the dtype they were saved in; but transformers 5 opens a model in the dtype its
    config.json records (save_pretrained writes the saved one, float16), so a plain `from_pretrained(folder)` gave an
    fp16 text encoder beside an fp32 UNet and failed at the first prompt. An explicit dtype still gives that dtype
    everywhere."""
    import json
    from pathlib import Path

    index = json.loads(Path(folder, "model_index.json").read_text())
    for name, entry in index.items():
        config = Path(folder, name, "config.json")
        if isinstance(entry, list) and entry[0] == "transformers" and config.is_file():
            values = json.loads(config.read_text())
            if values.get("dtype") not in (None, "float32"):
                values["dtype"] = "float32"
                config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def meta_pipeline(arch: str):
    """The components of a real base model of `arch` (SD1.5, SD2.1, SDXL, SD3 medium, FLUX.1 dev) built on the meta
    device from configs lora_kit ships: every module name and shape, no weights, no download. Enough to map LoRA
    key names when no --model is given."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    import diffusers
    import torch
    import transformers

    from .errors import LoraKitError

    path = Path(__file__).parent / "assets" / "configs" / f"{arch}.json"
    if not path.is_file():
        raise LoraKitError(f"no built-in architecture {arch!r}; pass --model (shipped: {', '.join(ARCHITECTURES)})")
    spec = json.loads(path.read_text())
    parts = {}
    with torch.device("meta"):
        for name, cfg in spec.items():
            if name.startswith("_"):
                continue
            cfg = dict(cfg)
            cls_name = cfg.pop("class")
            if hasattr(diffusers, cls_name) and not cls_name.startswith(("CLIP", "T5")):
                parts[name] = getattr(diffusers, cls_name)(**cfg)
            else:
                cls = getattr(transformers, cls_name)
                config_cls = transformers.T5Config if cls_name.startswith("T5") else transformers.CLIPTextConfig
                parts[name] = cls(config_cls(**cfg))
    return SimpleNamespace(**parts)
