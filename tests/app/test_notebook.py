"""docs/examples/quickstart.ipynb runs top to bottom on the real Tux Paint caches."""

import shutil
from pathlib import Path

import pytest
from conftest import requires_real

NOTEBOOK = Path(__file__).resolve().parents[2] / "docs" / "examples" / "quickstart.ipynb"


@pytest.mark.real
@requires_real
def test_quickstart_notebook_runs_without_an_error(tmp_path):
    """Executed with nbclient in a scratch folder (its runs land there); any cell that raises
    fails the test with that cell's traceback. The caches are the default ones, so a warm
    machine only trains and evaluates; an empty cache is filled first."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "best pair" in text and "image_to_text" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the heatmap and the report plot
    assert (tmp_path / "runs" / "quickstart" / "report" / "report.md").exists()
    shutil.rmtree(tmp_path / "runs")
