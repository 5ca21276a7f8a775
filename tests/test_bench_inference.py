"""bench/inference.py runs end to end on the tiny pipeline, so it cannot rot."""

import importlib.util
from pathlib import Path


def test_inference_bench_quick(tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "inference.py"
    spec = importlib.util.spec_from_file_location("bench_inference", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## bench/inference.py\n\nthe full run's section stays\n")
    assert bench.main(["--quick", "--steps", "2", "--rounds", "1", "--results", str(results)]) == 0
    text = results.read_text()
    section = text[text.index("## bench/inference.py (quick)") :]
    for config in bench.CONFIGS:
        assert f"| {config} |" in section
    assert "`python bench/inference.py --quick --steps 2 --rounds 1`" in section and "scheduling overhead" in section
    assert "the full run's section stays" in text
    # a second run replaces its own section instead of appending a copy
    assert bench.main(["--quick", "--steps", "2", "--rounds", "1", "--results", str(results)]) == 0
    assert results.read_text().count("## bench/inference.py (quick)") == 1
