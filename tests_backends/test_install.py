"""The backend is an extra (issue 39): this environment, made with `pip install -e '.[jax,torch]'` (`make test`),
has no TensorFlow, and without any backend Keras can load, `import keras_adascale` names the extras."""

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys

import pytest


def test_the_jax_and_torch_extras_bring_no_tensorflow():
    assert importlib.util.find_spec("tensorflow") is None
    requirements = importlib.metadata.requires("keras-adascale")
    core = [r for r in requirements if "extra ==" not in r]
    assert sorted(re.match(r"[A-Za-z0-9_.-]+", r)[0] for r in core) == ["keras", "numpy"]
    for extra in ("jax", "torch"):
        names = {re.match(r"[A-Za-z0-9_.-]+", r)[0] for r in requirements if re.search(f"extra == .{extra}.", r)}
        assert "tensorflow" not in names and extra in names


def test_without_tensorflow_the_default_backend_names_the_extras(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "KERAS_BACKEND"}
    env["KERAS_HOME"] = str(tmp_path)  # no keras.json: Keras's default backend, TensorFlow
    result = subprocess.run([sys.executable, "-c", "import keras_adascale"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: KERAS_BACKEND is not set, so Keras runs on TensorFlow, which is not "
                           "installed (No module named 'tensorflow')"), last
    for extra in ("tensorflow", "jax", "torch"):
        assert f"'keras-adascale[{extra}]'" in last


def test_the_torch_here_is_the_cpu_wheel_without_cuda_libraries():
    """`make test` pins torch 2.13.0, which resolves to the CPU wheel: no CUDA build, no nvidia-* wheels (a plain
    PyPI torch brings several GB of them). The README's line for PyTorch's CPU index could not be run here (no
    network beyond the package mirror); this checks what the Makefile installs (an environment without PyTorch,
    as `make compat`'s jax pairs, has nothing to check)."""
    torch = pytest.importorskip("torch")

    assert torch.version.cuda is None, torch.__version__
    names = sorted(dist.metadata["Name"] for dist in importlib.metadata.distributions())
    assert not [name for name in names if name.lower().startswith(("nvidia-", "triton"))], names
