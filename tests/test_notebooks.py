"""notebooks/*.ipynb run top to bottom on the shipped toy model (fewer training steps), so they cannot rot."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_KIT_ROOT", str(ROOT))
    monkeypatch.setenv("LORA_KIT_NB_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("LORA_KIT_NB_STEPS", "3")
    monkeypatch.setenv("LORA_KIT_NB_SAMPLE_STEPS", "2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    for cell in nb.cells:  # run what is committed, not last run's outputs
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # base, subject, data, two adapters, merged
    for name in ("sks.safetensors", "striped.safetensors", "merged.safetensors"):
        assert (tmp_path / "work" / name).is_file()
    assert os.listdir(tmp_path / "work" / "sks-class-images")  # DreamBooth made its class images
