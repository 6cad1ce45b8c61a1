"""notebooks/finetune.ipynb runs top to bottom (nbclient, a real kernel) in its smoke setting:
the three methods train, answer, and the LoRA adapter goes through peft."""
import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

pytestmark = pytest.mark.slow  # every test here trains, exports or runs end to end


def test_finetune_notebook_runs_top_to_bottom(monkeypatch):
    monkeypatch.setenv("MINIGLM_NOTEBOOK", "smoke")
    nb = nbformat.read(ROOT / "notebooks" / "finetune.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    text = "\n".join(
        o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    )
    assert text.startswith("smoke ")
    for method in ("full", "lora", "ptuning"):
        assert f"--- {method}" in text and f"\n  {method:8s} " in text  # trained, then answered
    assert "finetune lora: " in text and "finetune ptuning: " in text  # their start-up lines: what trains
    assert any(
        o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
        for cell in nb.cells
        for o in cell.get("outputs", [])
    )  # the loss plot
    assert not any(o.get("output_type") == "error" for cell in nb.cells for o in cell.get("outputs", []))
