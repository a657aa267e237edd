"""AdaScaleSGD and AdaScaleAdam on JAX and PyTorch against the NumPy reference, update by update.

Gradient accumulation gives N = k samples per update (one replica); S = k unless `scale` is given.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_adascale
from conftest import BACKEND, Recorder, assert_same_history, flat_weights
from problems import BATCH, LeastSquares, UpdateRecorder, ema_reference, reference_history, replay_reference
from reference import AdaScaleAdamReference, AdaScaleReference, piecewise_constant

STEPS = 4
UPDATES = 6
SCHEDULE = ([3, 7], [0.05, 0.02, 0.01])

SGD_OPTIONS = {
    "plain": {"learning_rate": 0.1},
    "momentum": {"learning_rate": 0.05, "momentum": 0.9},
    "nesterov": {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True},
    "weight_decay": {"learning_rate": 0.05, "momentum": 0.9, "weight_decay": 0.05},
    "schedule_at_tau": {"learning_rate": "schedule", "momentum": 0.9},
}


def keras_rate(options):
    if options.get("learning_rate") != "schedule":
        return options
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(*SCHEDULE)
    return {**options, "learning_rate": keras_adascale.ScaleInvariantSchedule(schedule)}


def reference_rate(options):
    if options.get("learning_rate") != "schedule":
        return options
    return {**options, "learning_rate": piecewise_constant(*SCHEDULE)}


def fit(problem, optimizer, steps, updates, first=0):
    """`model.fit` over the rows the reference takes; `[(weights, gain, tau) after each update]`."""
    model = problem.model()
    model.compile(optimizer=optimizer, loss="mse")
    start, stop = first * steps * BATCH, (first + updates) * steps * BATCH
    recorder = Recorder(every=steps)
    model.fit(problem.x[start:stop], problem.y[start:stop], batch_size=BATCH, shuffle=False, callbacks=[recorder],
              verbose=0)
    return model, recorder.history


@pytest.fixture
def problem():
    return LeastSquares(num_examples=64 * BATCH, seed=3)


def test_importing_the_package_and_training_loads_no_tensorflow():
    script = ("import sys, numpy as np, keras, keras_adascale\n"
              "opt = keras_adascale.AdaScaleSGD(0.1, gradient_accumulation_steps=2)\n"
              "m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])\n"
              "m.compile(optimizer=opt, loss='mse')\n"
              "m.fit(np.ones((16, 3), 'float32'), np.ones((16, 1), 'float32'), batch_size=4, verbose=0,\n"
              "      callbacks=[keras_adascale.AdaScaleCallback(total_steps=100), keras_adascale.AutoScale(verbose=0)])\n"
              "print(sorted(name for name in sys.modules if name.split('.')[0] == 'tensorflow'))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KERAS_BACKEND": BACKEND})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("name", sorted(SGD_OPTIONS))
def test_sgd_with_accumulation_matches_the_reference_update_by_update(problem, name):
    options = SGD_OPTIONS[name]
    _, expected = reference_history(problem, STEPS, UPDATES, **reference_rate(options))
    optimizer = keras_adascale.AdaScaleSGD(gradient_accumulation_steps=STEPS, **keras_rate(options))
    _, actual = fit(problem, optimizer, STEPS, UPDATES)
    assert_same_history(actual, expected)
    assert 1.0 < expected[-1][1] < STEPS  # noisy enough for the gain to matter
    if name == "schedule_at_tau":
        assert expected[0][2] < SCHEDULE[0][0] and expected[-2][2] > SCHEDULE[0][1]  # both boundaries crossed


def test_scale_apart_from_the_samples_matches_the_reference(problem):
    _, expected = reference_history(problem, STEPS, UPDATES, scale=10, learning_rate=0.05, momentum=0.9)
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, scale=10, gradient_accumulation_steps=STEPS)
    _, actual = fit(problem, optimizer, STEPS, UPDATES)
    assert_same_history(actual, expected)
    assert optimizer.scale == 10 and optimizer.samples_per_update == STEPS


@pytest.mark.parametrize("options", [
    {"learning_rate": 0.05},
    {"learning_rate": 0.05, "weight_decay": 0.1, "amsgrad": True},
    {"learning_rate": 0.05, "statistics": "preconditioned"},
], ids=["adam", "adamw_amsgrad", "preconditioned"])
def test_adam_with_accumulation_matches_the_reference_update_by_update(problem, options):
    reference = AdaScaleAdamReference(problem.initial, scale=STEPS, **options)
    _, expected = reference_history(problem, STEPS, UPDATES, reference=reference)
    optimizer = keras_adascale.AdaScaleAdam(gradient_accumulation_steps=STEPS, **options)
    _, actual = fit(problem, optimizer, STEPS, UPDATES)
    assert_same_history(actual, expected)


def test_a_custom_loop_matches_the_reference(problem):
    """The backend's own loop: `stateless_apply` inside `jax.jit` on JAX, `apply` on PyTorch."""
    _, expected = reference_history(problem, STEPS, UPDATES, learning_rate=0.05, momentum=0.9)
    model = problem.model()
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=STEPS)
    optimizer.build(model.trainable_variables)
    actual = []
    if BACKEND == "jax":
        import jax

        def loss_fn(trainable, x, y):
            prediction, _ = model.stateless_call(trainable, [], x)
            return keras.ops.mean(keras.ops.square(prediction - y))

        @jax.jit
        def train_step(trainable, optimizer_variables, x, y):
            grads = jax.grad(loss_fn)(trainable, x, y)
            return optimizer.stateless_apply(optimizer_variables, grads, trainable)

        trainable = [v.value for v in model.trainable_variables]
        optimizer_variables = [v.value for v in optimizer.variables]
        for batch in range(STEPS * UPDATES):
            rows = slice(batch * BATCH, (batch + 1) * BATCH)
            trainable, optimizer_variables = train_step(trainable, optimizer_variables, problem.x[rows],
                                                        problem.y[rows])
            if (batch + 1) % STEPS == 0:
                for variable, value in zip(model.trainable_variables, trainable):
                    variable.assign(value)
                for variable, value in zip(optimizer.variables, optimizer_variables):
                    variable.assign(value)
                snapshot = optimizer.snapshot()
                actual.append((flat_weights(model), snapshot["gain"], snapshot["scale_invariant_iterations"]))
    else:
        import torch

        for batch in range(STEPS * UPDATES):
            rows = slice(batch * BATCH, (batch + 1) * BATCH)
            x, y = torch.as_tensor(problem.x[rows]), torch.as_tensor(problem.y[rows])
            model.zero_grad()
            loss = torch.mean(torch.square(model(x) - y))
            loss.backward()
            grads = [v.value.grad for v in model.trainable_variables]
            with torch.no_grad():
                optimizer.apply(grads, model.trainable_variables)
            if (batch + 1) % STEPS == 0:
                snapshot = optimizer.snapshot()
                actual.append((flat_weights(model), snapshot["gain"], snapshot["scale_invariant_iterations"]))
    assert_same_history(actual, expected)
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == UPDATES


