"""Open single-file checkpoints as diffusers pipelines, offline.

A model spec is one file (`v1-5-pruned-emaonly.safetensors`, `sd3.5_medium.safetensors`), or several joined by commas
(`flux1-dev.safetensors,ae.safetensors,clip_l.safetensors,t5xxl_fp16.safetensors`: ComfyUI's split layout), where a
diffusers folder or hub id may stand for every part the files lack. The main file is read by diffusers' own
`from_single_file`, given the configs: those lora_kit wrote into the file (`lora_kit.pipeline`), else the shipped ones
of the model type diffusers tells from the keys (lora_kit/assets/pipelines), with OpenAI's CLIP tokenizer rebuilt
from the shipped merges. Nothing is downloaded.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LoraKitError
from .sniff import ARCH_NAMES, LAYOUTS, PIPELINES, Checkpoint, looks_like_lora, sniff

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "pipelines"
PIPELINE_KEY = "lora_kit.pipeline"  # header entry: the pipeline's config files, {relative path: text}
# the model type (diffusers' infer_diffusers_model_type) whose configs an architecture takes when diffusers names
# another one lora_kit does not ship (an inpainting or refiner variant) or none
DEFAULT_TYPE = {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base", "sd3": "sd3", "flux": "flux-dev"}


@dataclass
class Source:
    """Where an opened pipeline came from: the main file and, per component, the file and prefix it was read from
    (lora-merge writes the same layout back)."""

    spec: str
    main: Checkpoint
    slots: dict[str, tuple[Checkpoint, str]] = field(default_factory=dict)
    prediction_guessed: bool = False


SOURCE_ATTR = "_lora_kit_single_file"


def items(spec: str) -> list[str]:
    """The files (and folder or hub id) a model spec names: the spec itself when it is a path, else its
    comma-separated items."""
    return [spec] if Path(spec).exists() or "," not in spec else [s.strip() for s in spec.split(",") if s.strip()]


def is_single_file(spec: str) -> bool:
    return any(Path(item).is_file() for item in items(spec))


def check(spec: str, allow_pickle: bool = False) -> tuple[Checkpoint, list[Checkpoint], str | None]:
    """(the main checkpoint, the part files, a diffusers folder or hub id for the rest) of a spec, every file
    checked from its header: one LoraKitError naming the file otherwise."""

    main, parts, rest = None, [], None
    for item in items(spec):
        p = Path(item)
        if p.is_dir() or not p.exists():
            if rest is not None:
                raise LoraKitError(f"{spec}: names two models to take parts from ({rest}, {item}); give one")
            if p.is_dir() and not (p / "model_index.json").is_file():
                raise LoraKitError(f"{item}: not a diffusers pipeline folder (no model_index.json)")
            if not p.exists() and (item.startswith((".", "/", "~")) or item.count("/") != 1):
                raise LoraKitError(f"{item}: no such file or folder, and not a hub id (owner/name)")
            rest = item
            continue
        entries, metadata = _header(p, allow_pickle)
        scaled = next((k for k in entries if k == "scaled_fp8" or k.endswith(".scale_weight")), None)
        if scaled is not None:  # each fp8 weight times its own scale: read as plain fp8 it would be silently wrong
            raise LoraKitError(f"{p}: holds ComfyUI's scaled fp8 weights ({scaled}), which lora_kit does not read "
                               "yet; use an fp16/bf16/fp8 file without scales")  # fmt: skip
        found = sniff(p, entries, metadata)
        if found is None:
            if looks_like_lora(entries):
                raise LoraKitError(f"{p}: is a LoRA (an adapter), not a base model; give it where a LoRA is expected")
            raise LoraKitError(f"{p}: not a checkpoint of {', '.join(ARCH_NAMES.values())} (no key of their UNet, "
                               "transformer, VAE or text encoders)")  # fmt: skip
        if found.arch is not None or "transformer" in found.parts:
            if main is not None:
                raise LoraKitError(f"{spec}: holds two base models ({main.path}, {p}); give one")
            main = found
        else:
            parts.append(found)
    if main is None:
        raise LoraKitError(f"{spec}: names no UNet or transformer checkpoint (only {', '.join(_names(parts))})")
    return main, parts, rest


def _names(parts: list[Checkpoint]) -> list[str]:
    return [f"{c.path.name}: {'/'.join(c.parts)}" for c in parts] or ["nothing"]


def _header(p: Path, allow_pickle: bool) -> tuple[dict, dict]:
    from ..formats import files

    if p.suffix.lower() in files.PICKLES:
        if not allow_pickle:
            raise LoraKitError(f"{p}: a pickled checkpoint is read only with --allow-pickle (safetensors are safe)")
        state = pickled_state(p)
        return {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in state.items()}, {}
    return files.read_header(p)


def pickled_state(p: Path) -> dict:
    """A .ckpt/.pt checkpoint's state dict, read with torch's weights-only loader (`state_dict` unwrapped)."""
    import torch

    try:
        data = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise LoraKitError(f"{p}: cannot read the checkpoint ({str(e).splitlines()[0][:200]})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise LoraKitError(f"{p}: not a checkpoint (holds a {type(data).__name__}, not a dict of tensors)")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def stored_dtype(spec: str, allow_pickle: bool = False):
    """The one float dtype the main file of a spec stores its weights in (torch), or None when it mixes several:
    lora-merge opens a checkpoint in it, so that it holds one copy of the weights, not an fp32 one."""
    import torch

    from .writer import NAMED_DTYPES

    main = check(spec, allow_pickle)[0]
    names = {NAMED_DTYPES.get(d, getattr(torch, d.removeprefix("torch."), None)) for d in main.dtypes.values()}
    floats = {d for d in names if isinstance(d, torch.dtype) and d.is_floating_point}
    return floats.pop() if len(floats) == 1 else None


def model_type(main: Checkpoint, arch: str) -> str:
    """The model type whose shipped configs fit the file: diffusers' own inference from the keys and shapes (run on
    empty tensors), or the architecture's default."""
    import torch
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    with torch.device("meta"):
        view = {k: torch.empty(s) for k, s in main.shapes.items()}
    if main.parts.get("transformer") == "":  # a transformer alone: diffusers reads it under the checkpoint prefix
        view |= {"model.diffusion_model." + k: v for k, v in view.items()}
    try:
        found = infer_diffusers_model_type(view)
    except (KeyError, IndexError, ValueError):
        found = None
    return found if found is not None and (ASSETS / str(found)).is_dir() else DEFAULT_TYPE[arch]


