"""PyTorch's fused update (`keras_adascale.backend.torch`): no read of the device from the host.

On CUDA a read of a tensor's value from the host (`bool(t)`, `float(t)`, `.item()`, `.numpy()`...) waits for
every kernel queued before it. The reads are counted here by instrumenting `torch.Tensor`'s reading methods
while the optimizer applies a gradient, on this CPU, with the sums of squares an accelerator takes (float64
norms, forced: `_float64_norms`); Keras's own SGD, which reads twice per micro-batch in `fit`, shows that the
count sees reads.
"""

import os
import pathlib
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest

import keras_adascale
from conftest import BACKEND
from problems import BATCH, LeastSquares

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's fused update")

STEPS = 4
READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "cpu", "numpy")


@pytest.fixture
def problem():
    return LeastSquares(num_examples=32 * BATCH, seed=3)


@pytest.fixture
def float64_norms(monkeypatch):
    from keras_adascale.backend.torch import mechanics

    monkeypatch.setattr(mechanics.AdaScaleMechanics, "_float64_norms", True)


def trained(problem, optimizer, micro_batches=STEPS):
    """A model compiled with `optimizer`, fitted on the first `micro_batches` micro-batches."""
    model = problem.model()
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(problem.x[:micro_batches * BATCH], problem.y[:micro_batches * BATCH], batch_size=BATCH,
              shuffle=False, verbose=0)
    return model


def reads_while_applying(optimizer, problem, micro_batches, monkeypatch, model=None):
    """Fits `micro_batches` micro-batches (after one update's, on a new model) while counting the reads made
    inside `optimizer.apply`; returns the count."""
    import torch

    model = model or trained(problem, optimizer)
    first = int(optimizer._iterations.numpy())
    state = {"applying": False, "reads": 0}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def read(self, *args, _original=original, **kwargs):
            # In the thread that applies: Keras 3.15 converts the logs of the batch before to NumPy in a thread
            # of its own (CallbackList's ThreadPoolExecutor), which may overlap `apply` (seen under pytest-xdist).
            if state["applying"] and threading.get_ident() == state["thread"]:
                state["reads"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    apply = optimizer.apply

    def counted_apply(*args, **kwargs):
        state["applying"], state["thread"] = True, threading.get_ident()
        try:
            return apply(*args, **kwargs)
        finally:
            state["applying"] = False

    monkeypatch.setattr(optimizer, "apply", counted_apply)
    rows = slice(first * BATCH, (first + micro_batches) * BATCH)
    model.fit(problem.x[rows], problem.y[rows], batch_size=BATCH, shuffle=False, verbose=0)
    monkeypatch.undo()
    return state["reads"]


OPTIMIZERS = {
    "sgd": lambda: keras_adascale.AdaScaleSGD(0.05, gradient_accumulation_steps=STEPS),
    "sgd_momentum_weight_decay_schedule": lambda: keras_adascale.AdaScaleSGD(
        keras_adascale.ScaleInvariantSchedule(keras.optimizers.schedules.PiecewiseConstantDecay([2], [0.05, 0.02])),
        momentum=0.9, weight_decay=0.01, gradient_accumulation_steps=STEPS),
    "sgd_nesterov_ema": lambda: keras_adascale.AdaScaleSGD(0.05, momentum=0.9, nesterov=True, use_ema=True,
                                                           gradient_accumulation_steps=STEPS),
    "adamw_amsgrad": lambda: keras_adascale.AdaScaleAdam(0.01, weight_decay=0.01, amsgrad=True,
                                                         gradient_accumulation_steps=STEPS),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_no_read_of_the_device_while_applying_with_an_accelerators_sums(problem, float64_norms, monkeypatch, name):
    optimizer = OPTIMIZERS[name]()
    assert reads_while_applying(optimizer, problem, 3 * STEPS, monkeypatch) == 0
    assert optimizer.__dict__["_fused"] in ("sgd", "adam") and int(optimizer.iterations.numpy()) == 4


def test_the_count_sees_keras_own_reads(problem, float64_norms, monkeypatch):
    # Keras's SGD with accumulation decides each micro-batch's branch with `bool` of a tensor (`ops.cond`).
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9, gradient_accumulation_steps=STEPS)
    assert reads_while_applying(optimizer, problem, 3 * STEPS, monkeypatch) >= 3 * STEPS


def test_on_a_cpu_one_read_per_micro_batch_and_one_per_update(problem, monkeypatch):
    # A CPU has no queue to wait for: the float32 sums are checked (one `bool` each), the float64 ones being ~20x dearer.
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=STEPS)
    assert reads_while_applying(optimizer, problem, 3 * STEPS, monkeypatch) == 3 * STEPS + 3


