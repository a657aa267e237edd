"""The JAX and PyTorch tests: run once per backend, each in its own process (`KERAS_BACKEND` is read at
Keras's first import), in a virtual environment without TensorFlow (`make test` does both).

They share the NumPy reference and the least-squares problem with the TensorFlow tests (tests/).
"""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

# Four host devices for keras.distribution on JAX (test_model.py), set before JAX starts; the other tests run
# on the first, as on one device.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import keras  # noqa: E402
import pytest  # noqa: E402

from problems import Recorder, assert_same_history, flat_weights  # noqa: E402,F401 (the tests import them from here)

BACKEND = keras.backend.backend()
if BACKEND not in ("jax", "torch"):
    raise RuntimeError(f"tests_backends/ runs on KERAS_BACKEND=jax or torch, not {BACKEND!r} "
                       f"(KERAS_BACKEND={os.environ.get('KERAS_BACKEND')!r}): tests/ is TensorFlow's.")


def pytest_report_header(config):
    return f"Keras {keras.__version__} on its {BACKEND} backend"


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(0)

# `KERAS_ADASCALE_TEST_FLOAT64_NORMS=1`: PyTorch's fused update takes the sums of squares it takes on an
# accelerator (float64 norms, no read) on this CPU too (tests_backends/test_torch_fused.py runs the reference
# tests so).
if BACKEND == "torch" and os.environ.get("KERAS_ADASCALE_TEST_FLOAT64_NORMS") == "1":
    from keras_adascale.backend.torch import mechanics  # noqa: E402

    mechanics.AdaScaleMechanics._float64_norms = True
