"""Runs a tutorial notebook top to bottom as the tests do (small settings, offline data): tests/test_tutorials.py
(TensorFlow's, in .venv) and tests_runner_jax/test_tutorial.py (JAX's, in .venv-jax)."""

import pathlib

import nbformat
from nbclient import NotebookClient

TUTORIALS = sorted((pathlib.Path(__file__).resolve().parent.parent / "tutorials").glob("*.ipynb"))
# A notebook that sets Keras's JAX backend before Keras's first import runs on JAX, with the host devices it asks for.
JAX_LINE = 'os.environ["KERAS_BACKEND"] = "jax"'


def is_jax(path):
    return any(JAX_LINE in cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code")


def execute(path, tfds_data_dir, tmp_path, monkeypatch):
    """The notebook after a run with KERAS_ADASCALE_TUTORIAL_QUICK=1 and `tfds_data_dir`'s prepared datasets,
    in `tmp_path`; fails with the cell's error where a cell raises."""
    monkeypatch.setenv("KERAS_ADASCALE_TUTORIAL_QUICK", "1")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_data_dir))  # bundled_mnist, prepared once, offline
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # a JAX notebook asks for its host devices itself
    if not is_jax(path):
        monkeypatch.delenv("KERAS_BACKEND", raising=False)
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return notebook


def images(notebook):
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
            if "image/png" in output.get("data", {})]


def printed(notebook):
    """Everything the notebook's cells printed, as one text."""
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs if output.get("output_type") == "stream")