def test_changing_the_accumulation_steps_during_fit_matches_the_reference(problem):
    """k 4 -> 2 between two fits (S keeps its ratio to N): no retrace needed, the reference at the new N."""
    reference, first = reference_history(problem, STEPS, 3, learning_rate=0.05, momentum=0.9)
    reference.scale = 2
    _, second = reference_history(problem, 2, 4, reference=reference, first=3 * STEPS // 2)
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=STEPS)
    model, actual = fit(problem, optimizer, STEPS, 3)
    optimizer.set_accumulation_steps(2)
    assert optimizer.accumulation_steps == 2 and optimizer.scale == 2
    recorder = Recorder(every=2)
    start = 3 * STEPS * BATCH
    model.fit(problem.x[start:start + 4 * 2 * BATCH], problem.y[start:start + 4 * 2 * BATCH], batch_size=BATCH,
              shuffle=False, callbacks=[recorder], verbose=0)
    assert_same_history(actual + recorder.history, first + second)


def test_the_update_is_computed_once_per_update_not_at_every_micro_batch(problem):
    """On JAX the update is a branch of `lax.cond`: a side effect in it runs once per update. On PyTorch the host
    knows which micro-batch completes an update. Counted at the statistics' step, which every path calls."""
    calls = []
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=STEPS)
    state_step = optimizer._state_step

    def counted(*args, **kwargs):
        if BACKEND == "jax":
            import jax

            jax.debug.callback(lambda: calls.append(1))
        else:
            calls.append(1)
        return state_step(*args, **kwargs)

    optimizer._state_step = counted
    fit(problem, optimizer, STEPS, 3)
    assert len(calls) == 3  # 3 updates of 4 micro-batches: not 12


def test_a_non_finite_gradient_skips_the_update_and_training_goes_on(problem):
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=2)
    model = problem.model()
    model.compile(optimizer=optimizer, loss="mse")
    x, y = problem.x[:8 * BATCH].copy(), problem.y[:8 * BATCH].copy()
    y[2 * BATCH] = np.nan  # the first micro-batch of the second update
    recorder = Recorder(every=2)  # through `self.model`, which on JAX syncs the state into the variables
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[recorder])
    weights = [row[0] for row in recorder.history]
    snapshot = optimizer.snapshot()
    assert snapshot["skipped_updates"] == 1
    np.testing.assert_array_equal(weights[1], weights[0])  # the skipped update left the weights
    assert np.all(np.isfinite(weights[-1])) and not np.array_equal(weights[-1], weights[1])
    assert np.isfinite(snapshot["gain"]) and int(keras.ops.convert_to_numpy(optimizer.iterations)) == 4


