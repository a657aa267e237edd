"""Config round trips, .keras save/load and tf.train.Checkpoint: resuming continues the exact trajectory."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adascale
from conftest import BATCH, Recorder, assert_same_history, flat_weights, reference_history

SCALE = 4


def new_optimizer():
    schedule = keras_adascale.ScaleInvariantSchedule(
        keras.optimizers.schedules.PiecewiseConstantDecay([4], [0.05, 0.01]), total_steps=50
    )
    return keras_adascale.AdaScaleSGD(
        schedule, momentum=0.9, smoothing=0.8, weight_decay=1e-3, gradient_accumulation_steps=SCALE
    )


def fit_updates(model, problem, first, count):
    start, stop = first * SCALE * BATCH, (first + count) * SCALE * BATCH
    model.fit(problem.x[start:stop], problem.y[start:stop], batch_size=BATCH, shuffle=False, verbose=0)


def state(optimizer):
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
    fit_updates(model, least_squares, 0, 6)
    return flat_weights(model), state(model.optimizer)


def test_keras_file_resume_continues_exact_trajectory(least_squares, uninterrupted, tmp_path):
    model = least_squares.model()
    model.compile(optimizer=new_optimizer(), loss="mse")
    fit_updates(model, least_squares, 0, 3)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.optimizer, keras_adascale.AdaScaleSGD)
    assert state(restored.optimizer) == state(model.optimizer)
    fit_updates(restored, least_squares, 3, 3)
    weights, final_state = uninterrupted
    np.testing.assert_array_equal(flat_weights(restored), weights)
    assert state(restored.optimizer) == final_state


def test_checkpoint_resume_continues_exact_trajectory(least_squares, uninterrupted, tmp_path):
    model = least_squares.model()
    model.compile(optimizer=new_optimizer(), loss="mse")
    fit_updates(model, least_squares, 0, 3)
    prefix = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "ckpt"))

    resumed = least_squares.model()
    resumed.compile(optimizer=new_optimizer(), loss="mse")
    resumed.optimizer.build(resumed.trainable_variables)
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(prefix).assert_consumed()
    fit_updates(resumed, least_squares, 3, 3)
    weights, final_state = uninterrupted
    np.testing.assert_array_equal(flat_weights(resumed), weights)
    assert state(resumed.optimizer) == final_state


def test_get_config_round_trip_keeps_a_float_scale():
    optimizer = keras_adascale.AdaScaleSGD(0.1, scale=6.5, gradient_accumulation_steps=4)
    config = optimizer.get_config()
    restored = keras_adascale.AdaScaleSGD.from_config(config)
    assert config["scale"] == 6.5 and restored.scale == 6.5 and restored.get_config() == config


def fit_accumulated(model, problem, samples, first_row, updates):
    stop = first_row + updates * samples * BATCH
    recorder = Recorder(every=samples)
    model.fit(problem.x[first_row:stop], problem.y[first_row:stop], batch_size=BATCH, shuffle=False,
              callbacks=[recorder], verbose=0)
    return recorder.history


def test_keras_file_resume_with_scale_apart_from_samples_is_exact(least_squares, tmp_path):
    def fresh():
        model = least_squares.model()
        model.compile(optimizer=keras_adascale.AdaScaleSGD(
            0.03, momentum=0.9, scale=6.5, smoothing=0.8, gradient_accumulation_steps=SCALE), loss="mse")
        return model

    uninterrupted = fresh()
    fit_accumulated(uninterrupted, least_squares, SCALE, 0, 5)
    model = fresh()
    fit_accumulated(model, least_squares, SCALE, 0, 2)
    model.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    assert restored.optimizer.scale == 6.5
    fit_accumulated(restored, least_squares, SCALE, 2 * SCALE * BATCH, 3)
    np.testing.assert_array_equal(flat_weights(restored), flat_weights(uninterrupted))
    assert state(restored.optimizer) == state(uninterrupted.optimizer)


def test_checkpoint_resume_at_another_scale_and_sample_count_matches_reference(least_squares, tmp_path):
    options = {"learning_rate": 0.03, "momentum": 0.9, "smoothing": 0.8}
    model = least_squares.model()
    model.compile(optimizer=keras_adascale.AdaScaleSGD(scale=8, gradient_accumulation_steps=4, **options),
                  loss="mse")
    fit_accumulated(model, least_squares, 4, 0, 2)
    prefix = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "ckpt"))

    # Resumed with N = 2 samples and S = 3: tau and the averages (in baseline batches) carry over.
    resumed = least_squares.model()
    resumed.compile(optimizer=keras_adascale.AdaScaleSGD(scale=3, gradient_accumulation_steps=2, **options),
                    loss="mse")
    resumed.optimizer.build(resumed.trainable_variables)
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(prefix).assert_consumed()
    actual = fit_accumulated(resumed, least_squares, 2, 2 * 4 * BATCH, 3)

    reference, _ = reference_history(least_squares, 4, 2, scale=8, **options)
    reference.scale = 3
    _, expected = reference_history(least_squares, 2, 3, reference=reference, first=2 * 4 // 2)
    assert_same_history(actual, expected)
