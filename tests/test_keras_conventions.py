"""Keras's optimizer conventions, checked on both AdaScale optimizers the way Keras checks its own.

Keras's `optimizer_sparse_test.py` feeds a `tf.IndexedSlices` gradient and requires that every write
to a non-scalar variable goes through `optimizer.assign` / `assign_add` / `assign_sub` (a direct
`variable.assign` densifies a sparse update, and bypasses what a backend or a wrapper such as
`LossScaleOptimizer` does in those methods), and that a sparse gradient gives the same weights as the
same gradient dense. Keras's own test module runs here on both AdaScale optimizers, and the same two
checks, written out, on the configurations that take different code paths: one sample (S = 1),
gradient accumulation (the gain from two micro-batches), momentum, AMSGrad, preconditioned statistics,
MirroredStrategy.
"""

import contextlib
import os
import pathlib
import re
import subprocess
import sys
import warnings
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adascale
from conftest import mirrored

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (name, optimizer class, keyword arguments, which variables a sparse gradient updates sparsely).
# At S = 1 AdaScaleSGD applies SGD's `assign_add(variable, -lr * g)` to the sparse gradient itself;
# momentum and Adam update dense moments; under accumulation the gradient is added sparsely to its
# accumulator and the update reads the dense sum.
CASES = [
    ("sgd", keras_adascale.AdaScaleSGD, {}, {"model"}),
    ("sgd_momentum", keras_adascale.AdaScaleSGD, {"momentum": 0.5}, set()),
    ("sgd_nesterov_weight_decay", keras_adascale.AdaScaleSGD,
     {"momentum": 0.5, "nesterov": True, "weight_decay": 0.1}, set()),
    ("sgd_accumulation", keras_adascale.AdaScaleSGD, {"gradient_accumulation_steps": 2}, {"optimizer"}),
    ("sgd_momentum_accumulation", keras_adascale.AdaScaleSGD,
     {"momentum": 0.5, "gradient_accumulation_steps": 2}, {"optimizer"}),
    ("adam", keras_adascale.AdaScaleAdam, {}, set()),
    ("adam_amsgrad_weight_decay", keras_adascale.AdaScaleAdam, {"amsgrad": True, "weight_decay": 0.1}, set()),
    ("adam_preconditioned_accumulation", keras_adascale.AdaScaleAdam,
     {"statistics": "preconditioned", "gradient_accumulation_steps": 2}, {"optimizer"}),
]
IDS = [case[0] for case in CASES]


def _make(optimizer_class, kwargs, variable):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "S = 1 ... behaves as plain SGD/Adam"
        optimizer = optimizer_class(learning_rate=0.1, **kwargs)
        optimizer.build([variable])
    return optimizer


def _sparse_gradient(value, shape):
    rows = (0, 2, 4)
    return tf.IndexedSlices(tf.fill((len(rows),) + shape[1:], value), tf.constant(rows, tf.int64), shape)


@contextlib.contextmanager
def _watched_writes(optimizer, model_variable):
    """Records writes to non-scalar variables made around the optimizer's `assign` methods, and which
    variables its methods updated with a sparse value. Keras's check, except that the writes happen:
    the optimizer's own methods run, so that an update under accumulation is reached."""
    variable_class = type(_components(model_variable)[0])
    model_components = _components(model_variable)
    seen = {"direct": [], "sparse": set()}
    inside_optimizer = []

    def through_optimizer(method):
        original = getattr(optimizer, method)

        def write(variable, value):
            target = variable if isinstance(variable, tf.Variable) else variable.value
            if isinstance(value, tf.IndexedSlices):
                is_model = any(target is c for c in model_components) or target is model_variable.value
                seen["sparse"].add("model" if is_model else "optimizer")
            inside_optimizer.append(method)
            try:
                return original(variable, value)
            finally:
                inside_optimizer.pop()

        return mock.patch.object(optimizer, method, side_effect=write)

    def direct(method):
        original = getattr(variable_class, method)

        def write(variable, value, *args, **kwargs):
            if len(variable.shape) and not inside_optimizer:  # Keras allows scalars (`iterations`)
                seen["direct"].append(f"{method} {variable.name}")
            return original(variable, value, *args, **kwargs)

        return mock.patch.object(variable_class, method, autospec=True, side_effect=write)

    with contextlib.ExitStack() as patches:
        for method in ("assign", "assign_add", "assign_sub"):
            patches.enter_context(through_optimizer(method))
            patches.enter_context(direct(method))
        yield seen


def _components(variable):
    """The per-device tf.Variables behind a Keras variable (one without a strategy)."""
    value = variable.value
    if isinstance(value, tf.distribute.DistributedValues):
        return list(value.values)
    return [value]


def _assert_no_direct_writes(optimizer, seen):
    assert seen["direct"] == [], (
        f"{type(optimizer).__name__} wrote non-scalar variables directly ({seen['direct']}): Keras's rule "
        "is `self.assign/assign_add/assign_sub(variable, value)`"
    )