def config_folder(main: Checkpoint, arch: str, folder: Path, rest: str | None = None) -> None:
    """Write the configs of the pipeline `main` holds into `folder`: those lora_kit stored in the file, else those
    of the diffusers folder or hub id the spec takes the other parts from, else the shipped ones for its model type;
    tokenizers given by their settings get lora_kit's vocabularies (tokenizers.py)."""
    import shutil

    from .tokenizers import add_vocabulary

    stored = main.metadata.get(PIPELINE_KEY)
    if stored:
        try:
            for rel, text in json.loads(stored).items():
                target = (folder / rel).resolve()
                if folder.resolve() not in target.parents:
                    raise LoraKitError(f"{main.path}: {PIPELINE_KEY} names a file outside its folder ({rel})")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
        except (json.JSONDecodeError, AttributeError, TypeError):
            raise LoraKitError(f"{main.path}: its {PIPELINE_KEY} metadata is not valid JSON of files") from None
    elif rest is not None:
        _configs_of(rest, folder)
    else:
        shutil.copytree(ASSETS / model_type(main, arch), folder, dirs_exist_ok=True)
    index = json.loads((folder / "model_index.json").read_text())
    for name in tokenizer_slots(index):  # the shipped vocabularies, where the folder holds a tokenizer's settings
        if (folder / name).is_dir():
            add_vocabulary(folder / name, index[name][1])


CONFIG_FILES = ("*.json", "*.txt", "*.model")  # configs and tokenizer files: no weights


def _configs_of(rest: str, folder: Path) -> None:
    """The config and tokenizer files of a diffusers folder, or of a hub id (its cache, or the hub when online)."""
    import shutil

    source = Path(rest)
    if not source.is_dir():
        from huggingface_hub import snapshot_download

        try:
            source = Path(snapshot_download(rest, allow_patterns=list(CONFIG_FILES)))
        except Exception as e:  # noqa: BLE001 - offline and not cached, unknown repo, ...
            raise LoraKitError(f"{rest}: cannot read its configs ({str(e).splitlines()[0][:200]})") from None
    for pattern in CONFIG_FILES:
        for p in source.rglob(pattern):
            target = folder / p.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, target)


