"""Images from a base model and several LoRAs, each at its own weight and step schedule (what lora-generate runs).

`--lora FILE[:WEIGHT][@SCHEDULE]` is parsed here: the schedule is everything after the last `@`, the weight what
follows the last `:` before it when it parses as a number (so Windows drive letters and odd file names survive).
Every image records its prompt, seed, steps, guidance, size, model and adapters in PNG text chunks: one key each,
a JSON `lora_kit` chunk with all of them, and an A1111-style `parameters` string.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import LoraKitError


@dataclass(frozen=True)
class LoraSpec:
    path: str
    weight: float = 1.0
    schedule: str | None = None  # a spec string for lora_kit.schedule, e.g. "0:1,0.5:0.2"
    name: str = field(default="", compare=False)  # the adapter name once loaded


def parse_lora(text: str) -> LoraSpec:
    """'style.safetensors:0.8@0:1,1:0' -> LoraSpec('style.safetensors', 0.8, '0:1,1:0'); the schedule is checked."""
    from . import schedule

    rest, sched = text, None
    if not Path(text).exists() and "@" in text:
        rest, _, sched = text.rpartition("@")
        schedule.parse(sched)  # a bad spec fails here, before any model is opened
    path, weight = rest, 1.0
    head, sep, tail = rest.rpartition(":")
    if sep and head:
        try:
            path, weight = head, float(tail)
        except ValueError:
            pass
    if not Path(path).exists():
        raise LoraKitError(f"--lora {text!r}: no such file {path!r}")
    if not math.isfinite(weight):
        raise LoraKitError(f"--lora {text!r}: the weight must be a finite number")
    return LoraSpec(path, weight, sched)


def parse_size(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '768x512' -> (768, 512) as (width, height); multiples of 8."""
    parts = text.lower().split("x")
    try:
        w, h = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
        if len(parts) > 2:
            raise ValueError
    except ValueError:
        raise LoraKitError(f"--size {text!r}: expected a number (512) or WIDTHxHEIGHT (768x512)") from None
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise LoraKitError(f"--size {text!r}: width and height must be positive multiples of 8")
    return w, h


def apply_loras(pipe, specs: Sequence[LoraSpec]) -> list[LoraSpec]:
    """Load each LoRA at its weight and schedule it; returns the specs with their adapter names."""
    from . import api, schedule

    loaded = [LoraSpec(s.path, s.weight, s.schedule, api.load(pipe, s.path, weight=s.weight)) for s in specs]
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


def generate(pipe, settings: Settings, loras: Sequence[LoraSpec], on_step: Callable[[], None] | None = None):
    """`settings.n` images (seeds seed, seed + 1, ...) with their PNG metadata: [(PIL image, PngInfo)]."""
    import torch
    from PIL.PngImagePlugin import PngInfo

    from . import __version__

    steps = settings.steps or pipeline_default(pipe, "num_inference_steps")
    guidance = settings.guidance if settings.guidance is not None else pipeline_default(pipe, "guidance_scale")
    kwargs = {"num_inference_steps": steps, "guidance_scale": guidance}
    if settings.negative_prompt is not None:
        if "negative_prompt" not in inspect.signature(pipe.__call__).parameters:
            raise LoraKitError(f"{type(pipe).__name__} takes no negative prompt")
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
        image = pipe(settings.prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images[0]
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


def check_output(folder: str | os.PathLike, force: bool) -> Path:
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise LoraKitError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LoraKitError(f"{out}: the folder is not empty; pass --force to write into it")
    return out


def write(results, folder: Path, seed: int, before=None) -> list[Path]:
    """Each image as NNN-seedS.png, then grid.png (row-major, about square) and, given the same seeds rendered
    without the LoRAs (`before`), compare.png: before on the top row, after below. Every file is written atomically."""
    from .train.callbacks import grid

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, info) in enumerate(results):
        paths.append(_save(image, folder / f"{i:03d}-seed{seed + i}.png", info))
    columns = math.ceil(math.sqrt(len(results)))
    paths.append(_save(grid([image for image, _ in results], columns=columns), folder / "grid.png", results[0][1]))
    if before is not None:
        images = [image for image, _ in before] + [image for image, _ in results]
        paths.append(_save(grid(images, columns=len(results)), folder / "compare.png", results[0][1]))
    return paths


def _save(image, path: Path, info) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path
