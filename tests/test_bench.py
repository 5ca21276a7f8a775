"""The benchmarks run end to end on a tiny budget, so they cannot rot."""

import importlib.util
from pathlib import Path


def test_extract_bench_quick(tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "extract.py"
    spec = importlib.util.spec_from_file_location("bench_extract", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "RESULTS.md"
    assert bench.main(["--quick", "--results", str(results)]) == 0
    text = results.read_text()
    assert "## bench/extract.py (quick)" in text and "error ratio" in text
    # a second run replaces its own section instead of appending a copy
    assert bench.main(["--quick", "--results", str(results)]) == 0
    assert results.read_text().count("## bench/extract.py (quick)") == 1
