"""The library functions behind the file commands (lora-merge, -resize, -extract, -convert, -inspect).

Each takes paths, validates every input before writing anything, writes atomically, and returns what the command
prints. The maths lives in `ops` (pure functions over LoRA dicts); this file only moves files in and out.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import kinds, ops
from .errors import LoraKitError
from .formats import embeddings as ti_files
from .formats import files
from .formats.kind_rules import kind_of
from .inject import targeted
from .models import architecture, check_spec, loads_in_fp32, local_path, local_paths, open_pipeline, prediction_in
from .state import check_fits, components, modules, plain_pair, split_key
from .targets import resolve

KEPT_METADATA = ("lora_kit.trigger_words", "lora_kit.targets", "lora_kit.config", "modelspec.trigger_phrase")


def _same(items):
    return items


@dataclass
class Report:
    """What an operation wrote and how exact it was."""

    path: Path
    total_error: float = 0.0
    errors: dict[str, float] = field(default_factory=dict)
    ranks: dict[int, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# the formats whose writers keep LyCORIS kinds under their own names (LoHa, LoKr, DoRA, IA3, full, Tucker LoCon) and
# whose readers take them back; the others (peft, comfyui, native) hold plain LoRA pairs only, so such modules reach
# them through --rank (an SVD) or not at all
KIND_FORMATS = ("kohya", "native")  # the formats that hold every kind as it is
_KIND_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "ia3": "IA3", "full": "full diff", "norm": "norm diff"}


def _not_pairs(mods: dict[str, dict]) -> dict[str, dict]:
    """The modules of {stem: parts} that are not plain LoRA pairs (down, up, alpha)."""
    return {stem: parts for stem, parts in mods.items() if not plain_pair(parts)}


def _kind_names(mods: dict[str, dict]) -> str:
    """'LoHa, DoRA' for a set of modules: what a refusal names."""

    def name(parts) -> str:
        if kind_of(parts) == "lora":
            return "DoRA" if "dora_scale" in parts else "Tucker LoCon" if "mid" in parts else "LoRA + diff_b"
        return _KIND_NAMES.get(kind_of(parts), kind_of(parts)) + ("+DoRA" if "dora_scale" in parts else "")

    return ", ".join(sorted({name(parts) for parts in mods.values()}))


def _peft_holds(parts: dict) -> bool:
    """Whether a PEFT/diffusers file holds this module: a LoRA pair, with DoRA by output rows at most."""
    dora = parts.get("dora_scale")
    per_row = dora is None or dora.numel() == parts["up"].shape[0]
    return kind_of(parts) == "lora" and "diff_b" not in parts and per_row


def _check_kinds(source, mods: dict[str, dict], to: str, reshape: bool, model: str | None, verb: str) -> None:
    """Refuse, in one line naming `source`, what cannot become a file in format `to`: modules of other kinds with
    neither a format that holds them nor `reshape` (--rank / --dynamic); with reshape, DoRA/IA3 modules without a
    model (their delta depends on the base weight), a bias delta in a format that has none, and modules that change
    no weight."""
    others = _not_pairs(mods)
    if not others:
        return
    stem = next(iter(others))
    if not reshape:
        if to in KIND_FORMATS or all(ops.is_pair(p) and "diff_b" not in p for p in others.values()):
            return  # (Tucker LoCons alone are folded into plain pairs, exactly)
        if to == "peft" and all(_peft_holds(p) for p in others.values()):
            return  # (DoRA on a LoRA by output rows: PEFT's lora_magnitude_vector)
        raise LoraKitError(
            f"{source}: holds {_kind_names(others)} modules (e.g. {stem}), which a {to} file cannot hold; pass "
            "--rank N (or --dynamic) to turn them into plain LoRA by SVD of their exact deltas"
        )
    need = {s: p for s, p in others.items() if kinds.needs_base(p)}
    if need and model is None:
        raise LoraKitError(
            f"{source}: its {_kind_names(need)} modules (e.g. {next(iter(need))}) have deltas that depend on the base "
            f"weight; {verb} needs --model"
        )
    for s, p in others.items():
        if kind_of(p) not in ("lora", "loha", "lokr", "ia3", "full") or (kind_of(p) == "full" and "diff" not in p):
            raise LoraKitError(f"{source}: {s} is a {_kind_names({s: p})} module that changes no weight; no LoRA "
                               "can hold it")  # fmt: skip
        if "diff_b" in p and to not in KIND_FORMATS:
            raise LoraKitError(
                f"{source}: {s} holds a bias delta (diff_b), which a {to} LoRA cannot hold; --to kohya keeps it "
                "beside the pair (LyCORIS and ComfyUI apply it)"
            )


def _layer_weights(pipe, stems) -> dict[str, torch.Tensor]:
    """{canonical stem: the weight of the layer it names} (meta tensors on a meta pipeline: shapes only)."""
    comps = components(pipe)
    out = {}
    for stem in stems:
        component, path = stem.split(".", 1)
        out[stem] = comps[component].get_submodule(path).weight.detach()
    return out


def _merge_sidecars(inputs: Sequence[Path]) -> tuple[dict[str, dict], dict[str, Path]]:
    """(the union of the inputs' pivotal-tuning tokens, read and checked as lora_kit.load reads them
    (ti_files.read_unplaced), {token: the sidecar it came from}); a token in two sidecars is an error (tokens of one
    text encoder in two widths are refused by ti_files.file_tensors, which names both sidecars)."""
    merged: dict[str, dict] = {}
    owner: dict[str, Path] = {}
    for path in inputs:
        side = ti_files.sidecar(path)
        if not side.exists():
            continue
        for component, tokens in ti_files.read_unplaced(side).items():
            for token, vectors in tokens.items():
                if token in merged.get(component, {}):
                    raise LoraKitError(
                        f"{side}: token {token!r} is also in {owner[token]}; rename it in one of them first"
                    )
                merged.setdefault(component, {})[token] = vectors
                owner[token] = side
    return merged, owner


def merge(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    weights: Sequence[float],
    *,
    rank: int | None = None,
    conv_rank: int | None = None,
    dtype=None,
    force: bool = False,
    progress: Callable = _same,
    allow_pickle: bool = False,
    model: str | None = None,
) -> Report:
    """Merge LoRA files into `output` with delta = sum_i weights[i] * delta_i; `rank` re-compresses by SVD.

    The inputs must be in one format and for one base model. Pivotal-tuning sidecars (`x.emb.safetensors`) are
    merged too; a token present in two of them is an error. Pickled {name: tensor} inputs need allow_pickle.
    Inputs holding other kinds (LoHa, LoKr, DoRA, IA3, full diff) are merged by summing each module's exact delta
    and factoring the sum by SVD at `rank` (then required); names and layer shapes come from `model`, else from
    the architecture the files are for (built on the meta device); DoRA/IA3 deltas need `model`'s weights.
    """
    from .formats.stored import architecture_of, one_spelling, read_lora, write_lora

    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise LoraKitError("merge needs at least one LoRA file")
    if len(inputs) != len(weights):
        raise LoraKitError(f"{len(inputs)} LoRAs but {len(weights)} weights")
    ops.check_ranks(rank=rank, conv_rank=conv_rank)
    if conv_rank is not None and rank is None:  # merged ranks are concatenated unless --rank re-compresses them
        raise LoraKitError(
            f"--conv-rank {conv_rank} without --rank: it is the rank of kxk convs when --rank re-compresses"
        )
    files.check_output(output, force, [*inputs, *(local_paths(model) if model else [])])
    loaded = [read_lora(p, allow_pickle) for p in inputs]
    formats = {fmt for _, fmt, _ in loaded}
    if len(formats) > 1:
        raise LoraKitError(f"the inputs are in different formats ({', '.join(sorted(formats))}); convert them first")
    archs = [architecture_of(meta, state) for state, _, meta in loaded]
    if len({a for a in archs if a}) > 1:
        pairs = ", ".join(f"{p}: {a}" for p, a in zip(inputs, archs, strict=True))
        raise LoraKitError(f"the inputs are for different base models ({pairs})")
    tokens, owners = _merge_sidecars(inputs)  # checked before anything is written
    if tokens:
        files.check_output(ti_files.sidecar(output), force, [ti_files.sidecar(p) for p in inputs])
        ti_files.file_tensors(tokens, ti_files.sidecar(output), owners)  # a sidecar no model could load: refused now
    arch, fmt = next((a for a in archs if a), None), formats.pop()
    summed = False  # (Tucker LoCons alone are concatenated like plain pairs, their cores folded: exact)
    for path, (state, _, _) in zip(inputs, loaded, strict=True):
        others = {stem: p for stem, p in _not_pairs(modules(state)).items() if not ops.is_pair(p) or "diff_b" in p}
        summed = summed or bool(others)
        if others and rank is None:
            raise LoraKitError(
                f"{path}: holds {_kind_names(others)} modules (e.g. {next(iter(others))}); merging them into one LoRA "
                "needs --rank N (the weighted sum of their deltas is factored by SVD)"
            )
        _check_kinds(path, others, fmt, True, model, "merging them")
    if summed:
        return _merge_kinds(inputs, loaded, output, weights, rank, conv_rank, arch, fmt, dtype, force, progress,
                            allow_pickle, model, tokens, owners)  # fmt: skip
    # one spelling per module (lora_te_ / lora_te1_, SGM / diffusers block names, ...), so that two spellings sum
    pieces = one_spelling([state for state, _, _ in loaded], fmt, arch)
    parts = [(piece, w, str(p)) for p, w, split in zip(inputs, weights, pieces, strict=True) for piece in split]
    merged = ops.merge([x for x, _, _ in parts], [w for _, w, _ in parts], names=[n for _, _, n in parts])
    report = Report(Path(output))
    if rank is not None:
        merged, report.errors, report.total_error = ops.rerank(merged, rank, conv_rank, progress=progress)
    meta = {"merged_from": [str(p) for p in inputs], "merge_weights": list(weights)}
    dtype = dtype or given_dtype(*(state for state, _, _ in loaded))
    prediction = next((p for _, _, m in loaded if (p := prediction_in(m))), None)
    write_lora(output, merged, fmt, arch, dtype=dtype, metadata=meta, force=force, prediction=prediction)
    if tokens:
        sidecar = ti_files.write(ti_files.sidecar(output), tokens, force=force)
        report.notes.append(f"embeddings merged into {sidecar}")
    report.ranks = dict(Counter(p["down"].shape[0] for p in modules(merged).values()))
    return report


def _merge_kinds(inputs, loaded, output, weights, rank, conv_rank, arch, fmt, dtype, force, progress, allow_pickle,
                 model, tokens, owners) -> Report:  # fmt: skip
    """merge() of inputs holding other kinds (checked by merge): read onto `model` (or the meta architecture), the
    weighted sum of each module's exact delta factored at `rank` (ops.merge_deltas), written in the inputs' format."""
    from .formats import read, write
    from .formats.dispatch import FORMATS
    from .models import meta_pipeline

    if model is None and arch is None:
        raise LoraKitError(f"{inputs[0]}: the files do not say which base model they are for; pass --model")
    pipe = open_pipeline(model, allow_pickle=allow_pickle) if model is not None else meta_pipeline(arch)
    states = []
    for path in inputs:
        state, _ = read(path, pipe, allow_pickle=allow_pickle)
        check_fits(pipe, state, source=str(path))  # (each delta takes its layer's shape)
        states.append(state)
    bases = _layer_weights(pipe, {stem for state in states for stem in modules(state)})
    report = Report(Path(output))
    merged, report.errors, report.total_error = ops.merge_deltas(
        states, weights, rank, conv_rank, bases=bases, names=[str(p) for p in inputs], progress=progress
    )
    meta = {"merged_from": [str(p) for p in inputs], "merge_weights": list(weights)}
    dtype = dtype or given_dtype(*(state for state, _, _ in loaded))
    prediction = next((p for _, _, m in loaded if (p := prediction_in(m))), None)
    report.path = write(output, merged, pipe, format=fmt if fmt in FORMATS else None, dtype=dtype, metadata=meta,
                        force=force, prediction=prediction)  # fmt: skip
    if tokens:
        sidecar = ti_files.write(ti_files.sidecar(output), tokens, force=force)
        report.notes.append(f"embeddings merged into {sidecar}")
    report.ranks = dict(Counter(p["down"].shape[0] for p in modules(merged).values()))
    return report


def given_dtype(*states: dict) -> torch.dtype | None:
    """The dtype the inputs store their factors in, when they share one: what merge and resize write unless told
    (their maths runs in fp32); None (fp32) for inputs in several dtypes."""
    found = {t.dtype for s in states for k, t in s.items() if not k.endswith("alpha") and t.is_floating_point()}
    return found.pop() if len(found) == 1 else None


def resize(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    rank: int | None = None,
    dynamic: tuple[str, float] | None = None,
    conv_rank: int | None = None,
    dtype=None,
    force: bool = False,
    progress: Callable = _same,
    allow_pickle: bool = False,
) -> Report:
    """Shrink a LoRA file to `rank` or by a dynamic rule (`("sv_fro", 0.9)`), keeping each delta's strength
    (a pickled {name: tensor} input needs allow_pickle)."""
    from .formats.stored import architecture_of, read_lora, write_lora

    ops.check_resize(rank, dynamic, conv_rank)
    files.check_output(output, force, [input])
    state, fmt, meta = read_lora(input, allow_pickle)
    others = {stem: p for stem, p in _not_pairs(modules(state)).items() if not ops.is_pair(p)}
    if others:  # their deltas take the layer's shape (and DoRA/IA3 its values): names must be mapped to a model
        raise LoraKitError(
            f"{input}: holds {_kind_names(others)} modules (e.g. {next(iter(others))}); lora-convert --rank N "
            "turns them into a LoRA of rank N"
        )
    resized, errors, total = ops.resize(state, rank, dynamic, conv_rank, progress=progress)
    kept = {k: v for k, v in meta.items() if k in KEPT_METADATA}
    dtype = dtype or given_dtype(state)
    arch, prediction = architecture_of(meta, state), prediction_in(meta)
    path = write_lora(output, resized, fmt, arch, dtype=dtype, metadata=kept, force=force, prediction=prediction)
    ranks = dict(Counter(p["down"].shape[0] for p in modules(resized).values()))
    before = {stem: parts["down"].shape[0] for stem, parts in modules(state).items()}
    notes = []
    if all(parts["down"].shape[0] == before[stem] for stem, parts in modules(resized).items()):
        if dynamic is not None:
            what = f"--dynamic {dynamic[0]}={dynamic[1]:g} keeps every module's rank"
        else:
            what = f"every module already has rank <= {rank}" + (f" (kxk convs: {conv_rank})" if conv_rank else "")
        notes.append(f"{what}: nothing to shrink; {path} holds the same deltas as {input}")
    return Report(path, total, errors, ranks, notes)


DEFAULT_TARGETS = {"unet": "locon", "transformer": "dit"}


def targeted_weights(pipe, targets: str | None, text_encoders: bool) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {'component.path': weight}} of the layers an extraction covers; the preset of the UNet or
    transformer must select some layer (inject.targeted)."""
    out = {}
    for comp, module in components(pipe).items():
        if comp.startswith("text_encoder"):
            if not text_encoders or "CLIP" not in type(module).__name__:
                continue
            preset = "clip-all"
        else:
            preset = targets or DEFAULT_TARGETS[comp]
        out[comp] = {f"{comp}.{p}": module.get_submodule(p).weight.detach() for p in targeted(module, preset)}
    return out