def test_a_change_of_the_setting_between_steps_is_read_once(problem, float64_norms, monkeypatch):
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=STEPS)
    model = trained(problem, optimizer)
    optimizer.set_accumulation_steps(2)
    # The host's copy of the setting is read again after the change (three reads: the two variables and the
    # micro-step), then never.
    assert reads_while_applying(optimizer, problem, 6, monkeypatch, model=model) == 3
    assert int(optimizer.iterations.numpy()) == 1 + 3 and optimizer.accumulation_steps == 2


def test_with_an_accelerators_sums_the_reference_tests_pass():
    here = pathlib.Path(__file__).resolve().parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "test_optimizers.py"),
         str(here / "test_statistics_range.py"), str(here / "test_restores.py"), "-k", "not tensorflow"],
        env={**os.environ, "KERAS_ADASCALE_TEST_FLOAT64_NORMS": "1"}, capture_output=True, text=True, timeout=600,
        check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def test_between_updates_a_saved_file_holds_zeros_for_the_accumulators(problem, float64_norms):
    # The fused update leaves the last update's sums in the accumulators (the next micro-batch overwrites them).
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=STEPS)
    model = problem.model()
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(problem.x[:(STEPS + 2) * BATCH], problem.y[:(STEPS + 2) * BATCH], batch_size=BATCH, shuffle=False,
              verbose=0)
    accumulators = [*optimizer._accumulated_gradients, optimizer._sample_sqr_norm_accumulator,
                    optimizer._sample_count_accumulator]
    store = {}
    optimizer.save_own_variables(store)
    portable = optimizer._portable_variables()
    saved = {id(v): np.asarray(store[str(i)]) for i, v in enumerate(portable)}
    # mid-update (2 of 4 micro-batches): the sums of the two, as on every backend
    assert all(np.any(saved[id(a)] != 0) for a in accumulators)
    np.testing.assert_array_equal(saved[id(optimizer._sample_count_accumulator)], [2.0, 2.0])
    model.fit(problem.x[:2 * BATCH], problem.y[:2 * BATCH], batch_size=BATCH, shuffle=False, verbose=0)
    store = {}
    optimizer.save_own_variables(store)
    saved = {id(v): np.asarray(store[str(i)]) for i, v in enumerate(portable)}
    assert all(np.any(a.numpy() != 0) for a in accumulators)  # the live variables hold the spent sums
    assert all(not np.any(saved[id(a)]) for a in accumulators)  # the file holds zeros


def test_a_non_finite_update_is_skipped_without_a_read(problem, float64_norms, monkeypatch):
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=STEPS)
    model = trained(problem, optimizer)
    weights = [w.copy() for w in model.get_weights()]
    momentum = [np.array(m.numpy()) for m in optimizer.momentums]
    problem.y[STEPS * BATCH + 1] = np.inf
    assert reads_while_applying(optimizer, problem, STEPS, monkeypatch, model=model) == 0
    after, momenta = model.get_weights(), list(optimizer.momentums)
    assert len(weights) == len(after) == len(momentum) == len(momenta) == 2  # kernel and bias
    for before, now in zip(weights, after, strict=True):
        np.testing.assert_array_equal(now, before)
    for before, variable in zip(momentum, momenta, strict=True):
        np.testing.assert_array_equal(variable.numpy(), before)
    assert int(optimizer.skipped_updates.numpy()) == 1
