"""The least-squares problem with exact per-batch gradients, the reference's run over its rows, and the
recording of a Keras run to compare with it.

Backend-neutral (Keras and NumPy only): the TensorFlow tests (through conftest) and the JAX and
PyTorch tests (tests_backends/) share it.
"""

import keras
import numpy as np
import pytest

from reference import AdaScaleReference


class LeastSquares:
    """y = X w* + c* + noise; loss = mean((X w + c - y)^2) per batch, as keras 'mse'."""

    def __init__(self, num_examples, dim=3, seed=0):
        rng = np.random.RandomState(seed)
        self.x = rng.randn(num_examples, dim).astype(np.float32)
        true_w = rng.randn(dim, 1).astype(np.float32)
        self.y = (self.x @ true_w + 0.5 + rng.randn(num_examples, 1)).astype(np.float32)
        self.dim = dim
        self.initial = (0.1 * rng.randn(dim + 1)).astype(np.float32)

    @classmethod
    def from_arrays(cls, x, y, initial):
        """The problem on given float32 data `x` (rows, dim), `y` (rows, 1), from `initial` [kernel..., bias]."""
        problem = cls.__new__(cls)
        problem.x, problem.y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        problem.dim = problem.x.shape[1]
        problem.initial = np.asarray(initial, np.float32)
        return problem

    def gradient(self, params, start, stop):
        """Exact gradient of the batch loss w.r.t. [kernel..., bias], float64."""
        x = self.x[start:stop].astype(np.float64)
        y = self.y[start:stop, 0].astype(np.float64)
        residual = x @ params[:-1] + params[-1] - y
        scale = 2.0 / len(y)
        return np.concatenate([scale * x.T @ residual, [scale * residual.sum()]])

    def model(self):
        model = keras.Sequential([keras.Input((self.dim,)), keras.layers.Dense(1)])
        model.set_weights([self.initial[:-1].reshape(-1, 1), self.initial[-1:]])
        return model


BATCH = 8  # examples per gradient sample (per replica, per micro-batch) in the reference drivers


def reference_history(problem, samples, updates, reference=None, first=0, scale=None, **kwargs):
    """The reference over `updates` updates of `samples` gradient samples each.

    Sample i of update u is the i-th batch of BATCH rows from row (first + u) * samples * BATCH.
    `scale` (S) defaults to `samples` (N).

    Returns:
        `(reference, [(params, gain, tau) after each update])`.
    """
    reference = reference or AdaScaleReference(
        problem.initial, scale=samples if scale is None else scale, **kwargs
    )
    history = []
    for update in range(first, first + updates):
        base = update * samples * BATCH
        reference.step(
            [problem.gradient(reference.params, base + i * BATCH, base + (i + 1) * BATCH) for i in range(samples)]
        )
        history.append((reference.params.copy(), reference.gain, reference.tau))
    return reference, history


def flat_weights(model):
    kernel, bias = model.get_weights()
    return np.concatenate([kernel.ravel(), bias.ravel()]).astype(np.float64)


class Recorder(keras.callbacks.Callback):
    """Records (weights, gain, tau) after every `every`-th batch: after each update."""

    def __init__(self, every=1):
        super().__init__()
        self.every = every
        self.history = []

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.every:
            return
        optimizer = self.model.optimizer
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's
        self.history.append(
            (flat_weights(self.model), float(optimizer.gain), float(optimizer.scale_invariant_iterations))
        )


class UpdateRecorder(keras.callbacks.Callback):
    """Records each update where it completes (where `optimizer.iterations` moves), whatever its k.

    `history`: `[(weights, gain, tau)]` after each update, as `Recorder`'s; `updates`: `[(first, stop, S)]`,
    the update's micro-batches `first..stop - 1` (counted from the start of `fit`) and its S, as the
    optimizer's snapshot said before it (the `scale` of the next update). Listed after `AutoScale`, it
    reads the S that AutoScale set.
    """

    def on_train_begin(self, logs=None):
        optimizer = self.model.optimizer
        self._updates = int(keras.ops.convert_to_numpy(optimizer.iterations))
        self._scale = optimizer.snapshot()["scale"]
        self._micro_batches = self._first = 0
        self.history, self.updates = [], []

    def on_train_batch_end(self, batch, logs=None):
        self._micro_batches += 1
        optimizer = self.model.optimizer
        updates = int(keras.ops.convert_to_numpy(optimizer.iterations))
        if updates == self._updates:
            return  # a micro-batch of gradient accumulation
        self._updates = updates
        self.history.append(
            (flat_weights(self.model), float(optimizer.gain), float(optimizer.scale_invariant_iterations))
        )
        self.updates.append((self._first, self._micro_batches, self._scale))
        self._first = self._micro_batches
        self._scale = optimizer.snapshot()["scale"]


