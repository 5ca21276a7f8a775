"""The benchmarks run end to end on a tiny budget, so they cannot rot."""

import importlib.util
from pathlib import Path

import pytest


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


@pytest.mark.slow
def test_quality_bench_quick(tmp_path):
    """Every mode and the diffusers+peft peer row train, sample and get judged on a tiny base."""
    path = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "RESULTS.md"
    assert bench.main(["--quick", "--results", str(results)]) == 0
    text = results.read_text()
    for row in ("| lora |", "| dreambooth |", "| textual-inversion |", "| pivotal |", "| diffusers+peft (peer) |"):
        assert row in text
    assert bench.wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-3)  # the Wilson upper bound for 0/10
