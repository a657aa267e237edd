"""AdaScaleSGD on one device against the NumPy reference of Algorithm 1: arguments, `model.fit` and custom loops,
non-finite gradients, the noise scale and predicted gain, config round trips, saving and resuming."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adascale
from conftest import (BATCH, Interrupt, LeastSquares, assert_same_history, fit_accumulated, flat_weights,
                      reference_history, sample_applier)
from reference import AdaScaleReference, piecewise_constant

SCALE = 4


def keras_run(problem, updates, jit_compile="auto", **kwargs):
    """`model.fit` with `AdaScaleSGD(gradient_accumulation_steps=SCALE, **kwargs)` over `updates` updates."""
    model = problem.model()
    optimizer = keras_adascale.AdaScaleSGD(gradient_accumulation_steps=SCALE, **kwargs)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    fit_accumulated(model, problem, SCALE, updates)
    return model, optimizer


# Arguments and defaults.


def test_scale_defaults_to_accumulation_steps():
    assert keras_adascale.AdaScaleSGD(gradient_accumulation_steps=8).scale == 8


def test_smoothing_defaults_to_the_papers_value():
    assert keras_adascale.AdaScaleSGD(gradient_accumulation_steps=8).smoothing == pytest.approx(1 - 8 / 1000)


def test_gain_is_one_and_tau_zero_before_any_update():
    optimizer = keras_adascale.AdaScaleSGD(gradient_accumulation_steps=8)
    assert float(optimizer.gain) == 1.0
    assert float(optimizer.scale_invariant_iterations) == 0.0


def test_scale_keeps_the_type_it_was_given():
    assert keras_adascale.AdaScaleSGD(scale=6.5, gradient_accumulation_steps=4).scale == 6.5
    assert isinstance(keras_adascale.AdaScaleSGD(scale=8).scale, int)


def test_samples_per_update_are_the_accumulation_steps():
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


def test_non_finite_must_be_skip_or_raise():
    with pytest.raises(ValueError, match="`non_finite` must be 'skip' or 'raise'"):
        keras_adascale.AdaScaleSGD(0.1, non_finite="ignore")


def test_integer_learning_rate_and_momentum_are_accepted():
    optimizer = keras_adascale.AdaScaleSGD(learning_rate=1, momentum=0)
    assert float(optimizer.learning_rate) == 1.0


def test_momentum_out_of_range_is_refused_in_keras_own_words():
    with pytest.raises(ValueError) as keras_error:
        keras.optimizers.SGD(momentum=-1.0)
    with pytest.raises(ValueError) as our_error:
        keras_adascale.AdaScaleSGD(momentum=-1.0)
    assert str(our_error.value).startswith(str(keras_error.value))


def test_scale_above_one_with_a_single_sample_is_refused(least_squares):
    model = least_squares.model()
    model.compile(optimizer=keras_adascale.AdaScaleSGD(scale=4), loss="mse")
    with pytest.raises(ValueError, match="`scale` is 4.*gradient_accumulation_steps >= 2"):
        model.fit(least_squares.x[:32], least_squares.y[:32], batch_size=8, verbose=0)


def test_default_names_are_unique_as_keras_makes_them():
    first, second = keras_adascale.AdaScaleSGD(), keras_adascale.AdaScaleSGD()
    assert first.name != second.name and first.name.startswith("adascale_sgd")


def test_an_explicit_name_is_kept():
    assert keras_adascale.AdaScaleSGD(name="mine").name == "mine"


def test_two_optimizers_variables_have_distinct_paths():
    first, second = keras_adascale.AdaScaleSGD(), keras_adascale.AdaScaleSGD()
    paths = [v.path for v in first.variables] + [v.path for v in second.variables]
    assert len(paths) == len(set(paths))  # a holder of both (model.get_state_tree) sees no clash


# Against the reference: model.fit and custom loops.


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
    reference, _ = reference_history(least_squares, SCALE, updates, **options)
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
    reference, history = reference_history(
        least_squares, SCALE, updates, learning_rate=piecewise_constant(boundaries, values), momentum=0.5
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
    reference, _ = reference_history(least_squares, SCALE, 6, learning_rate=piecewise_constant(boundaries, values))
    model, _ = keras_run(
        least_squares, 6, learning_rate=keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    )
    np.testing.assert_allclose(flat_weights(model), reference.params, rtol=2e-5, atol=1e-6)


def test_jit_compiled_fit_matches_reference(least_squares):
    reference, _ = reference_history(least_squares, SCALE, 4, learning_rate=0.02, momentum=0.9)
    model, optimizer = keras_run(least_squares, 4, jit_compile=True, learning_rate=0.02, momentum=0.9)
    np.testing.assert_allclose(flat_weights(model), reference.params, rtol=2e-5, atol=1e-6)
    assert float(optimizer.scale_invariant_iterations) == pytest.approx(reference.tau, rel=1e-5)


def test_custom_loop_apply_gradients_matches_reference(least_squares):
    reference, _ = reference_history(least_squares, SCALE, 3, learning_rate=0.05)
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


def clipped_first_update(problem, clip):
    """One update with `global_clipnorm=clip`, and the reference's unclipped update from the same samples."""
    model, optimizer = keras_run(problem, 1, learning_rate=0.1, global_clipnorm=clip)
    reference, _ = reference_history(problem, SCALE, 1, learning_rate=0.1)
    return model, optimizer, reference


