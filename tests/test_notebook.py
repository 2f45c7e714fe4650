import nbformat
import pytest
from nbclient import NotebookClient

from helpers import ROOT


@pytest.mark.slow
def test_quickstart_notebook_runs_and_plots(tmp_path):
    notebook = nbformat.read(ROOT / "notebooks/quickstart.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the plot cell shows a figure"
    (png,) = tmp_path.glob("runs/tiny/version_*/rewards.png")
    assert png.stat().st_size > 10_000
    shown = [o for o in notebook.cells[-1].outputs if "image/png" in o.get("data", {})]
    assert shown and "diagnostics/margin_length_correlation" in str(notebook.cells[-1].outputs)