def open_single_file(spec: str, dtype=None, prediction_type: str | None = None, allow_pickle: bool = False):
    """A diffusers pipeline from a single-file checkpoint spec (see the module docstring), every component in
    `dtype` (fp32 by default, as diffusers opens a folder)."""
    import torch

    from ..models import _quiet_loggers

    main, parts, rest = check(spec, allow_pickle)
    arch = main.arch or main.part_arch
    dtype = dtype or torch.float32
    with tempfile.TemporaryDirectory(prefix="lora_kit-config-") as tmp, _quiet_loggers():
        folder = Path(tmp)
        config_folder(main, arch, folder, rest)
        index = json.loads((folder / "model_index.json").read_text())
        given, slots = _parts(parts, arch, folder, dtype)
        slots |= {comp: (main, prefix) for comp, prefix in main.parts.items()}
        if arch == "flux" and _width(main) != FLUX_READ_WIDTH:
            given["transformer"] = by_layout(main, "transformer", folder, dtype)
        missing = [c for c in LAYOUTS[arch] if c not in slots and c not in given]
        given |= _from_rest(rest, missing, index, folder, dtype, main, spec)
        if rest is None:
            _check_tokenizers(index, folder, main)
        import diffusers

        cls = getattr(diffusers, PIPELINES[arch])
        path = main.path
        try:
            wanted = [prefix for comp, (cp, prefix) in slots.items() if cp is main and comp not in given]
            checkpoint = read_checkpoint(path, dtype, wanted) if wanted else {}
            pipe = assemble(cls, folder, checkpoint, given, dtype)
            del checkpoint
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise LoraKitError(f"{path}: cannot open the {ARCH_NAMES[arch]} checkpoint "
                               f"({str(e).splitlines()[0][:300]})") from None  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    source = Source(spec, main, slots)
    prediction = prediction_type or main.prediction()
    if prediction is not None and getattr(pipe, "scheduler", None) is not None:
        if pipe.scheduler.config.get("prediction_type") != prediction:
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction)
    elif arch == "sd2" and PIPELINE_KEY not in main.metadata:
        source.prediction_guessed = True  # SD2 768-v and 512-base share their keys
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            realign(module)
            module.eval()
    setattr(pipe, SOURCE_ATTR, source)
    return pipe


FLUX_READ_WIDTH = 3072  # diffusers 0.42 reads BFL single blocks as 3072 wide whatever the file holds


def _width(main: Checkpoint) -> int:
    return main.shapes[main.parts["transformer"] + "img_in.weight"][0]


def by_layout(cp: Checkpoint, comp: str, folder: Path, dtype):
    """A component read through lora_kit's own key tables (layout.py, the writer's, inverted): split fused tensors
    at the sizes of the model's own parameters, undo each op. For what diffusers' reader cannot take (FLUX of
    another width than FLUX.1's)."""
    import importlib

    import torch

    from . import layout

    library, cls_name = json.loads((folder / "model_index.json").read_text())[comp]
    cls = getattr(importlib.import_module(library), cls_name)
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder / comp))
    own = model.state_dict()
    prefix, namer = cp.parts[comp], cp.namers[comp]
    table = layout.original_keys(list(own), namer, dict(model.config), prefix)
    missing = [k for k in table if k not in cp.shapes]
    if missing:
        raise LoraKitError(f"{cp.path}: lacks {missing[0]} of its {comp}")
    read = tensor_reader(cp.path)
    state = {}
    for key, parts in table.items():
        t = read(key)
        op = parts[0][1]
        if op == "conv":
            t = t.reshape(t.shape[:2])
        elif op == "T":
            t = t.T
        elif op == "swap":
            a, b = t.chunk(2, 0)
            t = torch.cat([b, a], 0)
        sizes = [own[name].shape[0] for name, _ in parts]
        if sum(sizes) != t.shape[0]:
            raise LoraKitError(f"{cp.path}: {key} is {list(t.shape)}, which the {comp}'s config does not fit")
        for (name, _), piece in zip(parts, t.split(sizes), strict=True):
            state[name] = piece.to(dtype).contiguous()
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise LoraKitError(f"{cp.path}: does not fit {cls_name} ({str(e).splitlines()[-1].strip()[:200]})") from None
    return model.eval()


