"""The gradient noise scale and the predicted gain (McCandlish et al., 2018) from AdaScale's statistics."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adascale
from conftest import LeastSquares


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


def one_update(optimizer, variable, gradients):
    for gradient in gradients:
        optimizer.apply_gradients([(tf.constant(gradient, tf.float32), variable)])


def test_noise_scale_is_zero_before_any_update_and_infinite_without_signal():
    optimizer = keras_adascale.AdaScaleSGD(0.1, gradient_accumulation_steps=2)
    variable = keras.Variable(np.zeros(3, np.float32))
    optimizer.build([variable])
    assert float(optimizer.gradient_noise_scale) == 0.0
    one_update(optimizer, variable, [[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]])  # mean exactly 0
    assert float(optimizer.gradient_sqr_norm) == 0.0 and float(optimizer.gradient_variance) > 0.0
    assert math.isinf(float(optimizer.gradient_noise_scale))


def test_predicted_gain_follows_the_formula_and_equals_the_gain_at_its_own_scale():
    rng = np.random.RandomState(0)
    optimizer = keras_adascale.AdaScaleSGD(0.01, scale=6, gradient_accumulation_steps=3)
    variable = keras.Variable(np.zeros(5, np.float32))
    optimizer.build([variable])
    signal = rng.randn(5)
    for _ in range(4):
        one_update(optimizer, variable, [signal + 2 * rng.randn(5) for _ in range(3)])
    v, m = float(optimizer.gradient_variance), float(optimizer.gradient_sqr_norm)
    for scale in (1, 2.5, 6, 64):
        assert float(optimizer.predicted_gain(scale)) == pytest.approx((v + m) / (v / scale + m), rel=1e-12)
    assert float(optimizer.predicted_gain(6)) == pytest.approx(float(optimizer.gain), rel=1e-6)
    assert 1.5 < float(optimizer.gain) < 6  # noisy enough for the comparison to mean something
    np.testing.assert_allclose(optimizer.predicted_gain(tf.constant([1.0, 6.0])), [1.0, float(optimizer.gain)],
                               rtol=1e-6)


@pytest.mark.parametrize("scale", [0.5, float("nan"), "2", True])
def test_predicted_gain_refuses_a_bad_scale(scale):
    with pytest.raises(ValueError, match="`scale`"):
        keras_adascale.AdaScaleSGD(0.1).predicted_gain(scale)
