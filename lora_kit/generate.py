"""Images from a base model and several LoRAs, each at its own weight and step schedule (what lora-generate runs).

`--lora FILE[:WEIGHT][@SCHEDULE]` is parsed here: the schedule is everything after the last `@`, the weight what
follows the last `:` before it when it parses as a number (so Windows drive letters and odd file names survive).
Every image records its prompt, seed, steps, guidance, size, model and adapters in PNG text chunks: one key each,
a JSON `lora_kit` chunk with all of them, and an A1111-style `parameters` string.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import SEED_MAX, SEED_RANGE, LoraKitError


@dataclass(frozen=True)
class LoraSpec:
    path: str
    weight: float = 1.0
    schedule: str | None = None  # a spec string for lora_kit.schedule, e.g. "0:1,0.5:0.2"
    name: str = field(default="", compare=False)  # the adapter name once loaded


def parse_lora(text: str) -> LoraSpec:
    """'style.safetensors:0.8@0:1,1:0' -> LoraSpec('style.safetensors', 0.8, '0:1,1:0'); the schedule is checked."""
    rest, sched = text, None
    if not Path(text).exists() and "@" in text:
        from . import schedule

        rest, _, sched = text.rpartition("@")
        try:
            schedule.parse(sched)  # a bad spec fails here, before any model is opened
        except LoraKitError as e:
            raise LoraKitError(f"--lora {text!r}: {e}") from None
    path, weight = rest, 1.0
    head, sep, tail = rest.rpartition(":")
    if sep and head:
        try:
            path, weight = head, float(tail)
        except ValueError:
            pass
    if not path.strip():  # Path("") is ".", the current folder
        raise LoraKitError(f"--lora {text!r}: no file given; expected FILE[:WEIGHT][@SCHEDULE]")
    if not Path(path).exists():
        raise LoraKitError(f"--lora {text!r}: no such file {path!r}")
    if not math.isfinite(weight):
        raise LoraKitError(f"--lora {text!r}: the weight must be a finite number")
    return LoraSpec(path, weight, sched)


def parse_loras(texts: Sequence[str], allow_pickle: bool = False, model: str | None = None) -> list[LoraSpec]:
    """Every --lora, named: the file stem (dots as underscores, as lora_kit.load names it), made distinct with _2,
    _3, ... when two files share a stem; the same file twice is an error. Each file gets the checks that need no
    model (dispatch.precheck: a file, a pickle only with allow_pickle, a valid header, well-formed finite factors,
    made for `model`'s architecture where both tell it) before one is opened."""
    from .formats.dispatch import precheck

    specs, names, files = [], set(), {}
    for text in texts:
        spec = parse_lora(text)
        precheck(spec.path, allow_pickle, model)
        from . import api  # (torch's compiler with it: seconds a refusal above need not wait)

        file = Path(spec.path).resolve()
        if file in files:
            raise LoraKitError(f"--lora {text!r}: {spec.path} is given twice (also as --lora {files[file]!r})")
        files[file] = text
        stem = api.default_name(spec.path)
        name, k = stem, 2
        while name in names:
            name, k = f"{stem}_{k}", k + 1
        names.add(name)
        specs.append(LoraSpec(spec.path, spec.weight, spec.schedule, name))
    return specs


MAX_SIDE = 8192  # pixels a side, as lora-train's --resolution: beyond any GPU's memory already (and PIL's limits)


def parse_size(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '768x512' -> (768, 512) as (width, height); multiples of 8 up to MAX_SIDE (models with
    a larger multiple, SD3 and FLUX: 16, are checked once open: check_pipeline)."""
    parts = text.lower().split("x")
    try:
        w, h = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
        if len(parts) > 2:
            raise ValueError
    except ValueError:
        raise LoraKitError(f"--size {text!r}: expected a number (512) or WIDTHxHEIGHT (768x512)") from None
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise LoraKitError(f"--size {text!r}: width and height must be positive multiples of 8")
    if max(w, h) > MAX_SIDE:
        raise LoraKitError(f"--size {text!r}: at most {MAX_SIDE} pixels a side")
    return w, h


def check_device(name: str | None):
    """--device as a torch.device (None: cuda when available, else cpu); one line if torch does not know it or
    cannot compute on it here (no such GPU, a backend this build lacks, the meta device)."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise LoraKitError(f"--device {name!r}: not a device torch knows (cpu, cuda, cuda:1, mps, ...)") from None
    backend = {"cuda": torch.cuda, "mps": torch.backends.mps}.get(device.type)
    try:  # a tiny computation brought back: what generating needs of the device
        if backend is not None and not backend.is_available():
            raise RuntimeError(device.type)
        (torch.ones(1, device=device) + 1).cpu()
    except Exception:  # each backend fails its own way (AssertionError, RuntimeError, NotImplementedError)
        raise LoraKitError(f"--device {name!r}: this machine or this torch build cannot compute on it") from None
    return device


def apply_loras(pipe, specs: Sequence[LoraSpec], allow_pickle: bool = False) -> list[LoraSpec]:
    """Load each LoRA at its weight (as its spec's name, if it has one) and schedule it; returns the specs with their
    adapter names. Pickles are read only with allow_pickle (weights_only)."""
    from . import api, schedule

    def load(s: LoraSpec) -> str:
        return api.load(pipe, s.path, name=s.name or None, weight=s.weight, allow_pickle=allow_pickle)

    loaded = [LoraSpec(s.path, s.weight, s.schedule, load(s)) for s in specs]
    scheduled = {s.name: s.schedule for s in loaded if s.schedule}
    if scheduled:
        schedule.schedule(pipe, scheduled)
    return loaded


def pipeline_default(pipe, argument: str):
    """The default of a pipeline __call__ argument (num_inference_steps, guidance_scale), None if it has none."""
    parameter = inspect.signature(pipe.__call__).parameters.get(argument)
    return None if parameter is None else parameter.default


@dataclass
class Settings:
    prompt: str
    negative_prompt: str | None = None
    steps: int | None = None  # None: the pipeline's default
    guidance: float | None = None  # None: the pipeline's default
    seed: int = 0
    size: tuple[int, int] | None = None  # (width, height); None: the model's native size
    n: int = 1
    model: str = ""

    def __post_init__(self):
        if not (isinstance(self.seed, int) and 0 <= self.seed <= SEED_MAX):
            raise LoraKitError(f"--seed {self.seed!r}: it must be a whole number {SEED_RANGE}")
        if self.guidance is not None and not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise LoraKitError(f"--guidance {self.guidance}: the guidance scale must be a finite number >= 0")
        if self.negative_prompt is not None and self.guidance is not None and self.guidance <= 1:
            raise LoraKitError(_NO_CFG.format(f"--guidance {self.guidance:g}"))


_NO_CFG = (
    "--negative-prompt has no effect at {}: pipelines use it through classifier-free guidance, which runs at a "
    "guidance scale above 1; raise --guidance or leave the negative prompt out"
)


def size_multiple(pipe) -> int:
    """What the pipeline's width and height must be multiples of: the VAE's scale factor times the latent patch the
    backbone takes (SD3: its transformer's patch_size; FLUX: its image processor's factor, 2x2 packed latents)."""
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    processor = getattr(getattr(pipe, "image_processor", None), "config", None)
    return math.lcm(factor * int(getattr(pipe, "patch_size", 1)), int(getattr(processor, "vae_scale_factor", factor)))


def check_pipeline(pipe, settings: Settings) -> None:
    """The settings that only the opened pipeline can check, before any LoRA is loaded or any step runs: the size
    against the model's own multiple, and a negative prompt against guidance that would ignore it."""
    if settings.size is not None:
        multiple = size_multiple(pipe)
        if any(v % multiple for v in settings.size):
            w, h = settings.size
            raise LoraKitError(
                f"--size {w}x{h}: {type(pipe).__name__} needs width and height in multiples of {multiple} (its VAE "
                "factor times its latent patch)"
            )
    if settings.negative_prompt is None:
        return
    parameters = inspect.signature(pipe.__call__).parameters
    name = type(pipe).__name__
    if "negative_prompt" not in parameters:
        raise LoraKitError(f"--negative-prompt: {name} takes no negative prompt")
    if "true_cfg_scale" in parameters:  # FLUX: guidance_scale is distilled guidance; negatives need true CFG
        raise LoraKitError(
            f"--negative-prompt has no effect on {name}: its --guidance is distilled guidance, and it uses a negative "
            "prompt only with true classifier-free guidance (true_cfg_scale), which lora-generate does not run; "
            "leave the negative prompt out"
        )
    unet = getattr(pipe, "unet", None)
    if getattr(getattr(unet, "config", None), "time_cond_proj_dim", None) is not None:
        raise LoraKitError(f"--negative-prompt has no effect on {name}: its UNet is guidance-distilled (LCM), so it "
                           "runs no classifier-free guidance; leave the negative prompt out")  # fmt: skip
    guidance = settings.guidance if settings.guidance is not None else pipeline_default(pipe, "guidance_scale")
    if isinstance(guidance, int | float) and guidance <= 1:
        raise LoraKitError(_NO_CFG.format(f"{name}'s default guidance {guidance:g}"))


def generate(pipe, settings: Settings, loras: Sequence[LoraSpec], on_step: Callable[[], None] | None = None):
    """`settings.n` images (seeds seed, seed + 1, ...) with their PNG metadata: [(PIL image, PngInfo)]."""
    import torch
    from PIL.PngImagePlugin import PngInfo

    from . import __version__
    from .models import _quiet_loggers

    check_pipeline(pipe, settings)
    steps = settings.steps or pipeline_default(pipe, "num_inference_steps")
    guidance = settings.guidance if settings.guidance is not None else pipeline_default(pipe, "guidance_scale")
    kwargs = {"num_inference_steps": steps, "guidance_scale": guidance}
    if settings.negative_prompt is not None:
        kwargs["negative_prompt"] = settings.negative_prompt
    if settings.size is not None:
        kwargs["width"], kwargs["height"] = settings.size
    if on_step is not None:

        def step_end(_pipe, _step, _timestep, tensors):
            on_step()
            return tensors

        kwargs["callback_on_step_end"] = step_end
    out = []
    for i in range(settings.n):
        seed = settings.seed + i
        try:
            with _quiet_loggers():  # diffusers' echo of a prompt's cut words, on every image: prompt_note says it once
                image = pipe(settings.prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images[0]
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if not out_of_memory(e):
                raise
            size = "--size {}x{}".format(*settings.size) if settings.size else "the model's own size"
            raise LoraKitError(f"{size}: not enough memory on {pipe.device} to generate an image this large "
                               f"({_first_line(e)}); try a smaller --size") from None  # fmt: skip
        record = {
            "prompt": settings.prompt, "negative_prompt": settings.negative_prompt, "seed": seed, "steps": steps,
            "guidance": guidance, "size": f"{image.width}x{image.height}", "model": settings.model,
            "loras": [asdict(s) for s in loras], "software": f"lora_kit {__version__}",
        }  # fmt: skip
        info = PngInfo()
        for key, value in record.items():
            if value is not None:
                info.add_text(key, value if isinstance(value, str) else json.dumps(value))
        info.add_text("lora_kit", json.dumps(record))
        info.add_text("parameters", a1111_parameters(record))
        out.append((image, info))
    return out


def prompt_note(pipe, prompt: str) -> str | None:
    """One line when the pipeline's text encoders read only the start of `prompt` (a CLIP takes 77 tokens, a T5 the
    pipeline's max_sequence_length), None when one of them reads it all (FLUX's T5 beside its 77-token CLIP)."""
    from .models import _quiet_loggers

    cuts = []
    with _quiet_loggers():  # transformers' own note on a long sequence
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            tokenizer = getattr(pipe, name, None)
            if tokenizer is None:
                continue
            limit = tokenizer.model_max_length
            if "T5" in type(tokenizer).__name__:
                limit = pipeline_default(pipe, "max_sequence_length") or limit
            n = len(tokenizer(prompt).input_ids)
            if n <= limit:
                return None
            cuts.append((limit, n))
    if not cuts:
        return None
    limit, n = max(cuts)
    return f"note: the prompt is {n} tokens and the text encoders read {limit}: the rest is ignored"


def out_of_memory(e: BaseException) -> bool:
    """An allocation failure: torch's OutOfMemoryError (CUDA, MPS), the CPU allocator's RuntimeError
    ("DefaultCPUAllocator: not enough memory"), or Python's MemoryError."""
    import torch

    if isinstance(e, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(e)
    return any(s in text for s in ("not enough memory", "DefaultCPUAllocator", "out of memory"))


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(e).__name__


def render(
    pipe, settings: Settings, specs: Sequence[LoraSpec], compare: bool = False, on_step=None, allow_pickle=False
):
    """The images with the LoRAs and, with `compare`, the same seeds without them (None otherwise): (after, before).
    Every LoRA is loaded, so checked against the model, before any denoising; for the baseline they are unloaded
    again, which restores the model exactly (added tokens too), so it is the base model's image."""
    from . import api

    check_pipeline(pipe, settings)
    if compare:
        for spec in apply_loras(pipe, specs, allow_pickle):
            api.unload(pipe, spec.name)
    before = generate(pipe, settings, [], on_step) if compare else None
    return generate(pipe, settings, apply_loras(pipe, specs, allow_pickle), on_step), before


def a1111_parameters(record: dict) -> str:
    """The `parameters` text A1111/Forge write: the prompt with <lora:name:weight> tags, then the settings."""
    tags = "".join(f" <lora:{s['name']}:{s['weight']:g}>" for s in record["loras"])
    lines = [record["prompt"] + tags]
    if record["negative_prompt"]:
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    schedules = ", ".join(f"{s['name']}@{s['schedule']}" for s in record["loras"] if s["schedule"])
    settings = f"Steps: {record['steps']}, CFG scale: {record['guidance']}, Seed: {record['seed']}, "
    settings += f"Size: {record['size']}, Model: {Path(record['model']).name or record['model']}"
    lines.append(settings + (f", Lora schedules: {schedules}" if schedules else ""))
    return "\n".join(lines)


def _missing(folder: Path) -> list[Path]:
    """The folders that making `folder` would create, deepest first."""
    return [p for p in (folder, *folder.parents) if not p.exists()]


def _remove(files: Sequence[Path], folders: Sequence[Path]) -> None:
    for path in files:
        path.unlink(missing_ok=True)
    for path in folders:  # deepest first; a folder someone else wrote into meanwhile stays
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def check_output(folder: str | os.PathLike, force: bool) -> Path:
    """The output folder, checked before any work: a folder (not a file), empty unless `force`, and one where a file
    can be created (tried with a temp file; folders made for the try are removed again, so nothing is left)."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise LoraKitError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LoraKitError(f"{out}: the folder is not empty; pass --force to write into it")
    made = _missing(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".lora_kit-"):
            pass
    except OSError as e:
        raise LoraKitError(f"{out}: cannot write into this folder ({e.strerror or e})") from None
    finally:
        _remove([], made)
    return out


def write(results, folder: Path, seed: int, before=None) -> list[Path]:
    """Each image as NNN-seedS.png, then grid.png (row-major, about square) and, given the same seeds rendered
    without the LoRAs (`before`), compare.png: before on the top row, after below. All or nothing: every file goes to
    a temp file first and only then are they renamed into place; on an OSError (a full disk) the files of this run
    are removed again, and what was in the folder before stays as it was."""
    from .train.callbacks import grid

    files = [(f"{i:03d}-seed{seed + i}.png", image, info) for i, (image, info) in enumerate(results)]
    columns = math.ceil(math.sqrt(len(results)))
    files.append(("grid.png", grid([image for image, _ in results], columns=columns), results[0][1]))
    if before is not None:
        images = [image for image, _ in before] + [image for image, _ in results]
        files.append(("compare.png", grid(images, columns=len(results)), results[0][1]))
    made, temps, paths = _missing(folder), [], []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, image, info in files:
            temps.append(folder / f".{name}.tmp")
            image.save(temps[-1], format="PNG", pnginfo=info)
        for tmp, (name, _, _) in zip(temps, files, strict=True):
            os.replace(tmp, folder / name)
            paths.append(folder / name)
    except OSError as e:
        with contextlib.suppress(OSError):  # the first error is the one to report
            _remove(temps + paths, made)
        raise LoraKitError(f"{folder}: cannot write the images, none written ({e.strerror or e})") from None
    return paths
