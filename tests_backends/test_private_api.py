"""The private Keras names the JAX and PyTorch code relies on (keras_adascale/_private_api.py) are there on
the installed Keras and backend (tests/test_private_api.py checks TensorFlow's, and that every one is listed)."""

import keras

from conftest import BACKEND
from keras_adascale import _private_api


def test_every_private_name_this_backend_uses_is_there():
    problems = _private_api.missing()
    assert problems == [], "\n".join(problems)


def test_the_names_checked_here_are_the_optimizers_and_this_backends_own():
    checked = {entry.name for entry in _private_api.NAMES if _private_api.needed(entry)}
    assert {"_backend_apply_gradients", "_accumulated_gradients", "_iterations", "_velocities"} <= checked
    assert ("_update_metrics_variables" in checked) == (BACKEND == "jax")
    assert "maybe_merge_call" not in checked  # TensorFlow's


def test_a_missing_name_is_reported_with_the_backend_and_its_user():
    entry = _private_api.PrivateName(_private_api._OPTIMIZER, "_no_such_hook", "backend/common/mechanics.py", "a test",
                                     backends=_private_api._ALL)
    (message,) = _private_api.missing([entry])
    name = {"jax": "JAX", "torch": "PyTorch"}[BACKEND]
    assert f"has no `_no_such_hook` in Keras {keras.version()} with {name} " in message and "backend/common/mechanics.py" in message