def test_clipnorm_acts_on_the_mean_gradient(least_squares):
    clip = 0.01
    model, _, reference = clipped_first_update(least_squares, clip)
    samples = [least_squares.gradient(least_squares.initial.astype(np.float64), s, s + BATCH)
               for s in range(0, SCALE * BATCH, BATCH)]
    mean = np.mean(samples, axis=0)
    step = flat_weights(model) - least_squares.initial
    expected = -reference.gain * 0.1 * mean * clip / np.linalg.norm(mean)
    np.testing.assert_allclose(step, expected, rtol=1e-4, atol=1e-7)


def test_the_gain_sees_the_unclipped_samples(least_squares):
    _, optimizer, reference = clipped_first_update(least_squares, 0.01)
    assert float(optimizer.gain) == pytest.approx(reference.gain, rel=1e-5)


def test_scale_one_warns_that_the_gain_is_always_one(least_squares):
    model = least_squares.model()
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.05, momentum=0.9), loss="mse")
    with pytest.warns(UserWarning, match="gain is always 1"):
        model.fit(least_squares.x[:32], least_squares.y[:32], batch_size=8, shuffle=False, verbose=0)


@pytest.mark.filterwarnings("ignore:AdaScaleSGD has scale S = 1")
def test_scale_one_behaves_as_sgd(least_squares):
    x, y = least_squares.x[:32], least_squares.y[:32]
    sgd_model, ada_model = least_squares.model(), least_squares.model()
    sgd_model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9)
    ada_model.compile(optimizer=optimizer, loss="mse")
    sgd_model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
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
    actual = fit_accumulated(model, problem, samples, updates)
    assert optimizer.scale == scale and optimizer.samples_per_update == samples
    assert_same_history(actual, expected)
    assert all(1.0 <= gain <= scale for _, gain, _ in expected)


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


# Gradient samples applied one by one, outside model.fit (conftest.sample_applier).


def samples(update):
    """Two gradient samples of size 4, the same for the same `update`."""
    rng = np.random.RandomState(update)
    return [rng.randn(4) for _ in range(2)]


def accumulating_optimizer(**kwargs):
    """`AdaScaleSGD(0.1, momentum=0.9)` over 2 accumulation steps: `(optimizer, variable, update)`."""
    optimizer = keras_adascale.AdaScaleSGD(0.1, momentum=0.9, gradient_accumulation_steps=2, **kwargs)
    return (optimizer, *sample_applier(optimizer, 4))


def update_state(optimizer, variable):
    """Everything an update may change, as plain numbers."""
    values = {name: float(getattr(optimizer, name)) for name in
              ("gain", "scale_invariant_iterations", "gradient_variance", "gradient_sqr_norm",
               "effective_learning_rate")}
    values["weights"] = variable.numpy().tolist()
    values["momentum"] = [v.numpy().tolist() for v in optimizer.variables if "momentum" in v.path]
    return values


# Non-finite gradients.


