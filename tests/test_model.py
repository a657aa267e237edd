"""AdaScaleModel on TensorFlow: Keras's own train step (tf.distribute already gives the optimizer each replica's
gradient), so the same model code runs on every backend. Its JAX train step is tested in tests_backends/."""

import keras
import tensorflow as tf

import keras_adascale
from conftest import BATCH, Recorder, assert_same_history, mirrored, reference_history


def adascale_model(problem):
    inputs = keras.Input((problem.dim,))
    model = keras_adascale.AdaScaleModel(inputs, keras.layers.Dense(1)(inputs))
    model.set_weights([problem.initial[:-1].reshape(-1, 1), problem.initial[-1:]])
    return model


def test_under_mirrored_strategy_it_matches_the_reference_and_loads_as_itself(least_squares, tmp_path):
    _, expected = reference_history(least_squares, 4, 5, learning_rate=0.05, momentum=0.9)
    with mirrored(4).scope():
        model = adascale_model(least_squares)
        model.compile(optimizer=keras_adascale.AdaScaleSGD(0.05, momentum=0.9), loss="mse")
    rows = 5 * 4 * BATCH
    dataset = tf.data.Dataset.from_tensor_slices((least_squares.x[:rows], least_squares.y[:rows])).batch(4 * BATCH)
    recorder = Recorder()
    model.fit(dataset, callbacks=[recorder], verbose=0)
    assert_same_history(recorder.history, expected)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert type(loaded) is keras_adascale.AdaScaleModel and type(loaded.optimizer) is keras_adascale.AdaScaleSGD


def test_a_sequential_one_is_a_keras_sequential():
    model = keras_adascale.AdaScaleSequential([keras.Input((3,)), keras.layers.Dense(1)])
    assert isinstance(model, keras.Sequential) and model.count_params() == 4