def replay_reference(problem, updates, reference, samples_per_batch=1):
    """The reference over `UpdateRecorder.updates` of a `fit(shuffle=False)` over all of `problem`'s rows
    in batches of `samples_per_batch` x BATCH rows (wrapping around at each epoch): each update at its
    recorded S, with one sample per BATCH rows of its micro-batches. Returns `[(params, gain, tau)]`."""
    rows, history = len(problem.x), []
    for first, stop, scale in updates:
        reference.scale = scale
        starts = [(micro_batch * samples_per_batch + i) * BATCH % rows
                  for micro_batch in range(first, stop) for i in range(samples_per_batch)]
        reference.step([problem.gradient(reference.params, start, start + BATCH) for start in starts])
        history.append((reference.params.copy(), reference.gain, reference.tau))
    return history


def assert_same_history(actual, expected):
    assert len(actual) == len(expected)
    for (weights, gain, tau), (ref_weights, ref_gain, ref_tau) in zip(actual, expected, strict=True):
        np.testing.assert_allclose(weights, ref_weights, rtol=2e-5, atol=1e-6)
        assert gain == pytest.approx(ref_gain, rel=1e-5)
        assert tau == pytest.approx(ref_tau, rel=1e-5)


def ema_reference(problem, steps, updates, ema_momentum, overwrite=None, **kwargs):
    """Keras's EMA of the weights (`use_ema`) over the reference with `steps` micro-batches of BATCH rows per update.

    As Keras's `_backend_apply_gradients` does it: after every micro-step, with `iterations` (the updates done
    before that micro-step) 0 the average is the weights, else `ema_momentum` of it; where `(iterations + 1)` is
    a multiple of `overwrite` (`ema_overwrite_frequency`), the weights become the average, and the micro-batches
    after it take their gradients there.

    Returns:
        `(reference, average)`: the reference after the updates and the final average (what fit leaves in the model).
    """
    reference = AdaScaleReference(problem.initial, scale=steps, **kwargs)
    average, samples = np.zeros_like(reference.params), []
    for micro_step in range(steps * updates):
        done = micro_step // steps
        samples.append(problem.gradient(reference.params, micro_step * BATCH, (micro_step + 1) * BATCH))
        if len(samples) == steps:
            reference.step(samples)
            samples = []
        momentum = 0.0 if done == 0 else ema_momentum
        average = momentum * average + (1 - momentum) * reference.params
        if overwrite and (done + 1) % overwrite == 0:
            reference.params = average.copy()
    return reference, average


# The review's restore reproduction (tests/test_restores.py on TensorFlow, tests_backends/test_restores.py on JAX):
# every example identical, so every gradient sample is the same and the true variance is exactly 0.
IDENTICAL_DIM = 8


def identical_examples(rows):
    """`(x, y)`: `rows` copies of one example."""
    x = np.tile(np.linspace(-1.0, 1.0, IDENTICAL_DIM, dtype=np.float32), (rows, 1))
    return x, np.full((rows, 1), 3.0, np.float32)


class GainRecorder(keras.callbacks.Callback):
    """The gain after every batch (`gains`), from the optimizer's snapshot."""

    def __init__(self):
        super().__init__()
        self.gains = []

    def on_train_batch_end(self, batch, logs=None):
        self.gains.append(self.model.optimizer.snapshot()["gain"])


def assert_no_variance_seen(optimizer, recorder, updates):
    """After a run on identical examples: `updates` updates, every gain 1, the variance estimate 0."""
    snapshot = optimizer.snapshot()
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == updates
    np.testing.assert_allclose(recorder.gains, 1.0, atol=1e-5)
    assert snapshot["gradient_sqr_norm"] > 0
    assert snapshot["gradient_variance"] <= 1e-5 * snapshot["gradient_sqr_norm"]