def poisoned_second_update(bad):
    """An update from `samples(0)`, then one whose second sample holds `bad`.

    Returns:
        `(optimizer, variable, update, state before the poisoned update, reference after the first update)`.
    """
    optimizer, variable, update = accumulating_optimizer()
    reference = AdaScaleReference(np.zeros(4), 0.1, scale=2, momentum=0.9)
    update(samples(0))
    reference.step(samples(0))
    before = update_state(optimizer, variable)
    poisoned = samples(1)
    poisoned[1][2] = bad
    update(poisoned)
    return optimizer, variable, update, before, reference


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_an_update_with_a_non_finite_gradient_is_skipped(bad):
    optimizer, variable, _, before, _ = poisoned_second_update(bad)
    assert update_state(optimizer, variable) == before
    assert int(optimizer.skipped_updates) == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_training_goes_on_after_a_skipped_update_as_if_it_never_came(bad):
    optimizer, variable, update, _, reference = poisoned_second_update(bad)
    update(samples(2))
    reference.step(samples(2))
    np.testing.assert_allclose(variable.numpy(), reference.params, rtol=1e-5, atol=1e-7)
    assert float(optimizer.scale_invariant_iterations) == pytest.approx(reference.tau, rel=1e-6)
    assert float(optimizer.gain) == pytest.approx(reference.gain, rel=1e-5)
    assert math.isfinite(float(optimizer.gradient_variance)) and math.isfinite(float(optimizer.gradient_sqr_norm))


def raising_optimizer_and_nan_update():
    """`non_finite="raise"` after one finite update: `(optimizer, variable, update, state, a NaN sample list)`."""
    optimizer, variable, update = accumulating_optimizer(non_finite="raise")
    update(samples(0))
    poisoned = samples(1)
    poisoned[0][0] = np.nan
    return optimizer, variable, update, update_state(optimizer, variable), poisoned


def test_non_finite_raise_fails_the_step():
    _, _, update, _, poisoned = raising_optimizer_and_nan_update()
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf in the gradients"):
        update(poisoned)


def test_non_finite_raise_changes_nothing():
    optimizer, variable, update, before, poisoned = raising_optimizer_and_nan_update()
    with pytest.raises(tf.errors.InvalidArgumentError):
        update(poisoned)
    assert update_state(optimizer, variable) == before


@pytest.mark.parametrize("magnitude", [1e-30, 1e-20, 1e20, 1e30])
def test_the_gain_is_the_same_at_extreme_gradient_scales(magnitude):
    gains = {}
    for scale_factor in (1.0, magnitude):
        optimizer, _, update = accumulating_optimizer()
        for step in range(3):
            update([scale_factor * sample for sample in samples(step)])
        gains[scale_factor] = float(optimizer.gain)
        assert math.isfinite(float(optimizer.gradient_variance))
    assert 1.0 < gains[1.0] < 2
    assert gains[magnitude] == pytest.approx(gains[1.0], rel=1e-5)


# The gradient noise scale and the predicted gain (McCandlish et al., 2018) from AdaScale's statistics.


def exact_noise_scale(problem, params):
    """tr(Sigma) / |G|^2 over the whole dataset, from exact per-example gradients, in examples."""
    per_example = np.stack([problem.gradient(params, i, i + 1) for i in range(len(problem.y))])
    mean = per_example.mean(axis=0)
    trace = float(np.sum((per_example - mean) ** 2)) / len(per_example)
    return trace / float(mean @ mean)


@pytest.mark.parametrize("samples, scale, batch", [(4, 4, 8), (4, 8, 16)])
def test_noise_scale_times_the_baseline_batch_converges_to_the_exact_value(samples, scale, batch):
    # learning_rate=0 keeps the weights (and so the true gradient and its covariance) fixed.
    problem = LeastSquares(num_examples=4096, dim=5, seed=3)
    expected = exact_noise_scale(problem, problem.initial.astype(np.float64))
    baseline = batch * samples / scale  # S x B0 = N x B
    model = problem.model()
    optimizer = keras_adascale.AdaScaleSGD(0.0, scale=scale, smoothing=0.995, gradient_accumulation_steps=samples)
    model.compile(optimizer=optimizer, loss="mse")
    dataset = tf.data.Dataset.from_tensor_slices((problem.x, problem.y)).shuffle(4096, seed=0).repeat()
    model.fit(dataset.batch(batch, drop_remainder=True), steps_per_epoch=samples * 600, verbose=0)
    measured = float(optimizer.gradient_noise_scale) * baseline
    assert measured == pytest.approx(expected, rel=0.15)
    assert 0.5 < expected / baseline < 50  # the noise is neither negligible nor everything


def test_noise_scale_is_zero_before_any_update():
    optimizer = keras_adascale.AdaScaleSGD(0.1, gradient_accumulation_steps=2)
    sample_applier(optimizer, 3)
    assert float(optimizer.gradient_noise_scale) == 0.0


def test_noise_scale_is_infinite_without_signal():
    optimizer = keras_adascale.AdaScaleSGD(0.1, gradient_accumulation_steps=2)
    _, update = sample_applier(optimizer, 3)
    update([[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]])  # mean exactly 0
    assert float(optimizer.gradient_sqr_norm) == 0.0 and float(optimizer.gradient_variance) > 0.0
    assert math.isinf(float(optimizer.gradient_noise_scale))


