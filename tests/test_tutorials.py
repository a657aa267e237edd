"""Every tutorial notebook runs top to bottom (small settings) and is committed without outputs. TensorFlow's
run here; the JAX one (it sets KERAS_BACKEND=jax itself) runs in tests_runner_jax/test_tutorial.py."""

import json

import pytest

from notebooks import TUTORIALS, execute, images, is_jax

TENSORFLOW_TUTORIALS = [path for path in TUTORIALS if not is_jax(path)]


def test_there_are_five_tutorials_one_on_jax():
    assert [path.name for path in TUTORIALS] == [
        "01_quickstart.ipynb", "02_custom_training_loop.ipynb", "03_tpu.ipynb", "04_scale_study.ipynb",
        "05_jax_data_parallel.ipynb"]
    assert [path.name for path in TUTORIALS if is_jax(path)] == ["05_jax_data_parallel.ipynb"]


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda path: path.stem)
def test_tutorial_is_committed_without_outputs(path):
    notebook = json.loads(path.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name}: strip the outputs"


@pytest.mark.parametrize("path", TENSORFLOW_TUTORIALS, ids=lambda path: path.stem)
def test_tutorial_runs_top_to_bottom(path, tfds_data_dir, tmp_path, monkeypatch):
    notebook = execute(path, tfds_data_dir, tmp_path, monkeypatch)
    assert images(notebook), "every tutorial shows at least one plot"