def test_save_and_load_resume_exactly(problem, tmp_path):
    straight = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=STEPS)
    _, expected = fit(problem, straight, STEPS, 4)
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=STEPS)
    model, first = fit(problem, optimizer, STEPS, 2)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert type(loaded.optimizer) is keras_adascale.AdaScaleSGD
    recorder = Recorder(every=STEPS)
    start = 2 * STEPS * BATCH
    loaded.fit(problem.x[start:start + 2 * STEPS * BATCH], problem.y[start:start + 2 * STEPS * BATCH],
               batch_size=BATCH, shuffle=False, callbacks=[recorder], verbose=0)
    assert len(first) == len(recorder.history) == 2 and len(expected) == 4
    for (weights, gain, tau), (expected_weights, expected_gain, expected_tau) in zip(first + recorder.history,
                                                                                       expected, strict=True):
        np.testing.assert_array_equal(weights, expected_weights)
        assert (gain, tau) == (expected_gain, expected_tau)


def test_the_statistics_are_float32_with_an_exponent_and_the_counters_int32():
    # float64 is not what it says off TensorFlow (JAX without x64 has none; Keras's PyTorch ops compute many
    # float64 operations in float32): float32 mantissas and a power-of-two exponent (test_statistics_range).
    optimizer = keras_adascale.AdaScaleSGD(gradient_accumulation_steps=2)
    assert optimizer._statistics_dtype == "float32" and optimizer._counters_dtype == "int32"
    optimizer.build([keras.Variable(np.zeros(3, np.float32))])
    for variable in (optimizer._state_floats, optimizer._sample_sqr_norm_accumulator):
        assert keras.backend.standardize_dtype(variable.dtype) == "float32"
    assert keras.backend.standardize_dtype(optimizer._statistics_exponent.dtype) == "int32"
    assert tuple(optimizer._sample_sqr_norm_accumulator.shape) == (2,)  # mantissa, exponent


def test_autoscale_changes_the_count_in_fit(problem):
    optimizer = keras_adascale.AdaScaleSGD(0.01, momentum=0.9, gradient_accumulation_steps=2)
    model = problem.model()
    model.compile(optimizer=optimizer, loss="mse")
    callback = keras_adascale.AutoScale(interval=0, warmup=0, update_cost=64.0, max_steps=8, verbose=0)
    recorder = UpdateRecorder()  # after AutoScale: it reads the S that AutoScale set for the next update
    model.fit(problem.x, problem.y, batch_size=BATCH, shuffle=False, epochs=1, verbose=0,
              callbacks=[callback, recorder])
    assert callback.changes and optimizer.accumulation_steps == callback.changes[-1]["steps"] != 2
    # Each update took k micro-batches at S = k, k as AutoScale set it: the reference at the same (N, S),
    # update by update.
    assert [scale for _, _, scale in recorder.updates] == [stop - first for first, stop, _ in recorder.updates]
    assert len({scale for _, _, scale in recorder.updates}) > 1 and len(recorder.updates) > 4
    reference = AdaScaleReference(problem.initial, 0.01, scale=2, momentum=0.9)
    assert_same_history(recorder.history, replay_reference(problem, recorder.updates, reference))


def test_a_fit_resumed_at_total_steps_runs_no_batch_and_says_why(problem, capsys):
    optimizer = keras_adascale.AdaScaleSGD(keras_adascale.ScaleInvariantSchedule(0.05, total_steps=5),
                                           gradient_accumulation_steps=2)
    model = problem.model()
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(problem.x, problem.y, batch_size=BATCH, epochs=5, verbose=0,
              callbacks=[keras_adascale.AdaScaleCallback()])
    capsys.readouterr()
    weights, snapshot = flat_weights(model), optimizer.snapshot()
    assert snapshot["scale_invariant_iterations"] >= 5
    history = model.fit(problem.x, problem.y, batch_size=BATCH, epochs=2,
                        callbacks=[keras_adascale.AdaScaleCallback()])  # the defaults of fit and the callback
    assert " >= total_steps 5: training is complete" in capsys.readouterr().out
    assert history.history == {}
    np.testing.assert_array_equal(flat_weights(model), weights)
    assert optimizer.snapshot() == snapshot


def test_non_finite_raise_is_raised_by_the_callback_after_the_batch(problem):
    optimizer = keras_adascale.AdaScaleSGD(0.05, gradient_accumulation_steps=2, non_finite="raise")
    model = problem.model()
    model.compile(optimizer=optimizer, loss="mse")
    x, y = problem.x[:8 * BATCH].copy(), problem.y[:8 * BATCH].copy()
    y[2 * BATCH] = np.nan
    with pytest.raises(FloatingPointError, match="skipped an update for NaN or Inf gradients at batch 3"):
        model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0,
                  callbacks=[keras_adascale.AdaScaleCallback(total_steps=100)])