def tensor_reader(path: Path):
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        return pickled_state(path).__getitem__
    from safetensors import safe_open

    return safe_open(str(path), "pt").get_tensor


def read_checkpoint(path: Path, dtype, prefixes: list[str]) -> dict:
    """The tensors of `path` under `prefixes` (EMA copies and other keys left on disk), each read straight into its
    own aligned allocation and cast to `dtype` if it is a float of another: one copy of the weights, one tensor in
    flight (a memory map would count the file again in resident memory once the weights are copied out of it, and
    leaves tensors at odd addresses: see realign)."""
    import torch

    from .writer import NAMED_DTYPES

    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        state = pickled_state(path)
        return {k: _cast(v, dtype) for k, v in state.items() if k.startswith(tuple(prefixes))}
    from ..formats import files

    entries, _ = files.read_header(path)
    out = {}
    with open(path, "rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")
        for key, entry in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if not key.startswith(tuple(prefixes)):
                continue
            begin, end = entry["data_offsets"]
            stored = NAMED_DTYPES.get(entry["dtype"])
            if stored is None:
                raise LoraKitError(f"{path}: tensor {key} is {entry['dtype']}, which lora_kit does not read")
            raw = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(start + begin)
            if f.readinto(raw.numpy()) != end - begin:
                raise LoraKitError(f"{path}: the file ends inside tensor {key} (truncated)")
            out[key] = _cast(raw.view(stored).reshape(entry["shape"]), dtype)
    return out


def _cast(t, dtype):
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def assemble(cls, folder: Path, checkpoint: dict, given: dict, dtype):
    """The pipeline `cls` from a checkpoint dict, component by component through diffusers' own single-file loader
    (`load_single_file_sub_model`: its key conversions, the configs in `folder`), as `from_single_file` does but on
    tensors read here; `given` components are taken as they are."""
    from diffusers import pipelines
    from diffusers.loaders.single_file import load_single_file_sub_model

    index = json.loads((folder / "model_index.json").read_text())
    expected, optional = cls._get_signature_keys(cls)
    kwargs = {}
    for name in expected:
        entry = index.get(name)
        if name in given:
            kwargs[name] = given[name]
        elif not isinstance(entry, list) or entry[0] is None or name in _UNUSED:
            kwargs[name] = None
        else:
            kwargs[name] = load_single_file_sub_model(
                library_name=entry[0], class_name=entry[1], name=name, checkpoint=checkpoint, pipelines=pipelines,
                is_pipeline_module=hasattr(pipelines, entry[0]), cached_model_config_path=str(folder),
                torch_dtype=dtype, local_files_only=True,
            )  # fmt: skip
    if "requires_safety_checker" in optional:
        kwargs["requires_safety_checker"] = False
    return cls(**kwargs)


_UNUSED = ("safety_checker", "feature_extractor", "image_encoder")  # not in a checkpoint; lora_kit never uses them


def realign(module) -> None:
    """Tensors read from a file may start at any byte (safetensors packs them end to end); CPU kernels block their
    work by alignment, so a misaligned weight gives other last bits than the same weight loaded from a folder. Each
    one is copied to a fresh (64-byte aligned) allocation, one at a time: the same numbers as from_pretrained's, bit
    for bit, and no second copy of the model."""
    import torch

    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                tensor.data = tensor.data.clone()


def _slot(part: Checkpoint, kind: str, arch: str, folder: Path) -> str:
    """The pipeline component a part file fills: a CLIP is FLUX's `text_encoder`, and SD3's first or second by its
    width, as the configs give them (CLIP-L 768, CLIP-G 1280); a T5 is FLUX's `text_encoder_2`, SD3's
    `text_encoder_3`."""
    if kind == "clip":
        width = part.shapes[part.parts[kind] + "text_model.embeddings.token_embedding.weight"][1]
        second = json.loads((folder / "text_encoder_2" / "config.json").read_text()) if arch == "sd3" else {}
        return "text_encoder_2" if second.get("hidden_size") == width else "text_encoder"
    if kind == "t5":
        return "text_encoder_3" if arch == "sd3" else "text_encoder_2"
    return kind


