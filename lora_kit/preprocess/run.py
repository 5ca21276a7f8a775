"""lora-ppim's pipeline: check paths, load the models, then stream the inputs in batches (open -> dedupe -> mask ->
crop -> caption -> write) into a staging folder that becomes OUTPUT_DIR only when everything succeeded.

Only `batch_size` decoded photos are in memory at a time, so folders of any size work.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import LoraKitError
from . import caption as captions
from . import crop as crops
from .config import PreprocessConfig
from .images import Rejected, find_files, open_image, sha256_file
from .manifest import Entry, Staging, check_paths
from .masks import Masker, finish


@dataclass
class Summary:
    output: Path
    files: int = 0  # candidate files found
    kept: int = 0  # source images used
    written: int = 0  # images written (more than kept with random:N)
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    duplicates: int = 0
    empty_masks: int = 0
    warnings: int = 0

    @property
    def losses(self) -> str:
        """'rejected 3 (animated 1, truncated 2); 1 duplicate dropped'"""
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.rejected.items()))
        rejected = f"rejected {sum(self.rejected.values())}" + (f" ({reasons})" if reasons else "")
        return f"{rejected}; {self.duplicates} duplicate{'' if self.duplicates == 1 else 's'} dropped"

    @property
    def line(self) -> str:
        parts = [f"kept {self.kept} of {self.files} files -> {self.written} images in {self.output}", self.losses]
        if self.empty_masks:
            parts.append(f"{self.empty_masks} empty mask{'' if self.empty_masks == 1 else 's'}")
        if self.warnings:
            parts.append(f"{self.warnings} warning{'' if self.warnings == 1 else 's'} (see report.json)")
        return "; ".join(parts)


@dataclass
class _Item:
    source: Path
    rel: Path
    sha256: str
    image: object
    warnings: list[str]


def run(config: PreprocessConfig, progress=None) -> Summary:
    """Preprocess `config.input_dir` into `config.output_dir`; `progress` wraps the file list (a tqdm bar)."""
    src, out = check_paths(config.input_dir, config.output_dir, config.force)
    files = find_files(src)
    if not files:
        raise LoraKitError(f"{config.input_dir}: no image files in it (or its sub-folders)")
    device = dtype = None
    if config.caption != "template" or config.mask:
        from .loading import resolve_device, resolve_dtype

        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
    # Models load before anything is written, so a wrong model path leaves no trace.
    captioner = captions.build(config, device, dtype)
    masker = Masker(config.mask_model, config.mask, device, dtype, config.batch_size) if config.mask else None

    summary = Summary(out, files=len(files))
    report = {"input": str(src), "config": asdict(config), "kept": [], "rejected": [], "duplicates": []}
    entries: list[Entry] = []
    with Staging(out) as stage:
        bar = progress(files) if progress else files
        try:
            for batch in _batches(bar, src, config, summary, report):
                entries += _process(batch, config, captioner, masker, stage, summary, report)
            if not entries:
                first = report["rejected"][0] if report["rejected"] else None
                detail = f"; first: {first['source']}: {first['reason']} ({first['detail']})" if first else ""
                raise LoraKitError(f"{config.input_dir}: no usable images ({summary.losses}){detail}")
            report["summary"] = {"files": summary.files, "kept": summary.kept, "written": summary.written,
                                 "rejected": dict(sorted(summary.rejected.items())), "duplicates": summary.duplicates,
                                 "empty_masks": summary.empty_masks}  # fmt: skip
            stage.write_manifest(entries)
            stage.write_report(report)
            stage.commit()
        except OSError as e:  # disk full, permissions (unreadable inputs are rejections, in _batches)
            raise LoraKitError(f"{config.output_dir}: cannot write the output ({e})") from None
        finally:
            if hasattr(bar, "close"):
                bar.close()  # erase the bar before the summary or an error message, not after it
    return summary


def _batches(paths, src: Path, config, summary: Summary, report):
    """Hash, open and validate each file; yield lists of `batch_size` usable images, exact duplicates dropped."""
    seen: dict[str, Path] = {}
    batch: list[_Item] = []
    for path in paths:
        try:
            digest = sha256_file(path)
        except OSError as e:  # permissions, a file removed while we run
            summary.rejected["unreadable"] += 1
            report["rejected"].append({"source": str(path), "reason": "unreadable", "detail": str(e)})
            continue
        if digest in seen:
            summary.duplicates += 1
            report["duplicates"].append({"source": str(path), "same_as": str(seen[digest])})
            continue
        seen[digest] = path
        try:
            loaded = open_image(path, config.background_rgb, config.min_size)
            crops.check_fits(loaded.image.size, config.size, config.crop_mode, config.upscale, config.bucket_step)
        except Rejected as r:
            summary.rejected[r.reason] += 1
            report["rejected"].append({"source": str(path), "reason": r.reason, "detail": r.detail})
            continue
        batch.append(_Item(path, path.relative_to(src), digest, loaded.image, loaded.warnings))
        if len(batch) == config.batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _process(batch: list[_Item], config, captioner, masker, stage: Staging, summary: Summary, report) -> list[Entry]:
    """Mask, crop, caption and write one batch of opened images."""
    probs = masker([it.image for it in batch]) if masker else [None] * len(batch)
    outputs = []  # (item, crop, image, mask image or None)
    for item, prob in zip(batch, probs, strict=True):
        centre = None
        if prob is not None:
            # the centre of what the mask keeps: faint background probability would pull a soft centroid inwards
            centre = crops.centroid(prob >= config.mask_threshold if config.mask_threshold > 0 else prob)
        if config.crop_mode == "subject" and centre is None:
            item.warnings.append(f"mask for {config.mask!r} is empty: crop centred on the image instead")
        plan = crops.plan(item.image.size, config.size, config.crop_mode, config.crops_per_image, centre,
                          config.upscale, seed=f"{config.seed}:{item.sha256}", step=config.bucket_step)  # fmt: skip
        for c in plan:
            image = crops.apply(item.image, c, config.resample)
            mask = None
            if prob is not None:
                mask = finish(crops.apply_to_mask(prob, item.image.size, c), config.mask_threshold, config.mask_blur)
            outputs.append((item, c, image, mask))
    texts = captioner([o[2] for o in outputs], [o[0].source for o in outputs])

    entries, kept = [], {}
    for (item, c, image, mask), text in zip(outputs, texts, strict=True):
        text = captions.apply_token(text, config.token, config.replace_words)
        name = stage.name(item.rel, None if config.crop_mode != "random" else len(kept.get(item.source, [])))
        sha = stage.write_png(name, image)
        stage.write_text(name[: -len(".png")] + ".txt", text + "\n")
        mask_name = None
        if mask is not None:
            mask_name = "masks/" + name[len("images/") :]
            stage.write_png(mask_name, mask)
            if mask.getextrema()[1] == 0:
                summary.empty_masks += 1
                item.warnings.append(f"{name}: mask for {config.mask!r} is empty")
        if not text:
            item.warnings.append(f"{name}: the caption is empty")
        entries.append(Entry(name, text, mask_name, str(item.source), image.width, image.height, sha))
        kept.setdefault(item.source, []).append({"image": name, "crop": [round(v, 3) for v in c.box]})
        summary.written += 1
    for item in batch:
        summary.kept += 1
        summary.warnings += len(item.warnings)
        report["kept"].append({"source": str(item.source), "sha256": item.sha256, "size": list(item.image.size),
                               "outputs": kept[item.source], "warnings": item.warnings})  # fmt: skip
        item.image = None  # free the decoded photo before the next batch
    return entries
