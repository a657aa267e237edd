"""A `.keras` saved on one backend loads and resumes on every other (issue 38, item 4).

Each backend runs tests/cross_backend_driver.py in its own process: TensorFlow in this environment, JAX and
PyTorch in `.venv-backends` (`make test` makes it). A file saved in the middle of an update and one saved at
an update boundary resume to where the saving backend's uninterrupted run ends, to float32 rounding (the
statistics are float64 on TensorFlow, float32 with an exponent on JAX and PyTorch).
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "cross_backend_driver.py"
BACKENDS_PYTHON = ROOT / ".venv-backends" / "bin" / "python"
BACKENDS = ("tensorflow", "jax", "torch")


def run(backend, *args):
    if backend != "tensorflow" and not BACKENDS_PYTHON.exists():
        pytest.skip(f"{BACKENDS_PYTHON} (made by `make test`) runs the JAX and PyTorch halves")
    python = sys.executable if backend == "tensorflow" else str(BACKENDS_PYTHON)
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["timeout", "-k", "10", "240", python, str(DRIVER), *map(str, args)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{backend} {args[0]} failed:\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folders = {}

    def saved_on(backend):
        if backend not in folders:
            folder = tmp_path_factory.mktemp(f"saved_{backend}")
            run(backend, "save", folder)
            folders[backend] = folder
        return folders[backend]

    return saved_on


PAIRS = [(source, target) for source in BACKENDS for target in BACKENDS if source != target]


@pytest.mark.parametrize("source,target", PAIRS, ids=[f"{s}-to-{t}" for s, t in PAIRS])
def test_a_file_saved_on_one_backend_resumes_on_another_where_the_uninterrupted_run_ends(saved, tmp_path, source,
                                                                                        target):
    folder = saved(source)
    run(target, "resume", folder, tmp_path)
    assert_resumed_as_uninterrupted(folder, tmp_path, source, target)


# Files that keras-adascale 0.3.0 saved (tests/cross_backend_driver.py's `save` on e177e98): TensorFlow's layout
# without the count of what entered the accumulators, JAX's (and PyTorch's) with the statistics' exponent.
SAVED_BY_0_3_0 = ROOT / "tests" / "data" / "saved_0_3_0"
OLD_PAIRS = [("tensorflow", "tensorflow"), ("tensorflow", "jax"), ("jax", "jax"), ("jax", "torch"), ("jax", "tensorflow")]


@pytest.mark.parametrize("source,target", OLD_PAIRS, ids=[f"{s}-0.3.0-to-{t}" for s, t in OLD_PAIRS])
def test_a_file_saved_by_0_3_0_resumes_where_its_uninterrupted_run_ends(tmp_path, source, target):
    run(target, "resume", SAVED_BY_0_3_0 / source, tmp_path)
    assert_resumed_as_uninterrupted(SAVED_BY_0_3_0 / source, tmp_path, source, target)


def assert_resumed_as_uninterrupted(saved_folder, resumed_folder, source, target):
    expected = np.load(saved_folder / "uninterrupted.npz")
    for name in ("mid", "boundary"):
        actual = np.load(resumed_folder / f"{name}.npz")
        assert str(actual["backend"]) == target and str(expected["backend"]) == source
        assert int(actual["updates"]) == int(expected["updates"]) == 6
        np.testing.assert_allclose(actual["weights"], expected["weights"], rtol=2e-5, atol=1e-6, err_msg=name)
        for key in ("gain", "scale_invariant_iterations", "gradient_variance", "gradient_sqr_norm",
                    "effective_learning_rate"):
            np.testing.assert_allclose(actual[key], expected[key], rtol=2e-5, err_msg=f"{name}: {key}")
        assert 1.0 < float(actual["gain"]) < 2.0