@pytest.mark.parametrize("name, optimizer_class, kwargs, sparse_updates", CASES, ids=IDS)
def test_state_is_written_through_the_optimizers_assign_methods(name, optimizer_class, kwargs, sparse_updates):
    model_variable = keras.Variable(initializer="ones", shape=(5, 3, 2))
    optimizer = _make(optimizer_class, kwargs, model_variable)
    with _watched_writes(optimizer, model_variable) as seen:
        # Two micro-batches: with accumulation the second one is the update.
        for _ in range(2):
            optimizer.apply([_sparse_gradient(0.5, (5, 3, 2))], [model_variable])
    _assert_no_direct_writes(optimizer, seen)
    assert optimizer.iterations.numpy() == (1 if optimizer.gradient_accumulation_steps else 2)
    assert seen["sparse"] == sparse_updates


@pytest.mark.parametrize("optimizer_class, kwargs", [
    (keras_adascale.AdaScaleSGD, {"momentum": 0.5}), (keras_adascale.AdaScaleAdam, {})], ids=["sgd", "adam"])
def test_state_is_written_through_the_optimizers_assign_methods_under_mirrored_strategy(optimizer_class, kwargs):
    # Under MirroredStrategy with accumulation the update and the accumulators' reset run in
    # cross-replica context, a code path of their own.
    strategy = mirrored(2)
    with strategy.scope():
        model_variable = keras.Variable(initializer="ones", shape=(5, 3, 2))
        optimizer = _make(optimizer_class, {"gradient_accumulation_steps": 2, **kwargs}, model_variable)

    @tf.function
    def step(value):
        def replica_fn():
            context = tf.distribute.get_replica_context()
            gradient = tf.fill((5, 3, 2), value * tf.cast(context.replica_id_in_sync_group + 1, tf.float32))
            optimizer.apply([gradient], [model_variable])

        strategy.run(replica_fn)

    with _watched_writes(optimizer, model_variable) as seen:
        for value in (0.5, 0.25):
            step(tf.constant(value))
    _assert_no_direct_writes(optimizer, seen)
    assert optimizer.iterations.numpy() == 1
    assert optimizer.gain.numpy() > 1.0  # the update ran, with the replicas' different samples


KERAS_SPARSE_CASES = """
import warnings
import keras_adascale

warnings.simplefilter("ignore")  # "S = 1 ... behaves as plain SGD/Adam"
ADASCALE_CASES = [
    {"testcase_name": "adascale_sgd", "optimizer_class": keras_adascale.AdaScaleSGD,
     "expect_model_sparse_variable_updates": True},
    {"testcase_name": "adascale_sgd_momentum", "optimizer_class": keras_adascale.AdaScaleSGD,
     "init_kwargs": {"momentum": 0.05}},
    {"testcase_name": "adascale_adam", "optimizer_class": keras_adascale.AdaScaleAdam},
    {"testcase_name": "adascale_adam_amsgrad", "optimizer_class": keras_adascale.AdaScaleAdam,
     "init_kwargs": {"amsgrad": True}},
]
TEST_CASES = ADASCALE_CASES + ["""


def test_keras_own_sparse_gradient_tests_pass_on_both_adascale_optimizers(tmp_path):
    # Keras's own test module, from the installed Keras, with the AdaScale optimizers added to its cases.
    source = pathlib.Path(keras.__file__).parent / "src" / "optimizers" / "optimizer_sparse_test.py"
    if not source.exists():
        pytest.skip(f"this Keras ({keras.version()}) ships no {source.name}")
    text = source.read_text()
    assert text.count("\nTEST_CASES = [") == 1, f"Keras {keras.version()}'s {source.name} changed its TEST_CASES"
    (tmp_path / "test_keras_sparse.py").write_text(text.replace("\nTEST_CASES = [", KERAS_SPARSE_CASES, 1))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", "-k", "adascale", "test_keras_sparse.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)},
    )
    passed = re.findall(r"^PASSED \S+::(test_sparse_\w+)", result.stdout, re.MULTILINE)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert len([name for name in passed if "adascale" in name]) == 8, result.stdout[-4000:]


@pytest.mark.parametrize("name, optimizer_class, kwargs, sparse_updates", CASES, ids=IDS)
def test_a_sparse_gradient_updates_as_the_same_gradient_dense(name, optimizer_class, kwargs, sparse_updates):
    sparse_variable = keras.Variable(initializer="ones", shape=(5, 3, 2))
    dense_variable = keras.Variable(initializer="ones", shape=(5, 3, 2))
    sparse_optimizer = _make(optimizer_class, kwargs, sparse_variable)
    dense_optimizer = _make(optimizer_class, kwargs, dense_variable)
    for step in range(6):
        gradient = _sparse_gradient(10.0 - step, (5, 3, 2))
        sparse_optimizer.apply([gradient], [sparse_variable])
        dense_optimizer.apply([tf.convert_to_tensor(gradient)], [dense_variable])
        np.testing.assert_allclose(sparse_variable.numpy(), dense_variable.numpy(), rtol=1e-6, atol=1e-6)
    assert not np.allclose(sparse_variable.numpy(), 1.0)  # the updates did happen
    np.testing.assert_allclose(sparse_optimizer.scale_invariant_iterations.numpy(),
                               dense_optimizer.scale_invariant_iterations.numpy(), rtol=1e-6)
