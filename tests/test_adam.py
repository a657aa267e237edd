"""AdaScaleAdam (keras_adascale/adam.py) against keras.optimizers.Adam at S = 1 and the NumPy reference at S > 1."""

import warnings

import keras
import numpy as np
import pytest

import keras_adascale
from conftest import (BATCH, Recorder, assert_same_history, flat_weights, mirrored, reference_history,
                      sample_applier)
from reference import AdaScaleAdamReference, piecewise_constant

SCALE = 4


def fit(problem, optimizer, updates, samples, run_eagerly=False, first=0):
    model = problem.model()
    model.compile(optimizer=optimizer, loss="mse", run_eagerly=run_eagerly)
    callbacks = []
    if isinstance(optimizer, keras_adascale.AdaScaleAdam):
        callbacks.append(Recorder(every=optimizer.gradient_accumulation_steps or 1))
    start, stop = first * samples * BATCH, (first + updates) * samples * BATCH
    model.fit(problem.x[start:stop], problem.y[start:stop], batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=callbacks)
    return model, callbacks[0].history if callbacks else None


def adam_reference(problem, samples, updates, scale=None, **kwargs):
    reference = AdaScaleAdamReference(problem.initial, scale=scale or samples, **kwargs)
    return reference_history(problem, samples, updates, reference=reference)


def keras_adam_weights(problem, run_eagerly, **kwargs):
    model, _ = fit(problem, keras.optimizers.Adam(**kwargs), 12, 1, run_eagerly=run_eagerly)
    return flat_weights(model)


def adascale_adam_at_scale_one(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "S = 1 ... behaves as plain Adam"
        return keras_adascale.AdaScaleAdam(scale=1, **kwargs)


ADAM_OPTIONS = [
    {"learning_rate": 0.05},
    {"learning_rate": 0.05, "weight_decay": 0.1},
    {"learning_rate": 0.05, "amsgrad": True, "beta_1": 0.5, "epsilon": 1e-3},
]
ADAM_IDS = ["adam", "adamw", "amsgrad"]


@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=ADAM_IDS)
def test_at_scale_one_it_is_keras_adam_to_the_last_bit(least_squares, options):
    expected = keras_adam_weights(least_squares, run_eagerly=True, **options)
    model, _ = fit(least_squares, adascale_adam_at_scale_one(**options), 12, 1, run_eagerly=True)
    np.testing.assert_array_equal(flat_weights(model), expected)


def test_at_scale_one_in_a_graph_it_is_keras_adam_within_float32_rounding(least_squares):
    # TensorFlow's graph optimizer may round `w - w * wd * lr` differently in two graphs (1 ulp seen).
    options = {"learning_rate": 0.05, "weight_decay": 0.1}
    expected = keras_adam_weights(least_squares, run_eagerly=False, **options)
    model, _ = fit(least_squares, adascale_adam_at_scale_one(**options), 12, 1)
    np.testing.assert_allclose(flat_weights(model), expected, rtol=1e-6, atol=1e-7)
    assert not np.allclose(flat_weights(model), least_squares.initial)


@pytest.mark.parametrize(
    "options",
    [
        {"learning_rate": 0.05},
        {"learning_rate": 0.05, "statistics": "preconditioned"},
        {"learning_rate": 0.05, "weight_decay": 0.1, "smoothing": 0.5},
        # r (1 - beta_1) passes 1: the first moment is the mean gradient, its decay factor 0.
        {"learning_rate": 0.05, "beta_1": 0.5, "beta_2": 0.9, "amsgrad": True, "statistics": "preconditioned"},
    ],
    ids=["raw", "preconditioned", "adamw", "clipped_betas_amsgrad"],
)
def test_accumulation_matches_the_reference_update_by_update(least_squares, options):
    _, expected = adam_reference(least_squares, SCALE, 6, **options)
    optimizer = keras_adascale.AdaScaleAdam(gradient_accumulation_steps=SCALE, **options)
    _, actual = fit(least_squares, optimizer, 6, SCALE)
    assert_same_history(actual, expected)
    assert 1.0 < expected[-1][1] < SCALE  # the problem is noisy enough to test the gain
    assert float(optimizer.effective_learning_rate) == pytest.approx(
        np.sqrt(expected[-1][1]) * options["learning_rate"], rel=1e-5
    )


def test_the_two_statistics_give_different_gains(least_squares):
    _, raw = adam_reference(least_squares, SCALE, 6, learning_rate=0.05)
    _, preconditioned = adam_reference(least_squares, SCALE, 6, learning_rate=0.05, statistics="preconditioned")
    assert abs(raw[-1][1] - preconditioned[-1][1]) > 0.01


def test_scale_apart_from_samples_matches_the_reference(least_squares):
    _, expected = adam_reference(least_squares, SCALE, 5, scale=8, learning_rate=0.05)
    optimizer = keras_adascale.AdaScaleAdam(0.05, scale=8, gradient_accumulation_steps=SCALE)
    _, actual = fit(least_squares, optimizer, 5, SCALE)
    assert_same_history(actual, expected)
    assert optimizer.scale == 8 and optimizer.samples_per_update == SCALE


def test_the_schedule_is_keyed_on_tau(least_squares):
    boundaries, values = [3, 7], [0.05, 0.02, 0.01]
    _, expected = adam_reference(least_squares, SCALE, 6, learning_rate=piecewise_constant(boundaries, values))
    assert expected[0][2] < boundaries[0] and expected[-2][2] > boundaries[1]  # both boundaries crossed
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    optimizer = keras_adascale.AdaScaleAdam(
        keras_adascale.ScaleInvariantSchedule(schedule), gradient_accumulation_steps=SCALE
    )
    _, actual = fit(least_squares, optimizer, 6, SCALE)
    assert_same_history(actual, expected)