def _parts(parts: list[Checkpoint], arch: str, folder: Path, dtype):
    """({component: module} loaded from the part files, {component: (file, prefix)})."""
    given, slots = {}, {}
    for part in parts:
        for kind, prefix in part.parts.items():
            comp = _slot(part, kind, arch, folder)
            if comp not in LAYOUTS[arch]:
                raise LoraKitError(f"{part.path}: a {kind} has no place in a {ARCH_NAMES[arch]} pipeline")
            if comp in given:
                raise LoraKitError(f"{part.path}: a second {comp} (the first came from {slots[comp][0].path})")
            given[comp] = _load_part(part, kind, prefix, comp, folder, dtype)
            slots[comp] = (part, prefix)
    return given, slots


def _load_part(part: Checkpoint, kind: str, prefix: str, comp: str, folder: Path, dtype):
    """A component from a file that holds it alone (ComfyUI's ae, clip_l, clip_g, t5xxl files), read tensor by
    tensor in `dtype` (a T5-XXL is 9.5 GB in fp16)."""
    import diffusers
    import torch
    import transformers
    from accelerate import init_empty_weights

    index = json.loads((folder / "model_index.json").read_text())
    library, cls_name = index[comp]
    state = read_checkpoint(part.path, dtype, [prefix])
    if kind == "vae":
        return diffusers.AutoencoderKL.from_single_file(state, config=str(folder), subfolder="vae",
                                                        torch_dtype=dtype, local_files_only=True)  # fmt: skip
    cls = getattr(transformers, cls_name)
    config = cls.config_class.from_pretrained(folder / comp)
    with init_empty_weights():  # parameters on meta, filled below; buffers (position ids) made as usual
        model = cls(config)
    state = {k[len(prefix) :]: v for k, v in state.items()}
    if kind == "clip" and not hasattr(model, "text_model"):  # transformers 5 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    if kind == "clip" and "text_projection.weight" not in state and hasattr(model, "text_projection"):
        state["text_projection.weight"] = torch.eye(model.config.hidden_size)  # as diffusers reads SD3's CLIP-L
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in state and not k.endswith("position_ids")]
    if kind == "t5" and "encoder.embed_tokens.weight" in missing and "shared.weight" in state:
        missing.remove("encoder.embed_tokens.weight")
    if missing:
        raise LoraKitError(f"{part.path}: not a {cls_name} of the expected layout (missing {missing[0]})")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise LoraKitError(f"{part.path}: does not fit {cls_name} ({str(e).splitlines()[-1].strip()[:200]})") from None
    if kind == "t5":
        model.tie_weights()
    return model.eval()


def _from_rest(rest, missing, index, folder, dtype, main, spec) -> dict:
    """The components the files lack, from a diffusers folder or hub id (tokenizers the configs lack too)."""
    import importlib

    if not missing and rest is None:
        return {}
    if rest is None:
        raise LoraKitError(f"{main.path}: holds no {', '.join(missing)}; give them as files after a comma "
                           f"('{main.path.name},ae.safetensors,...') or a diffusers folder or hub id to take them "
                           "from")  # fmt: skip
    out = {}
    wanted = list(missing) + [n for n in tokenizer_slots(index) if not (folder / n).is_dir()]
    for comp in wanted:
        library, cls_name = index[comp]
        cls = getattr(importlib.import_module(library), cls_name)
        kwargs = {"torch_dtype": dtype} if "okenizer" not in cls_name else {}
        try:
            out[comp] = cls.from_pretrained(rest, subfolder=comp, **kwargs)
        except (OSError, ValueError) as e:
            raise LoraKitError(f"{rest}: cannot take {comp} from it ({str(e).splitlines()[0][:200]})") from None
    return out


def tokenizer_slots(index: dict) -> list[str]:
    return [n for n, v in index.items() if isinstance(v, list) and len(v) == 2 and "Tokenizer" in str(v[1])]


def _check_tokenizers(index: dict, folder: Path, main: Checkpoint) -> None:
    lacking = [n for n in tokenizer_slots(index) if not (folder / n).is_dir()]
    if lacking:
        raise LoraKitError(f"{main.path}: its {', '.join(lacking)} is not shipped with lora_kit; add a diffusers "
                           "folder or hub id that has it after a comma")  # fmt: skip
