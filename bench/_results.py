"""What every benchmark writes into bench/RESULTS.md: its own section (headed by its first line), replaced on each
run, the other sections kept."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The checkout's commit, marked -dirty when the working tree has changes ('unknown' outside git)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def write_section(path: str | Path, lines: list[str]) -> None:
    """Put `lines` (lines[0] is the '## ...' heading) into the results file in place of the section with that exact
    heading, or at the end."""
    path = Path(path)
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    marker = lines[0] + "\n"
    if marker in old:
        head, _, rest = old.partition(marker)
        old = head + (rest[rest.find("\n## ") + 1 :] if "\n## " in rest else "")
    path.write_text(old.rstrip() + "\n\n" + "\n".join(lines).rstrip() + "\n")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines: the header, its rule, a line per row (cells already formatted)."""
    return [f"| {' | '.join(cells)} |" for cells in (header, ["---"] * len(header), *rows)]


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Add --results (bench/RESULTS.md) to a benchmark's options and parse `argv` (sys.argv's); args.shown is the
    command line without --results: what reproduces the result, wherever it was written."""
    parser.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    cut = argv.index("--results") if "--results" in argv else len(argv)
    args.shown = argv[:cut] + argv[cut + 2 :]
    return args
