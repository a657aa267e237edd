"""`AdaScaleModel.fit` under `DataParallel` refuses batches its devices cannot split, before training (issue 39)."""

import keras
import numpy as np
import pytest

import keras_adascale
from conftest import BACKEND


@pytest.fixture
def model():
    if BACKEND != "jax":
        pytest.skip("keras.distribution on JAX")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices("cpu")))
    inputs = keras.Input((3,))
    model = keras_adascale.AdaScaleModel(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.1), loss="mse")
    yield model
    keras.distribution.set_distribution(None)


def data(rows):
    rng = np.random.default_rng(0)
    return rng.normal(size=(rows, 3)).astype("float32"), rng.normal(size=(rows, 1)).astype("float32")


def test_a_last_batch_the_devices_cannot_split_is_refused_before_training(model):
    before = [np.asarray(w) for w in model.get_weights()]
    with pytest.raises(ValueError, match=r"over the 4 devices.*4,001 rows in batches of 32 leave a last batch of 1.*"
                                         r"drop or pad the last 1 rows \(the first 4,000\)"):
        model.fit(*data(4001), batch_size=32)
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)  # nothing trained
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0


def test_a_batch_size_the_devices_cannot_split_is_refused_naming_one_that_can(model):
    with pytest.raises(ValueError, match=r"the batch size 30 does not divide by them.*\(28, say\)"):
        model.fit(*data(120), batch_size=30)
    # 103 rows, a tenth for validation: 92 to train (batches of 32, 32 and 28), 11 to validate.
    with pytest.raises(ValueError, match="the validation split's 11 rows in batches of 32 leave a last batch of 11"):
        model.fit(*data(103), batch_size=32, validation_split=0.1)


def test_batches_that_split_train(model):
    history = model.fit(*data(128), batch_size=32, validation_data=data(64))
    assert len(history.history["loss"]) == 1 and "val_loss" in history.history
