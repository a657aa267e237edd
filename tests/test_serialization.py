"""Config round trips, .keras save/load and tf.train.Checkpoint: resuming continues the exact trajectory."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adascale
from conftest import flat_weights

BATCH, SCALE = 8, 4


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