@pytest.fixture
def noisy_optimizer():
    """`AdaScaleSGD` at S = 6 from N = 3 samples after 4 noisy updates."""
    rng = np.random.RandomState(0)
    optimizer = keras_adascale.AdaScaleSGD(0.01, scale=6, gradient_accumulation_steps=3)
    _, update = sample_applier(optimizer, 5)
    signal = rng.randn(5)
    for _ in range(4):
        update([signal + 2 * rng.randn(5) for _ in range(3)])
    return optimizer


def test_predicted_gain_follows_the_formula(noisy_optimizer):
    v, m = float(noisy_optimizer.gradient_variance), float(noisy_optimizer.gradient_sqr_norm)
    for scale in (1, 2.5, 6, 64):
        assert float(noisy_optimizer.predicted_gain(scale)) == pytest.approx((v + m) / (v / scale + m), rel=1e-12)


def test_predicted_gain_at_its_own_scale_is_the_gain(noisy_optimizer):
    assert float(noisy_optimizer.predicted_gain(6)) == pytest.approx(float(noisy_optimizer.gain), rel=1e-6)
    assert 1.5 < float(noisy_optimizer.gain) < 6  # noisy enough for the comparison to mean something


def test_predicted_gain_takes_a_tensor_of_scales(noisy_optimizer):
    np.testing.assert_allclose(noisy_optimizer.predicted_gain(tf.constant([1.0, 6.0])),
                               [1.0, float(noisy_optimizer.gain)], rtol=1e-6)


@pytest.mark.parametrize("scale", [0.5, float("nan"), "2", True])
def test_predicted_gain_refuses_a_bad_scale(scale):
    with pytest.raises(ValueError, match="`scale`"):
        keras_adascale.AdaScaleSGD(0.1).predicted_gain(scale)


# Config round trips, .keras save/load and tf.train.Checkpoint: resuming continues the exact trajectory.


def new_optimizer():
    schedule = keras_adascale.ScaleInvariantSchedule(
        keras.optimizers.schedules.PiecewiseConstantDecay([4], [0.05, 0.01]), total_steps=50
    )
    return keras_adascale.AdaScaleSGD(
        schedule, momentum=0.9, smoothing=0.8, weight_decay=1e-3, gradient_accumulation_steps=SCALE
    )


def saved_state(optimizer):
    return [
        float(optimizer.scale_invariant_iterations),
        float(optimizer.gain),
        float(optimizer.gradient_variance),
        float(optimizer.gradient_sqr_norm),
        int(optimizer.iterations),
    ]


def test_get_config_round_trip():
    optimizer = keras_adascale.AdaScaleSGD(0.3, momentum=0.5, nesterov=True, scale=8, smoothing=0.7,
                                           weight_decay=1e-4, global_clipnorm=2.0)
    config = optimizer.get_config()
    assert keras_adascale.AdaScaleSGD.from_config(config).get_config() == config
    assert config["scale"] == 8 and config["smoothing"] == 0.7 and config["learning_rate"] == pytest.approx(0.3)


def test_get_config_round_trip_keeps_a_float_scale():
    optimizer = keras_adascale.AdaScaleSGD(0.1, scale=6.5, gradient_accumulation_steps=4)
    config = optimizer.get_config()
    restored = keras_adascale.AdaScaleSGD.from_config(config)
    assert config["scale"] == 6.5 and restored.scale == 6.5 and restored.get_config() == config


def test_get_config_round_trip_keeps_non_finite():
    config = keras_adascale.AdaScaleSGD(0.1, non_finite="raise").get_config()
    assert keras_adascale.AdaScaleSGD.from_config(config).non_finite == "raise"


def test_keras_deserialize_restores_the_class_and_schedule():
    optimizer = new_optimizer()
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, keras_adascale.AdaScaleSGD)
    assert isinstance(restored._learning_rate, keras_adascale.ScaleInvariantSchedule)
    assert restored.get_config() == optimizer.get_config()


@pytest.fixture
def uninterrupted(least_squares):
    model = least_squares.model()
    model.compile(optimizer=new_optimizer(), loss="mse")
    fit_accumulated(model, least_squares, SCALE, 6)
    return flat_weights(model), saved_state(model.optimizer)


