"""CONFORMANCE.md is what the tests' `conformance` markers say (tests/conformance.py writes it)."""

import subprocess
import sys

from conformance import TABLE


def test_conformance_table_is_current():
    """Collect the suite (no test runs) and render the table: the committed file must be the same, so every row has
    a test that proves it and no proof is left out. Rewrite it with `.venv/bin/python tests/conformance.py`."""
    code = "import conformance; print(conformance.render(conformance.collect()), end='')"
    out = subprocess.run([sys.executable, "-c", code], cwd=TABLE.parent / "tests", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    rendered = out.stdout[out.stdout.index("# Conformance") :]
    assert rendered == TABLE.read_text(), "CONFORMANCE.md is stale: run .venv/bin/python tests/conformance.py"
