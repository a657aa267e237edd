"""AdaScaleSGD in model.fit against the NumPy reference of Algorithm 1."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adascale
from conftest import LeastSquares, Recorder, assert_same_history, flat_weights, reference_history
from reference import AdaScaleReference, piecewise_constant

SCALE = 4
BATCH = 8


def reference_run(problem, updates, **kwargs):
    reference = AdaScaleReference(problem.initial, scale=SCALE, **kwargs)
    history = []
    for update in range(updates):
        samples = [
            problem.gradient(reference.params, start, start + BATCH)
            for start in range(update * SCALE * BATCH, (update + 1) * SCALE * BATCH, BATCH)
        ]
        reference.step(samples)
        history.append((reference.params.copy(), reference.gain, reference.tau))
    return reference, history


def keras_run(problem, updates, jit_compile="auto", **kwargs):
    model = problem.model()
    optimizer = keras_adascale.AdaScaleSGD(gradient_accumulation_steps=SCALE, **kwargs)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    count = updates * SCALE * BATCH
    model.fit(problem.x[:count], problem.y[:count], batch_size=BATCH, shuffle=False, verbose=0)
    return model, optimizer


@pytest.mark.parametrize(
    "options",
    [
        {"learning_rate": 0.05},
        {"learning_rate": 0.02, "momentum": 0.9},
        {"learning_rate": 0.02, "momentum": 0.9, "nesterov": True},
        {"learning_rate": 0.05, "weight_decay": 0.1, "smoothing": 0.5},
    ],
    ids=["sgd", "momentum", "nesterov", "weight_decay"],
)
def test_fit_with_accumulation_matches_reference(least_squares, options):
    updates = 6
    reference, _ = reference_run(least_squares, updates, **options)
    model, optimizer = keras_run(least_squares, updates, **options)
    np.testing.assert_allclose(flat_weights(model), reference.params, rtol=2e-5, atol=1e-6)
    assert float(optimizer.gain) == pytest.approx(reference.gain, rel=1e-5)
    assert float(optimizer.scale_invariant_iterations) == pytest.approx(reference.tau, rel=1e-5)
    assert float(optimizer.effective_learning_rate) == pytest.approx(
        reference.effective_learning_rate, rel=1e-5
    )
    assert int(optimizer.iterations) == updates
    assert 1.0 < reference.gain < SCALE  # the problem is noisy enough to test the gain


def test_piecewise_schedule_is_keyed_on_tau(least_squares):
    boundaries, values = [3, 7], [0.05, 0.02, 0.01]
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    updates = 6
    reference, history = reference_run(
        least_squares, updates, learning_rate=piecewise_constant(boundaries, values), momentum=0.5
    )
    taus = [tau for _, _, tau in history]
    assert taus[0] < boundaries[0] and taus[-2] > boundaries[1]  # both boundaries crossed
    model, optimizer = keras_run(
        least_squares, updates, learning_rate=keras_adascale.ScaleInvariantSchedule(schedule), momentum=0.5
    )
    np.testing.assert_allclose(flat_weights(model), reference.params, rtol=2e-5, atol=1e-6)
    assert float(optimizer.scale_invariant_iterations) == pytest.approx(reference.tau, rel=1e-5)
    assert float(optimizer.learning_rate) == pytest.approx(
        piecewise_constant(boundaries, values)(int(reference.tau)), rel=1e-6
    )


def test_plain_keras_schedule_is_also_keyed_on_tau(least_squares):
    boundaries, values = [3, 7], [0.05, 0.02, 0.01]
    reference, _ = reference_run(least_squares, 6, learning_rate=piecewise_constant(boundaries, values))
    model, _ = keras_run(
        least_squares, 6, learning_rate=keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    )
    np.testing.assert_allclose(flat_weights(model), reference.params, rtol=2e-5, atol=1e-6)


def test_jit_compiled_fit_matches_reference(least_squares):
    reference, _ = reference_run(least_squares, 4, learning_rate=0.02, momentum=0.9)
    model, optimizer = keras_run(least_squares, 4, jit_compile=True, learning_rate=0.02, momentum=0.9)
    np.testing.assert_allclose(flat_weights(model), reference.params, rtol=2e-5, atol=1e-6)
    assert float(optimizer.scale_invariant_iterations) == pytest.approx(reference.tau, rel=1e-5)


def test_custom_loop_apply_gradients_matches_reference(least_squares):
    reference, _ = reference_run(least_squares, 3, learning_rate=0.05)
    model = least_squares.model()
    optimizer = keras_adascale.AdaScaleSGD(0.05, gradient_accumulation_steps=SCALE)
    loss_fn = keras.losses.MeanSquaredError()

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    for start in range(0, 3 * SCALE * BATCH, BATCH):
        train_step(least_squares.x[start : start + BATCH], least_squares.y[start : start + BATCH])
    np.testing.assert_allclose(flat_weights(model), reference.params, rtol=2e-5, atol=1e-6)


def test_clipnorm_acts_on_mean_gradient_but_gain_sees_raw_samples(least_squares):
    clip = 0.01
    model, optimizer = keras_run(least_squares, 1, learning_rate=0.1, global_clipnorm=clip)
    reference, _ = reference_run(least_squares, 1, learning_rate=0.1)
    samples = [least_squares.gradient(least_squares.initial.astype(np.float64), s, s + BATCH)
               for s in range(0, SCALE * BATCH, BATCH)]
    mean = np.mean(samples, axis=0)
    step = flat_weights(model) - least_squares.initial
    expected = -reference.gain * 0.1 * mean * clip / np.linalg.norm(mean)
    np.testing.assert_allclose(step, expected, rtol=1e-4, atol=1e-7)
    assert float(optimizer.gain) == pytest.approx(reference.gain, rel=1e-5)


def test_scale_defaults_to_accumulation_steps_and_smoothing_to_paper_value():
    optimizer = keras_adascale.AdaScaleSGD(gradient_accumulation_steps=8)
    assert optimizer.scale == 8
    assert optimizer.smoothing == pytest.approx(1 - 8 / 1000)
    assert float(optimizer.gain) == 1.0
    assert float(optimizer.scale_invariant_iterations) == 0.0


def test_scale_one_warns_and_behaves_as_sgd(least_squares):
    x, y = least_squares.x[:32], least_squares.y[:32]
    sgd_model, ada_model = least_squares.model(), least_squares.model()
    sgd_model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9)
    ada_model.compile(optimizer=optimizer, loss="mse")
    sgd_model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    with pytest.warns(UserWarning, match="gain is always 1"):
        ada_model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    np.testing.assert_allclose(flat_weights(ada_model), flat_weights(sgd_model), rtol=1e-6)
    assert float(optimizer.scale_invariant_iterations) == 4.0


@pytest.mark.parametrize("samples, scale", [(4, 8), (4, 6.5), (8, 2), (2, 16)])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_accumulation_with_scale_apart_from_samples_matches_reference(samples, scale, momentum):
    problem, updates = LeastSquares(num_examples=4 * 8 * BATCH, seed=samples), 4
    _, expected = reference_history(problem, samples, updates, scale=scale, learning_rate=0.02, momentum=momentum)
    model = problem.model()
    optimizer = keras_adascale.AdaScaleSGD(
        0.02, momentum=momentum, scale=scale, gradient_accumulation_steps=samples
    )
    model.compile(optimizer=optimizer, loss="mse")
    recorder = Recorder(every=samples)
    count = updates * samples * BATCH
    model.fit(problem.x[:count], problem.y[:count], batch_size=BATCH, shuffle=False, callbacks=[recorder],
              verbose=0)
    assert optimizer.scale == scale and optimizer.samples_per_update == samples
    assert_same_history(recorder.history, expected)
    assert all(1.0 <= gain <= scale for _, gain, _ in expected)


def test_scale_above_one_with_a_single_sample_is_refused(least_squares):
    model = least_squares.model()
    model.compile(optimizer=keras_adascale.AdaScaleSGD(scale=4), loss="mse")
    with pytest.raises(ValueError, match="`scale` is 4.*gradient_accumulation_steps >= 2"):
        model.fit(least_squares.x[:32], least_squares.y[:32], batch_size=8, verbose=0)


def test_scale_may_be_a_float_and_keeps_its_type():
    assert keras_adascale.AdaScaleSGD(scale=6.5, gradient_accumulation_steps=4).scale == 6.5
    assert isinstance(keras_adascale.AdaScaleSGD(scale=8).scale, int)
    assert keras_adascale.AdaScaleSGD(gradient_accumulation_steps=4).samples_per_update == 4


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"scale": 0}, "scale"),
        ({"scale": 0.5}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"scale": float("inf")}, "scale"),
        ({"scale": "8"}, "scale"),
        ({"scale": True}, "scale"),
        ({"smoothing": 1.0}, "smoothing"),
        ({"smoothing": -0.1}, "smoothing"),
        ({"momentum": 1.5}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"nesterov": "yes"}, "nesterov"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        keras_adascale.AdaScaleSGD(**kwargs)


def test_integer_learning_rate_and_momentum_are_accepted():
    optimizer = keras_adascale.AdaScaleSGD(learning_rate=1, momentum=0)
    assert float(optimizer.learning_rate) == 1.0


def test_default_names_are_unique_as_keras_makes_them():
    first, second = keras_adascale.AdaScaleSGD(), keras_adascale.AdaScaleSGD()
    assert first.name != second.name and first.name.startswith("adascale_sgd")
    assert keras_adascale.AdaScaleSGD(name="mine").name == "mine"
    paths = [v.path for v in first.variables] + [v.path for v in second.variables]
    assert len(paths) == len(set(paths))  # a holder of both (model.get_state_tree) sees no clash


def test_momentum_out_of_range_is_refused_in_keras_own_words():
    with pytest.raises(ValueError) as keras_error:
        keras.optimizers.SGD(momentum=-1.0)
    with pytest.raises(ValueError) as our_error:
        keras_adascale.AdaScaleSGD(momentum=-1.0)
    assert str(our_error.value).startswith(str(keras_error.value))


_AFTER_RESET = """
import numpy as np, keras, keras_adascale
from tensorflow.python.eager import context

def fit(updates):
    x, y = np.random.RandomState(0).randn(64, 3), np.random.RandomState(1).randn(64, 1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    optimizer = keras_adascale.AdaScaleSGD(0.05, gradient_accumulation_steps=4)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x[: updates * 32], y[: updates * 32], batch_size=8, verbose=0)
    return optimizer

fit(1)  # traces and runs the compiled state step
context._reset_context()  # as keras's own tests do between tests
optimizer = fit(2)
print(int(optimizer.iterations), float(optimizer.scale_invariant_iterations))
"""


def test_an_optimizer_made_after_a_context_reset_trains():
    import subprocess
    import sys

    # In its own process: a reset context would unset the session's logical devices.
    result = subprocess.run([sys.executable, "-c", _AFTER_RESET], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    updates, tau = result.stdout.split()
    assert int(updates) == 2 and float(tau) >= 2