def test_keras_file_resume_continues_exact_trajectory(least_squares, uninterrupted, tmp_path):
    model = least_squares.model()
    model.compile(optimizer=new_optimizer(), loss="mse")
    fit_accumulated(model, least_squares, SCALE, 3)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.optimizer, keras_adascale.AdaScaleSGD)
    assert saved_state(restored.optimizer) == saved_state(model.optimizer)
    fit_accumulated(restored, least_squares, SCALE, 3, first=3)
    weights, final_state = uninterrupted
    np.testing.assert_array_equal(flat_weights(restored), weights)
    assert saved_state(restored.optimizer) == final_state


def test_checkpoint_resume_continues_exact_trajectory(least_squares, uninterrupted, tmp_path):
    model = least_squares.model()
    model.compile(optimizer=new_optimizer(), loss="mse")
    fit_accumulated(model, least_squares, SCALE, 3)
    prefix = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "ckpt"))

    resumed = least_squares.model()
    resumed.compile(optimizer=new_optimizer(), loss="mse")
    resumed.optimizer.build(resumed.trainable_variables)
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(prefix).assert_consumed()
    fit_accumulated(resumed, least_squares, SCALE, 3, first=3)
    weights, final_state = uninterrupted
    np.testing.assert_array_equal(flat_weights(resumed), weights)
    assert saved_state(resumed.optimizer) == final_state


def test_keras_file_resume_with_scale_apart_from_samples_is_exact(least_squares, tmp_path):
    def fresh():
        model = least_squares.model()
        model.compile(optimizer=keras_adascale.AdaScaleSGD(
            0.03, momentum=0.9, scale=6.5, smoothing=0.8, gradient_accumulation_steps=SCALE), loss="mse")
        return model

    uninterrupted = fresh()
    fit_accumulated(uninterrupted, least_squares, SCALE, 5)
    model = fresh()
    fit_accumulated(model, least_squares, SCALE, 2)
    model.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    assert restored.optimizer.scale == 6.5
    fit_accumulated(restored, least_squares, SCALE, 3, first=2)
    np.testing.assert_array_equal(flat_weights(restored), flat_weights(uninterrupted))
    assert saved_state(restored.optimizer) == saved_state(uninterrupted.optimizer)


def test_checkpoint_resume_at_another_scale_and_sample_count_matches_reference(least_squares, tmp_path):
    options = {"learning_rate": 0.03, "momentum": 0.9, "smoothing": 0.8}
    model = least_squares.model()
    model.compile(optimizer=keras_adascale.AdaScaleSGD(scale=8, gradient_accumulation_steps=4, **options),
                  loss="mse")
    fit_accumulated(model, least_squares, 4, 2)
    prefix = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "ckpt"))

    # Resumed with N = 2 samples and S = 3: tau and the averages (in baseline batches) carry over.
    resumed = least_squares.model()
    resumed.compile(optimizer=keras_adascale.AdaScaleSGD(scale=3, gradient_accumulation_steps=2, **options),
                    loss="mse")
    resumed.optimizer.build(resumed.trainable_variables)
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(prefix).assert_consumed()
    first = 2 * 4 // 2  # the 2 updates of 4 samples done, counted in updates of 2
    actual = fit_accumulated(resumed, least_squares, 2, 3, first=first)

    reference, _ = reference_history(least_squares, 4, 2, scale=8, **options)
    reference.scale = 3
    _, expected = reference_history(least_squares, 2, 3, reference=reference, first=first)
    assert_same_history(actual, expected)


