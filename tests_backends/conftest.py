"""The JAX and PyTorch tests: run once per backend, each in its own process (`KERAS_BACKEND` is read at
Keras's first import), in a virtual environment without TensorFlow (`make test` does both).

They share the NumPy reference and the least-squares problem with the TensorFlow tests (tests/).
"""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()
if BACKEND not in ("jax", "torch"):
    raise RuntimeError(f"tests_backends/ runs on KERAS_BACKEND=jax or torch, not {BACKEND!r} "
                       f"(KERAS_BACKEND={os.environ.get('KERAS_BACKEND')!r}): tests/ is TensorFlow's.")


def pytest_report_header(config):
    return f"Keras {keras.__version__} on its {BACKEND} backend"


def flat_weights(model):
    kernel, bias = model.get_weights()
    return np.concatenate([np.ravel(kernel), np.ravel(bias)]).astype(np.float64)


class Recorder(keras.callbacks.Callback):
    """(weights, gain, tau) after every `every`-th batch: after each update."""

    def __init__(self, every=1):
        super().__init__()
        self.every = every
        self.history = []

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.every:
            return
        snapshot = self.model.optimizer.snapshot()
        self.history.append((flat_weights(self.model), snapshot["gain"], snapshot["scale_invariant_iterations"]))


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(0)