def test_non_finite_raise_without_the_callback_raises_nothing_and_skips_as_skip_does(problem):
    # What AdaScaleSGD's docstring says: off TensorFlow only AdaScaleCallback raises.
    optimizer = keras_adascale.AdaScaleSGD(0.05, gradient_accumulation_steps=2, non_finite="raise")
    model = problem.model()
    model.compile(optimizer=optimizer, loss="mse")
    x, y = problem.x[:8 * BATCH].copy(), problem.y[:8 * BATCH].copy()
    y[2 * BATCH] = np.nan
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    assert optimizer.snapshot()["skipped_updates"] == 1 and np.all(np.isfinite(flat_weights(model)))


@pytest.mark.parametrize("overwrite", [None, 2])
def test_use_ema_averages_the_weights_as_keras_does_and_matches_the_reference(problem, overwrite):
    # Keras's EMA, after every micro-step with its `iterations` before it (the update count): the average starts
    # at the weights, and with `ema_overwrite_frequency` replaces them; fit's end puts the average in the model.
    steps, updates = 2, 6
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=steps, use_ema=True,
                                           ema_momentum=0.8, ema_overwrite_frequency=overwrite)
    model, _ = fit(problem, optimizer, steps, updates)
    reference, average = ema_reference(problem, steps, updates, 0.8, overwrite, learning_rate=0.05, momentum=0.9)
    np.testing.assert_allclose(flat_weights(model), average, rtol=2e-5, atol=1e-6)
    assert float(optimizer.scale_invariant_iterations) == pytest.approx(reference.tau, rel=1e-5)
    assert reference.tau > updates  # the gain was above 1


def test_a_star_import_takes_what_runs_here_and_the_tensorflow_only_name_says_what_it_needs():
    namespace = {}
    exec("from keras_adascale import *", namespace)
    assert {"AdaScaleSGD", "AdaScaleAdam", "AdaScaleCallback", "AutoScale", "ScalePolicy",
            "ScaleInvariantSchedule"} <= set(namespace)
    assert "enable_multi_worker_fit" not in namespace
    with pytest.raises(ImportError, match="patches Keras's TensorFlow trainer.*Set KERAS_BACKEND=tensorflow"):
        keras_adascale.enable_multi_worker_fit  # noqa: B018


def test_without_accumulation_it_is_the_reference_at_s_one(problem):
    """No `gradient_accumulation_steps`: one sample per update, S = 1, gain 1, tau counts the updates."""
    _, expected = reference_history(problem, 1, 8, learning_rate=0.05, momentum=0.9)
    hint = ("AdaScaleModel with `groups=n` (n samples from each batch)" if BACKEND == "jax"
            else "pass `gradient_accumulation_steps=k`")
    with pytest.warns(UserWarning, match="scale S = 1") as warned:
        _, actual = fit(problem, keras_adascale.AdaScaleSGD(0.05, momentum=0.9), 1, 8)
    (message,) = [str(w.message) for w in warned if "scale S = 1" in str(w.message)]  # once, not per update
    assert "cannot measure the gradient noise" in message and hint in message
    assert BACKEND != "jax" or "jax_num_cpu_devices" in message
    assert_same_history(actual, expected)
    assert [tau for _, _, tau in actual] == [float(update) for update in range(1, 9)]


def test_a_keras_older_than_the_extras_lower_bound_is_refused_naming_it(monkeypatch):
    monkeypatch.setattr(keras, "__version__", "3.12.1")
    with pytest.raises(RuntimeError, match=r"needs Keras 3\.13 or newer \(this is Keras 3\.12\.1\): pip install 'keras>=3\.13'"):
        keras_adascale.AdaScaleSGD(0.1, gradient_accumulation_steps=2)


def test_changing_the_scale_between_fits_matches_the_reference(problem):
    """S 4 -> 2 with N = 4 kept (`set_scale`): the reference with the new S from the next update."""
    reference, first = reference_history(problem, STEPS, 3, learning_rate=0.05, momentum=0.9)
    reference.scale = 2
    _, second = reference_history(problem, STEPS, 3, reference=reference, first=3)
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=STEPS)
    model, actual = fit(problem, optimizer, STEPS, 3)
    optimizer.set_scale(2)
    assert optimizer.scale == 2 and optimizer.accumulation_steps == STEPS
    recorder = Recorder(every=STEPS)
    start = 3 * STEPS * BATCH
    model.fit(problem.x[start:start + 3 * STEPS * BATCH], problem.y[start:start + 3 * STEPS * BATCH],
              batch_size=BATCH, shuffle=False, callbacks=[recorder], verbose=0)
    assert_same_history(actual + recorder.history, first + second)