def test_backup_and_restore_resumes_to_the_same_end_as_an_uninterrupted_run(least_squares, tmp_path):
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([5, 10], [0.05, 0.02, 0.01])

    def train(backup_dir, interrupt=None):
        model = least_squares.model()
        optimizer = keras_adascale.AdaScaleSGD(
            keras_adascale.ScaleInvariantSchedule(schedule), momentum=0.9, gradient_accumulation_steps=2)
        model.compile(optimizer=optimizer, loss="mse")
        callbacks = [keras.callbacks.BackupAndRestore(str(backup_dir))] + ([interrupt] if interrupt else [])
        model.fit(least_squares.x[:64], least_squares.y[:64], batch_size=8, epochs=4, shuffle=False,
                  callbacks=callbacks, verbose=0)
        return model, optimizer

    expected_model, expected = train(tmp_path / "uninterrupted")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "preempted", Interrupt(epoch=2, batch=5))
    model, optimizer = train(tmp_path / "preempted")  # the restarted job
    for a, b in zip(model.get_weights(), expected_model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(optimizer.variables, expected.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    assert float(optimizer.scale_invariant_iterations) > 16  # 16 updates, each with gain >= 1


def compiled_with_weights_of(problem, **kwargs):
    """A model compiled with a built `AdaScaleSGD(0.05, gradient_accumulation_steps=2, **kwargs)`."""
    model = problem.model()
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.05, gradient_accumulation_steps=2, **kwargs), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


@pytest.fixture
def saved_weights(least_squares, tmp_path):
    """`(model, path)`: a model trained 2 updates with momentum 0.9, its weights saved at `path`."""
    saved = compiled_with_weights_of(least_squares, momentum=0.9)
    saved.fit(least_squares.x[:32], least_squares.y[:32], batch_size=8, verbose=0)
    path = tmp_path / "saved.weights.h5"
    saved.save_weights(path)
    return saved, path


def test_a_checkpoint_with_other_optimizer_variables_is_refused(least_squares, saved_weights):
    _, path = saved_weights
    # Without momentum slots Keras would skip the optimizer's variables: tau would silently restart.
    with pytest.raises(ValueError, match="checkpoint holds .* optimizer variables and this optimizer has"):
        compiled_with_weights_of(least_squares, momentum=0.0).load_weights(path)


def test_a_matching_checkpoint_restores_tau(least_squares, saved_weights):
    saved, path = saved_weights
    restored = compiled_with_weights_of(least_squares, momentum=0.9)
    restored.load_weights(path)
    assert float(restored.optimizer.scale_invariant_iterations) == float(saved.optimizer.scale_invariant_iterations)


def test_a_truncated_weights_file_fails_loudly_naming_the_truncation(least_squares, saved_weights, tmp_path):
    # h5py refuses the file when it opens it, before Keras or AdaScaleSGD reads a variable: its
    # message is the one a user of `load_weights` sees. The runner's resume says it in its own words.
    _, path = saved_weights
    corrupt = tmp_path / "corrupt.weights.h5"
    corrupt.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(OSError, match="truncated file"):
        compiled_with_weights_of(least_squares, momentum=0.9).load_weights(corrupt)


def test_a_file_with_two_fewer_optimizer_variables_names_version_0_1_0(least_squares, saved_weights, tmp_path):
    """0.1.0 had no S and accumulation-count variables: its files hold 2 fewer, and the error says what to do."""
    import h5py

    _, path = saved_weights
    old = tmp_path / "old.weights.h5"
    old.write_bytes(path.read_bytes())
    with h5py.File(old, "r+") as store:
        group = store["optimizer"]["vars"]
        count = len(group)
        values = [group[str(i)][()] for i in range(count)]
        for i in range(count):
            del group[str(i)]
        for i, value in enumerate(values[:-2]):
            group.create_dataset(str(i), data=value)
    with pytest.raises(ValueError, match=r"saved by keras-adascale 0\.1\.0.*`compile=False`"):
        compiled_with_weights_of(least_squares, momentum=0.9).load_weights(old)


def test_on_a_cpu_only_machine_the_state_step_is_not_xla_compiled(tmp_path):
    # As Keras's jit_compile="auto": no XLA without an accelerator, and so no "Compiled cluster using XLA!" in the
    # log of a run whose model is not compiled with XLA (plain SGD logs none).
    import os
    import subprocess
    import sys

    script = tmp_path / "fit.py"
    script.write_text(
        "import keras, numpy as np, keras_adascale\n"
        "model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])\n"
        "model.compile(optimizer=keras_adascale.AdaScaleSGD(0.1, gradient_accumulation_steps=2), loss='mse')\n"
        "model.fit(np.ones((16, 3), 'float32'), np.ones((16, 1), 'float32'), batch_size=4, verbose=0)\n"
        "print('updates', int(model.optimizer.iterations.numpy()))\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "updates 2" in result.stdout
    assert "Compiled cluster using XLA" not in result.stderr


def test_one_sample_per_update_warns_once_saying_how_to_get_several(least_squares):
    model = least_squares.model()
    with pytest.warns(UserWarning, match="scale S = 1") as warned:
        model.compile(optimizer=keras_adascale.AdaScaleSGD(0.05), loss="mse")
        model.fit(least_squares.x[:32], least_squares.y[:32], batch_size=8, verbose=0)
    (message,) = [str(w.message) for w in warned if "scale S = 1" in str(w.message)]
    assert "cannot measure the gradient noise" in message
    assert "tf.distribute strategy with several replicas" in message and "gradient_accumulation_steps=k" in message
