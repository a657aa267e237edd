"""Drivers of the experiment runner's tests, shared by tests/ (TensorFlow) and tests_runner_jax/ (JAX): the tiny
experiment, a run trained straight and killed, finished models compared. Nothing here imports TensorFlow or sets
devices (tests/conftest.py does, for TensorFlow's tests)."""

import json
import os
import signal
import subprocess
import time

import keras
import numpy as np
import pytest

# The runner's tiny experiment on real MNIST: plain SGD, AdaScale on 2 mirrored replicas with S = N and
# with S != N, and the linear scaling rule.
TINY = {
    "total_steps": 40,
    "evaluations": 2,
    "dataset": {"train_split": "train[:5%]", "test_split": "test[:10%]", "batch_size": 16},
    "model": {"name": "mlp", "hidden_units": [32]},
    "schedule": {"name": "constant", "learning_rate": 0.1},
    "optimizer": {"scale": 2},
    "strategy": {"name": "mirrored", "devices": 2},
    "runs": [
        {"name": "baseline", "optimizer": {"name": "sgd", "scale": 1}, "strategy": {"name": "default"}},
        {"name": "adascale"},
        {"name": "lsr", "optimizer": {"name": "lsr"}},
        # S = 4 baseline batches of 8 from N = 2 samples of 16 (one per replica).
        {"name": "adascale_b0", "optimizer": {"scale": 4, "baseline_batch_size": 8}},
    ],
}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def straight_and_killed(command, incomplete, root, epochs=3, timeout=240, env=None):
    """Trains a runner command to its end, then again killed with SIGKILL once `epochs` epochs are backed up.

    Args:
        command: function of an output folder -> the `keras-adascale train` command line.
        incomplete: function of an output folder -> the run's `<run>.incomplete` folder there.
        root: the folder under which the two output folders, `straight` and `killed`, are made.
        env: the processes' environment (default: this one, TensorFlow's logs quiet).

    Returns:
        `(straight folder, killed folder, epochs backed up when it was killed)`; the killed run is not resumed.
    """
    straight, killed = root / "straight", root / "killed"
    env = env or {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    finished = subprocess.run(command(straight), capture_output=True, text=True, timeout=300, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    process = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metadata = incomplete(killed) / "backup" / "training_metadata.json"
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # kill it once a few epochs are backed up
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


def assert_same_finished_models(first, second, rtol=1e-6, atol=1e-7):
    """The `model.keras` files of two finished runs hold the same weights and optimizer state (to `rtol`, `atol`)."""
    one, other = keras.models.load_model(first), keras.models.load_model(second)
    for a, b in zip(one.get_weights(), other.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
    for a, b in zip(one.optimizer.variables, other.optimizer.variables, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, err_msg=a.path)
