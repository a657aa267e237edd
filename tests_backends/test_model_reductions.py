"""`AdaScaleModel`'s step against Keras's own under `DataParallel` on JAX (issue 38, items 2, 3 and 5).

Its loss, metrics and applied gradient are the global batch's for every reduction, with sample weights and
masks; its dropout streams are independent across replicas and layers; a distribution that is gone is named.
"""

import keras
import numpy as np
import pytest

import keras_adascale
from conftest import BACKEND

REPLICAS = 4
ROWS = 16


@pytest.fixture
def data_parallel():
    if BACKEND != "jax":
        pytest.skip("keras.distribution on JAX")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices("cpu")))
    yield
    keras.distribution.set_distribution(None)


def dense_model(cls, seed=0):
    inputs = keras.Input((5,))
    outputs = keras.layers.Dense(2, kernel_initializer=keras.initializers.GlorotUniform(seed),
                                 bias_initializer="ones")(inputs)
    return cls(inputs, outputs)


def masked_sequence_model(cls):
    # Token 0 is padding: Embedding(mask_zero=True) masks it, and the loss and metrics skip those steps.
    inputs = keras.Input((6,), dtype="int32")
    embedded = keras.layers.Embedding(10, 3, mask_zero=True,
                                      embeddings_initializer=keras.initializers.RandomNormal(seed=1))(inputs)
    outputs = keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(2))(embedded)
    return cls(inputs, outputs)


def one_step(model, optimizer, x, y, sample_weight, reduction):
    """`(logs, gradient)` of one step on the 16 rows: the gradient from the weights' change over the rate."""
    model.compile(optimizer=optimizer, loss=keras.losses.MeanSquaredError(reduction=reduction), metrics=["mae"])
    before = [np.asarray(w) for w in model.get_weights()]
    history = model.fit(x, y, sample_weight=sample_weight, batch_size=ROWS, shuffle=False, epochs=1)
    rate = optimizer.snapshot()["effective_learning_rate"] if hasattr(optimizer, "snapshot") else 1.0
    gradient = np.concatenate([((b - np.asarray(a)) / rate).ravel() for a, b in zip(model.get_weights(), before, strict=True)])
    return {key: values[0] for key, values in history.history.items()}, gradient


CASES = {
    "dense": (dense_model, lambda rng: rng.normal(size=(ROWS, 5)).astype("float32"),
              lambda rng: rng.normal(size=(ROWS, 2)).astype("float32")),
    # Valid steps differ across the replicas' rows: 6, 1, 3 and 5 per row in the four replicas' blocks.
    "masked": (masked_sequence_model,
               lambda rng: (rng.integers(1, 10, size=(ROWS, 6))
                            * (np.arange(6)[None, :] < np.repeat([6, 1, 3, 5], 4)[:, None])).astype("int32"),
               lambda rng: rng.normal(size=(ROWS, 6, 1)).astype("float32")),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "mean_with_sample_weight", "sum"])
@pytest.mark.parametrize("weighted", [True, False], ids=["sample_weight", "no_weight"])
def test_loss_metrics_and_gradient_equal_keras_own_step(data_parallel, case, reduction, weighted):
    build, make_x, make_y = CASES[case]
    rng = np.random.default_rng(7)
    x, y = make_x(rng), make_y(rng)
    # Weights in [0.1, 3], larger on the later replicas' rows: each replica's weighted mean differs. A sequence
    # takes a weight per step (Keras's metrics fail on a mask with one weight per row: shapes (16, 6), (16,)).
    weights = np.linspace(0.1, 3.0, y.shape[0] * (y.shape[1] if y.ndim == 3 else 1), dtype="float32")
    weights = weights.reshape(y.shape[:2] if y.ndim == 3 else (-1,)) if weighted else None
    keras.utils.set_random_seed(3)
    keras_logs, keras_gradient = one_step(build(keras.Model), keras.optimizers.SGD(1.0), x, y, weights, reduction)
    keras.utils.set_random_seed(3)
    logs, gradient = one_step(build(keras_adascale.AdaScaleModel), keras_adascale.AdaScaleSGD(1.0), x, y, weights,
                              reduction)
    for key in ("loss", "mae"):
        np.testing.assert_allclose(logs[key], keras_logs[key], rtol=2e-6, err_msg=key)
    np.testing.assert_allclose(gradient, keras_gradient, rtol=2e-4, atol=1e-6)
    assert np.abs(keras_gradient).max() > 1e-3


def test_two_dropout_layers_seeded_s_and_s_plus_1_draw_independent_masks_on_every_replica(data_parallel):
    # Every row is the same, so a row's output shows the masks its replica drew. With the seed offset by the
    # replica's index, replica 1's mask of the layer seeded 5 was replica 0's mask of the layer seeded 6.
    width = 64

    class Kept(keras.metrics.Metric):
        """The last batch's outputs, to read the masks after fit."""

        def __init__(self):
            super().__init__(name="kept")
            self.kept = self.add_variable(shape=(REPLICAS * ROWS, 2 * width + 1), initializer="zeros", name="kept")

        def update_state(self, y_true, y_pred, sample_weight=None):
            self.kept.assign(y_pred)

        def result(self):
            return keras.ops.mean(self.kept)

    inputs = keras.Input((width,))
    outputs = keras.layers.Concatenate()([keras.layers.Dropout(0.5, seed=5)(inputs),
                                          keras.layers.Dropout(0.5, seed=6)(inputs), keras.layers.Dense(1)(inputs)])
    model = keras_adascale.AdaScaleModel(inputs, outputs)
    kept = Kept()
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.0), loss="mse", metrics=[kept])
    model.fit(np.ones((REPLICAS * ROWS, width), "float32"), np.zeros((REPLICAS * ROWS, 2 * width + 1), "float32"),
              batch_size=REPLICAS * ROWS, epochs=1)
    kept_mask = np.asarray(kept.kept.numpy())[:, :2 * width] != 0
    masks = kept_mask.reshape(REPLICAS, ROWS, 2, width)  # [replica, row, layer, unit]
    draws = [masks[r, :, layer] for r in range(REPLICAS) for layer in range(2)]
    for i, first in enumerate(draws):
        assert 0.4 < first.mean() < 0.6  # rate 0.5
        for second in draws[i + 1:]:
            assert 0.35 < (first == second).mean() < 0.65  # independent: agree about half the time


def test_training_after_the_distribution_is_gone_says_so(data_parallel):
    model = dense_model(keras_adascale.AdaScaleModel)
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.1), loss="mse")
    x, y = np.ones((ROWS, 5), "float32"), np.ones((ROWS, 2), "float32")
    model.fit(x, y, batch_size=ROWS, epochs=1)
    keras.distribution.set_distribution(None)
    with pytest.raises(ValueError, match=r"made under a distribution with 4 devices.*keras.distribution has none now"):
        model.fit(x, y, batch_size=ROWS, epochs=1)
