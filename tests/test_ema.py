"""`use_ema=True` on TensorFlow: Keras's EMA of the weights over AdaScale's updates, against the reference (the JAX and
PyTorch side is in tests_backends/test_optimizers.py)."""

import numpy as np
import pytest

import keras_adascale
from conftest import BATCH, flat_weights
from problems import ema_reference


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("overwrite", [None, 2])
def test_use_ema_averages_the_weights_as_keras_does_and_matches_the_reference(least_squares, steps, overwrite):
    # Before 0.4.0 the average read the update count after the update (one update late), and
    # `ema_overwrite_frequency` failed in the accumulating step ("Lengths of branch outputs of cond must match").
    updates = 6
    options = {"learning_rate": 0.05, "momentum": 0.9}
    accumulation = {"gradient_accumulation_steps": steps} if steps > 1 else {"scale": 1}
    optimizer = keras_adascale.AdaScaleSGD(use_ema=True, ema_momentum=0.8, ema_overwrite_frequency=overwrite,
                                           **accumulation, **options)
    model = least_squares.model()
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(least_squares.x[:steps * updates * BATCH], least_squares.y[:steps * updates * BATCH], batch_size=BATCH,
              shuffle=False, verbose=0)
    reference, average = ema_reference(least_squares, steps, updates, 0.8, overwrite, **options)
    np.testing.assert_allclose(flat_weights(model), average, rtol=2e-5, atol=1e-6)
    assert float(optimizer.scale_invariant_iterations) == pytest.approx(reference.tau, rel=1e-5)