def _flat(weights: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {stem: w for per_component in weights.values() for stem, w in per_component.items()}


def extract_pipelines(
    base: str, tuned: str, rank: int, conv_rank: int | None = None, targets: str | None = None,
    text_encoders: bool = False, fast: bool = True, min_diff: float = 0.0, progress: Callable = lambda x: x,
    allow_pickle: bool = False,
):  # fmt: skip
    """(LoRA state, per-module errors, total error, skipped components, the base pipeline) for BASE -> TUNED
    (pickled .ckpt checkpoints only with allow_pickle)."""
    ops.check_ranks(rank=rank, conv_rank=conv_rank)
    if targets is not None:
        resolve(targets)  # an unknown preset: refused before any model is opened
    for spec in (base, tuned):  # a missing TUNED: refused before BASE is opened
        check_spec(spec, allow_pickle)
    base_pipe = open_pipeline(base, allow_pickle=allow_pickle)
    base_w = targeted_weights(base_pipe, targets, text_encoders)  # a preset matching no layer: before TUNED opens
    _check_finite(base, base_w)
    tuned_pipe = open_pipeline(tuned, allow_pickle=allow_pickle)
    a, b = architecture(components(base_pipe)), architecture(components(tuned_pipe))
    if a != b:
        raise LoraKitError(f"{base} is {a} but {tuned} is {b}: extract needs two models of one architecture")
    tuned_w = targeted_weights(tuned_pipe, targets, text_encoders)
    mismatch = ops.shape_mismatch(_flat(base_w), _flat(tuned_w))
    if mismatch:
        raise LoraKitError(f"{base} and {tuned} {mismatch}; extract needs two models of one architecture and size")
    _check_finite(tuned, tuned_w)
    merged_base, merged_tuned, skipped = {}, {}, []
    for comp, weights in base_w.items():
        diff = max(((tuned_w[comp][k].float() - w.float()).abs().max().item() for k, w in weights.items()), default=0)
        if diff <= min_diff:
            skipped.append(comp)
            continue
        merged_base.update(weights)
        merged_tuned.update(tuned_w[comp])
    if not merged_base:
        raise LoraKitError(f"{tuned} does not differ from {base} in any targeted layer")
    state, errors, total = ops.extract(merged_base, merged_tuned, rank, conv_rank, fast=fast, progress=progress)
    return state, errors, total, skipped, base_pipe


def _check_finite(model: str, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """A targeted weight holding NaN or inf has no SVD (LinAlgError), and a NaN difference compares as no change."""
    for stem, w in _flat(weights).items():
        if not w.isfinite().all():
            raise LoraKitError(f"{model}: tensor {stem}.weight holds NaN or inf; extract needs finite weights")


def extract(
    base: str,
    tuned: str,
    output: str | os.PathLike,
    *,
    rank: int = 16,
    conv_rank: int | None = None,
    targets: str | None = None,
    text_encoders: bool = False,
    fast: bool = True,
    format: str | None = None,
    dtype=None,
    force: bool = False,
    progress: Callable = _same,
    allow_pickle: bool = False,
) -> Report:
    """A LoRA file from two pipelines (folders, hub ids or single-file checkpoints): SVD of every targeted weight
    difference, in fp32."""
    from .formats import write

    files.check_output(output, force, [*local_paths(base), *local_paths(tuned)])
    state, errors, total, skipped, base_pipe = extract_pipelines(
        base, tuned, rank, conv_rank, targets, text_encoders, fast=fast, progress=progress, allow_pickle=allow_pickle
    )
    path = write(output, state, base_pipe, format=format, dtype=dtype, force=force,
                 metadata={"extracted_from": [base, tuned]})  # fmt: skip
    ranks = dict(Counter(p["down"].shape[0] for p in modules(state).values()))
    return Report(path, total, errors, ranks, [f"{c}: unchanged, skipped" for c in skipped])


def convert(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    to: str,
    model: str | None = None,
    dtype=None,
    force: bool = False,
    allow_pickle: bool = False,
    rank: int | None = None,
    conv_rank: int | None = None,
    dynamic: tuple[str, float] | None = None,
    progress: Callable = _same,
) -> Report:
    """Rewrite a LoRA file (any supported format) as `to`; names are mapped through `model`'s modules, or through
    the real architecture the file is for, built on the meta device (models.meta_pipeline).

    With `rank` and/or `dynamic` (as resize takes them) every module becomes a plain LoRA: the exact delta of each
    LoHa/LoKr/DoRA/IA3/full module factored by SVD (DoRA and IA3 need `model`: their delta depends on the base
    weight), LoRA modules above the rank shrunk, the others kept; the report holds each module's relative error.
    A full diff's bias delta (`diff_b`) stays beside its pair in kohya files and is refused in others.
    Without them, other kinds are kept where `to` holds them (KIND_FORMATS) and refused elsewhere."""
    from .formats import read, write
    from .formats.dispatch import precheck
    from .formats.stored import architecture_of
    from .models import meta_pipeline

    reshape = rank is not None or dynamic is not None
    if reshape:
        ops.check_resize(rank, dynamic, conv_rank)
    elif conv_rank is not None:
        raise LoraKitError(f"--conv-rank {conv_rank} without --rank: it is the rank of kxk convs when --rank converts")
    files.check_output(output, force, [input, *(local_paths(model) if model else [])])
    precheck(input, allow_pickle, model)  # a bad file, or one for another architecture: before any model opens
    stored = _read_named(input)  # the file checked as stored before any model is built
    if stored is not None:
        _check_kinds(input, modules(stored[0]), to, reshape, model, "the conversion")
    if model is not None:
        pipe = open_pipeline(model, allow_pickle=allow_pickle)
    elif stored is None:
        raise LoraKitError(
            f"{input}: a pickled, cloneofsimo or PEFT-folder adapter names no base model; pass --model (and "
            "--allow-pickle for a pickle)"
        )
    else:
        arch = architecture_of(stored[2], stored[0])
        if arch is None:
            raise LoraKitError(f"{input}: the file does not say which base model it is for; pass --model")
        pipe = meta_pipeline(arch)
    state, meta = read(input, pipe, allow_pickle=allow_pickle)
    _check_kinds(input, modules(state), to, reshape, model, "the conversion")  # (a pickle's or PEFT folder's: now)
    if model is not None:  # (without one, the shipped architecture maps names only: a smaller model's files pass)
        check_fits(pipe, state, source=str(input))
    report = Report(Path(output))
    if reshape:
        not_pairs = _not_pairs(modules(state))
        others = {k: t for k, t in state.items() if split_key(k)[0] in not_pairs}
        check_fits(pipe, others, source=str(input))  # their deltas take the layer's shape: it must be theirs
        bases = _layer_weights(pipe, not_pairs)  # (a pair's own factors give its shape)
        dtype = dtype or given_dtype(state)  # (the SVD works in fp32; the file keeps the input's dtype)
        state, report.errors, report.total_error = ops.resize(state, rank, dynamic, conv_rank, progress, bases)
        report.ranks = dict(Counter(p["down"].shape[0] for p in modules(state).values()))
    elif to not in KIND_FORMATS:
        state = ops.fold_mids(state)  # Tucker LoCons as plain pairs (_check_kinds let nothing else through)
    kept = {k: v for k, v in meta.items() if k in KEPT_METADATA}
    prediction = prediction_in(meta)  # (a --model's scheduler says it first)
    report.path = write(output, state, pipe, format=to, dtype=dtype, metadata=kept, force=force, prediction=prediction)
    return report


def _read_named(input: str | os.PathLike) -> tuple | None:
    """read_lora(input) (checked) for a file whose keys name its modules; None for one that only a model can read:
    a pickle, a cloneofsimo `.safetensors` (positional keys) or a PEFT standalone folder."""
    from .formats import legacy, peft
    from .formats.stored import read_lora

    p = Path(input)
    if p.suffix in files.PICKLES or peft.is_standalone(p) or legacy.is_legacy(files.read_header(p)[0]):
        return None
    return read_lora(p)


def inspect(path: str | os.PathLike) -> dict:
    """Format, architecture, modules, ranks, alphas, trigger words and metadata, from the header only."""
    from .formats.header import describe

    return describe(path)


def collapse_into_model(
    model: str,
    lora: str | os.PathLike,
    output: str | os.PathLike,
    weight: float = 1.0,
    dtype=None,
    force=False,
    allow_pickle: bool = False,
    single_file: bool = False,
) -> Path:
    """Open MODEL, collapse LORA at `weight` (fp32 maths), and write OUTPUT atomically: a diffusers folder
    (save_pretrained to a temp dir + rename; with force an existing OUTPUT is replaced only if it is a pipeline
    folder holding neither input), or with `single_file` one checkpoint in MODEL's layout (single_file.writer), each
    component in the dtype MODEL stores it in unless `dtype`. LORA's file is checked (dispatch.precheck) before
    MODEL is opened."""
    from .formats.dispatch import precheck
    from .models import TOY, toy_model

    out = Path(output)
    inputs = [Path(toy_model()) if model == TOY else p for p in local_paths(model)] + [Path(lora)]
    if single_file:
        files.check_output(out, force, inputs)
    else:
        _check_pipeline_output(out, inputs, force)
    precheck(lora, allow_pickle, model)
    check_spec(model, allow_pickle)
    from .api import collapse, load  # (torch's compiler with it: seconds a refusal above need not wait)

    parent = out.resolve().parent
    from .single_file.reader import is_single_file, stored_dtype

    # a checkpoint opens in the dtype it stores (collapse adds in fp32 and rounds once, as it would after an fp32
    # open): one copy of the weights in memory
    pipe = open_pipeline(model, stored_dtype(model, allow_pickle) if is_single_file(model) else None,
                         allow_pickle=allow_pickle)  # fmt: skip
    load(pipe, lora, weight=weight, allow_pickle=allow_pickle)
    if single_file:
        _check_held(pipe, lora, model)
    collapse(pipe)
    if dtype is not None:
        pipe.to(dtype)
    else:  # diffusers opens fp16 folders in fp32: each component goes back to the dtype its files hold
        modules_ = {c: m for c, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
        for comp, stored in _stored_dtypes(model, modules_).items():
            modules_[comp].to(stored)
    if single_file:
        from .single_file.writer import write_single_file

        return write_single_file(pipe, out, dtype=dtype, force=force, inputs=tuple(inputs),
                                 metadata={"lora_kit.collapsed": f"{Path(lora).name}@{weight:g}"})  # fmt: skip
    from safetensors import SafetensorError

    tmp = old = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.resolve().name}.", dir=parent))
        pipe.save_pretrained(tmp)
        loads_in_fp32(tmp)  # its text encoders open in fp32 like its UNet, unless a dtype is asked for
        for path in (tmp, *tmp.rglob("*")):  # mkdtemp and safetensors make them private; this is an ordinary model
            files.ordinary(path)
        if out.exists():  # moved aside, not deleted, until the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{out.resolve().name}.", suffix=".old", dir=parent))
            os.replace(out, old / "x")
        os.replace(tmp, out)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        if old is not None and (old / "x").exists() and not out.exists():
            os.replace(old / "x", out)
        raise LoraKitError(f"{out}: cannot write the model ({getattr(e, 'strerror', None) or e})") from None
    finally:
        for folder in (tmp, old):
            if folder is not None and folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
    return out


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _check_held(pipe, lora, model: str) -> None:
    """A single-file output holds the components MODEL's main file held: a LoRA that changes another one (the text
    encoders of a FLUX transformer-only file) cannot be written there."""
    from .inject import lora_modules
    from .single_file.reader import SOURCE_ATTR

    source = getattr(pipe, SOURCE_ATTR, None)
    if source is None:
        return
    held = {c for c, (cp, _) in source.slots.items() if cp is source.main}
    changed = sorted(c for c, m in components(pipe).items() if c not in held and next(lora_modules(m), None))
    if changed:
        raise LoraKitError(f"{lora} changes {', '.join(changed)}, which {source.main.path} does not hold; write a "
                           "diffusers folder instead (-o DIR)")  # fmt: skip


def _stored_dtypes(model: str, comps) -> dict[str, torch.dtype]:
    """{component: the one float dtype its safetensors files hold} for a local MODEL folder, or one in the hub
    cache; a component whose files mix dtypes (or hold none we can read) is left out. A single-file MODEL: the
    writer keeps each tensor's own dtype, so nothing is cast here."""
    from .single_file.reader import is_single_file

    if is_single_file(model):
        return {}
    root = local_path(model)
    if root is None:
        try:
            from diffusers import DiffusionPipeline

            root = Path(DiffusionPipeline.download(model, local_files_only=True))
        except Exception:  # noqa: BLE001 - no cached copy: the dtypes as loaded stand
            return {}
    out = {}
    for comp in comps:
        found = set()
        for f in Path(root, comp).glob("*.safetensors"):
            entries = files.read_header(f)[0]
            found |= {_SAFETENSORS_DTYPES.get(e.get("dtype")) for k, e in entries.items() if k != "__metadata__"}
        found.discard(None)
        if len(found) == 1:
            out[comp] = found.pop()
    return out


def _check_pipeline_output(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an output folder that exists (unless force, and then only a pipeline folder that holds no input),
    or whose parent is missing or not writable."""
    if out.exists():
        if not force:
            raise LoraKitError(f"{out}: already exists (use --force to overwrite)")
        if not (out / "model_index.json").is_file():
            raise LoraKitError(f"{out}: exists and is not a pipeline folder; refusing to replace it")
        target = out.resolve()
        for p in inputs:
            if p.exists() and (p.resolve() == target or target in p.resolve().parents):
                raise LoraKitError(f"{out}: holds the input {p}; write the model elsewhere")
    parent = out.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise LoraKitError(f"{out}: the folder {parent} does not exist or is not writable")