@pytest.mark.parametrize("statistics", ["raw", "preconditioned"])
def test_four_mirrored_replicas_match_the_reference_update_by_update(least_squares, statistics):
    _, expected = adam_reference(least_squares, 4, 5, learning_rate=0.05, weight_decay=0.1, statistics=statistics)
    strategy = mirrored(4)
    with strategy.scope():
        model = least_squares.model()
        model.compile(
            optimizer=keras_adascale.AdaScaleAdam(0.05, weight_decay=0.1, statistics=statistics), loss="mse"
        )
    count = 5 * 4 * BATCH
    recorder = Recorder()
    model.fit(least_squares.x[:count], least_squares.y[:count], batch_size=4 * BATCH, shuffle=False,
              verbose=0, callbacks=[recorder])
    assert model.optimizer.scale == 4
    assert_same_history(recorder.history, expected)


def test_get_config_round_trip():
    optimizer = keras_adascale.AdaScaleAdam(0.3, beta_1=0.8, beta_2=0.99, epsilon=1e-6, amsgrad=True,
                                            statistics="preconditioned", scale=6.5, smoothing=0.7,
                                            weight_decay=1e-4, global_clipnorm=2.0)
    config = optimizer.get_config()
    assert keras_adascale.AdaScaleAdam.from_config(config).get_config() == config
    assert config["statistics"] == "preconditioned" and config["scale"] == 6.5 and config["beta_2"] == 0.99


def test_keras_deserialize_restores_the_class():
    optimizer = keras_adascale.AdaScaleAdam(scale=8, statistics="preconditioned")
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, keras_adascale.AdaScaleAdam)
    assert restored.get_config() == optimizer.get_config()


def test_default_names_are_unique():
    first, second = keras_adascale.AdaScaleAdam(), keras_adascale.AdaScaleAdam()
    assert first.name != second.name and first.name.startswith("adascale_adam")


def test_keras_file_resume_continues_the_exact_trajectory(least_squares, tmp_path):
    def optimizer():
        return keras_adascale.AdaScaleAdam(0.05, weight_decay=0.1, statistics="preconditioned",
                                           gradient_accumulation_steps=SCALE)

    uninterrupted, _ = fit(least_squares, optimizer(), 6, SCALE)
    first, _ = fit(least_squares, optimizer(), 3, SCALE)
    path = tmp_path / "model.keras"
    first.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.optimizer, keras_adascale.AdaScaleAdam)
    start, stop = 3 * SCALE * BATCH, 6 * SCALE * BATCH
    restored.fit(least_squares.x[start:stop], least_squares.y[start:stop], batch_size=BATCH, shuffle=False,
                 verbose=0)
    np.testing.assert_array_equal(flat_weights(restored), flat_weights(uninterrupted))
    for name in ("scale_invariant_iterations", "gain", "gradient_variance"):
        assert float(getattr(restored.optimizer, name)) == float(getattr(uninterrupted.optimizer, name))
    np.testing.assert_array_equal(restored.optimizer._moment_ages.numpy(),
                                  uninterrupted.optimizer._moment_ages.numpy())


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"beta_1": 1.0}, "`beta_1` must be a float in [0, 1)"),
        ({"beta_2": -0.1}, "`beta_2` must be a float in [0, 1)"),
        ({"beta_1": "0.9"}, "`beta_1`"),
        ({"epsilon": -1e-7}, "`epsilon` must be a float >= 0"),
        ({"amsgrad": "yes"}, "`amsgrad` must be a bool"),
        ({"statistics": "adaptdl"}, "`statistics` must be one of ('raw', 'preconditioned')"),
        ({"scale": 0.5}, "`scale` must be a finite number >= 1"),
        ({"smoothing": 1.0}, "`smoothing` must be a float in [0, 1)"),
        ({"non_finite": "ignore"}, "`non_finite` must be 'skip' or 'raise'"),
        ({"learning_rate": "fast"}, "`learning_rate` must be a float"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(arguments, message):
    with pytest.raises(ValueError) as error:
        keras_adascale.AdaScaleAdam(**arguments)
    assert message in str(error.value)


def test_an_update_with_a_nan_is_skipped_and_training_goes_on():
    optimizer = keras_adascale.AdaScaleAdam(0.1, gradient_accumulation_steps=SCALE, statistics="preconditioned")
    variable, update = sample_applier(optimizer, 4)
    reference = AdaScaleAdamReference(np.zeros(4), 0.1, scale=SCALE, statistics="preconditioned")
    rng = np.random.default_rng(0)
    batches = [rng.normal(1.0, 0.5, size=(SCALE, 4)) for _ in range(3)]

    def state():
        counters = ("iteration", "adascale_counters", "adascale_accumulation")
        kept = [v for v in optimizer.variables if v.name not in counters]
        tau = float(optimizer.scale_invariant_iterations)
        return [v.numpy().tolist() for v in kept] + [variable.numpy().tolist(), tau]

    update(batches[0])
    reference.step(batches[0])
    before = state()
    poisoned = batches[1].copy()
    poisoned[2, 1] = np.nan
    update(poisoned)
    assert state() == before  # weights, both moments, their ages, tau and the averages
    assert int(optimizer.skipped_updates) == 1
    update(batches[2])
    reference.step(batches[2])
    np.testing.assert_allclose(variable.numpy(), reference.params, rtol=1e-5, atol=1e-7)
    assert float(optimizer.scale_invariant_iterations) == pytest.approx(reference.tau, rel=1e-6)
