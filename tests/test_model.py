"""AdaScaleModel on TensorFlow: Keras's own train step (tf.distribute already gives the optimizer each replica's
gradient), so the same model code runs on every backend. Its JAX train step is tested in tests_backends/."""

import keras
import pytest
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
    assert isinstance(loaded, keras_adascale.AdaScaleModel) and type(loaded.optimizer) is keras_adascale.AdaScaleSGD


def test_a_sequential_one_is_a_keras_sequential():
    model = keras_adascale.AdaScaleSequential([keras.Input((3,)), keras.layers.Dense(1)])
    assert isinstance(model, keras.Sequential) and model.count_params() == 4


def test_a_functional_one_leaves_the_class_subclassable():
    # Keras would rewrite the class's bases for good on the first functional call (inject_functional_model_class).
    inputs = keras.Input((3,))
    functional = keras_adascale.AdaScaleModel(inputs, keras.layers.Dense(1)(inputs))
    assert isinstance(functional, keras_adascale.AdaScaleModel)

    class Subclassed(keras_adascale.AdaScaleModel):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    assert Subclassed()(tf.ones((2, 3))).shape == (2, 1)
    assert keras.Model in keras_adascale.AdaScaleModel.__bases__


def test_a_subclass_called_with_inputs_and_outputs_says_how_to_build_it():
    class Subclassed(keras_adascale.AdaScaleModel):
        pass

    inputs = keras.Input((3,))
    with pytest.raises(TypeError, match="build it by defining `call`"):
        Subclassed(inputs, keras.layers.Dense(1)(inputs))
    assert keras.Model in keras_adascale.AdaScaleModel.__bases__
