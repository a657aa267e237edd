"""Every tutorial notebook runs top to bottom (small settings) and is committed without outputs."""

import json
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = sorted((pathlib.Path(__file__).resolve().parent.parent / "tutorials").glob("*.ipynb"))


def test_there_are_four_tutorials():
    assert [path.name for path in TUTORIALS] == [
        "01_quickstart.ipynb", "02_custom_training_loop.ipynb", "03_tpu.ipynb", "04_scale_study.ipynb"]


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda path: path.stem)
def test_tutorial_is_committed_without_outputs(path):
    notebook = json.loads(path.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name}: strip the outputs"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda path: path.stem)
def test_tutorial_runs_top_to_bottom(path, tfds_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_ADASCALE_TUTORIAL_QUICK", "1")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_data_dir))  # bundled_mnist, prepared once, offline
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
              if "image/png" in output.get("data", {})]
    assert images, "every tutorial shows at least one plot"
