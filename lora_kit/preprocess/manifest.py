"""The output folder: path checks, file names, manifest.jsonl (the schema lora-train reads, CONTRACTS.md) and
report.json, all built in a hidden folder beside OUTPUT_DIR that is renamed into place only when complete.

Layout: images/<input sub-folders>/<name>.png with <name>.txt (kohya captions) beside each, masks/ mirroring
images/, manifest.jsonl (one object per written image) and report.json (kept, rejected with reasons, duplicates).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import LoraKitError
from ..formats import files

MANIFEST = "manifest.jsonl"
REPORT = "report.json"
STAGING_SUFFIX = ".ppim-tmp"


@dataclass
class Entry:
    """One line of manifest.jsonl; field order is the contract's."""

    image: str  # relative to the manifest
    caption: str
    mask: str | None  # relative to the manifest, or None
    source: str  # the original file (absolute)
    width: int
    height: int
    sha256: str  # of the written image file


def check_paths(input_dir: str, output_dir: str, force: bool) -> tuple[Path, Path]:
    """Resolved (input, output), or an error naming the problem; nothing is created or changed."""
    src, out = Path(input_dir).expanduser(), Path(output_dir).expanduser()
    if not src.exists():
        raise LoraKitError(f"{input_dir}: no such input folder")
    if not src.is_dir():
        raise LoraKitError(f"{input_dir}: not a folder (give the folder of images)")
    src, out = src.resolve(), out.resolve()
    if (earlier := earlier_output(src)) is not None:
        where = "is" if earlier == src else f"holds, in {earlier.relative_to(src).as_posix()}/,"
        raise LoraKitError(
            f"{input_dir}: {where} a lora-ppim output ({MANIFEST}) whose masks/ are not photos; "
            f"give the original photos ({REPORT} names their folder), or its images/ folder alone"
        )
    if out == src:
        raise LoraKitError(f"{output_dir}: the output folder is the input folder (inputs are never modified)")
    if src in out.parents:
        raise LoraKitError(f"{output_dir}: the output folder is inside the input folder (inputs are never modified)")
    if out in src.parents:
        raise LoraKitError(f"{output_dir}: the output folder contains the input folder; replacing it would delete "
                           "the inputs")  # fmt: skip
    if out.exists():
        if not out.is_dir():
            raise LoraKitError(f"{output_dir}: exists and is not a folder")
        if any(out.iterdir()):
            if not force:
                raise LoraKitError(f"{output_dir}: not empty (--force replaces an earlier lora-ppim output)")
            if not (out / MANIFEST).is_file():
                raise LoraKitError(f"{output_dir}: not empty and not a lora-ppim output (no {MANIFEST}); "
                                   "refusing to replace it even with --force")  # fmt: skip
    return src, out


def earlier_output(src: Path) -> Path | None:
    """The first lora-ppim output (a folder with a manifest.jsonl) in `src` or under it, hidden folders aside (the
    inputs skip them), else None: taking one as photos would train on its masks."""
    for p in sorted(src.rglob(MANIFEST)):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts):
            return p.parent
    return None


def sweep_stale(final: Path) -> list[Path]:
    """Remove the staging folders of `final` left by lora-ppim runs that were killed (SIGKILL, a crash, a power
    cut): those named by `Staging` with the id of a process that no longer runs. A running one's is kept."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(\d+)-[a-z0-9_]+{re.escape(STAGING_SUFFIX)}")
    removed = []
    for p in final.parent.iterdir() if final.parent.is_dir() else []:
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not _running(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows' os.kill(pid, 0) would end the process
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (OverflowError, OSError):
        return True  # another user's process (PermissionError), or no way to tell: not ours to touch
    return True


class Staging:
    """A temporary folder beside `final` (`.NAME.PID-XXXXXXXX.ppim-tmp`); `commit()` swaps it into place, leaving
    the block without commit (an error, Ctrl-C, SIGTERM in the CLI) removes it and any parent folders it had to
    create; what a killed run left is swept by the next run to the same output."""

    def __init__(self, final: Path):
        self.final = final
        self.path: Path | None = None
        self._made: list[Path] = []
        self._taken: set[str] = set()

    def __enter__(self) -> Staging:
        missing = [p for p in [self.final.parent, *self.final.parent.parents] if not p.exists()]
        try:
            for p in reversed(missing):
                p.mkdir()
                self._made.append(p)
            sweep_stale(self.final)
            made = tempfile.mkdtemp(prefix=f".{self.final.name}.{os.getpid()}-", suffix=STAGING_SUFFIX,
                                    dir=self.final.parent)  # fmt: skip
            self.path = Path(made)
            files.ordinary(made)  # mkdtemp makes it private; the output is an ordinary folder
        except OSError as e:
            self.__exit__(OSError, e, None)
            raise LoraKitError(f"{self.final}: cannot create the output folder ({e})") from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.path is not None and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        if exc_type is not None:
            for p in reversed(self._made):
                try:
                    p.rmdir()
                except OSError:
                    pass

    def commit(self) -> None:
        old = None
        if self.final.exists():  # checked empty, or a previous lora-ppim output with --force
            old = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=".ppim-old", dir=self.final.parent))
            os.replace(self.final, old / "x")
        try:
            os.replace(self.path, self.final)
        except BaseException:  # also Ctrl-C/SIGTERM between the two renames: the earlier output goes back
            if old is not None:
                os.replace(old / "x", self.final)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        self.path = None

    def name(self, source_rel: Path, index: int | None = None) -> str:
        """A unique 'images/sub/stem[-i].png' for a source path relative to the input (case-insensitively unique,
        so that a.jpg and a.png both survive on macOS and Windows file systems)."""
        parent = source_rel.parent.as_posix()
        stem = source_rel.stem + ("" if index is None else f"-{index}")
        extension = source_rel.suffix.lstrip(".").lower()
        for c in itertools.chain([stem, f"{stem}-{extension}"], (f"{stem}-{n}" for n in itertools.count(2))):
            rel = c if parent == "." else f"{parent}/{c}"
            if rel.lower() not in self._taken:
                self._taken.add(rel.lower())
                return f"images/{rel}.png"
        raise AssertionError("unreachable")  # itertools.count never ends

    def write_png(self, rel: str, image) -> str:
        """Write `image` as PNG at `rel`; the sha256 of the bytes written."""
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
        path = self.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    def write_text(self, rel: str, text: str) -> None:
        path = self.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    def write_manifest(self, entries: list[Entry]) -> None:
        lines = [json.dumps(asdict(e), ensure_ascii=False) for e in entries]
        self.write_text(MANIFEST, "".join(line + "\n" for line in lines))

    def write_report(self, report: dict) -> None:
        self.write_text(REPORT, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
