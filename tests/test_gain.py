"""The pure gain math against NumPy and its limits."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_adascale import gain
from reference import gain_statistics


def run_update_gain(samples_sequence, scale, smoothing):
    state = [tf.constant(0.0), tf.constant(0.0), tf.constant(0.0)]
    gains = []
    for samples in samples_sequence:
        samples = np.asarray(samples, np.float64)
        mean = samples.mean(axis=0)
        *state, value = gain.update_gain(
            tf.constant(np.sum(samples**2), tf.float32),
            tf.constant(mean @ mean, tf.float32),
            tf.constant(float(len(samples))),
            tf.constant(float(scale)),
            tf.constant(smoothing, tf.float32),
            *state,
        )
        gains.append(float(value))
    return gains


def numpy_gains(samples_sequence, scale, smoothing):
    variance_ema = sqr_norm_ema = 0.0
    gains = []
    for t, samples in enumerate(samples_sequence, start=1):
        sigma2, mu2 = gain_statistics(samples, scale)
        variance_ema = smoothing * variance_ema + (1 - smoothing) * sigma2
        sqr_norm_ema = smoothing * sqr_norm_ema + (1 - smoothing) * mu2
        v, m = variance_ema / (1 - smoothing**t), sqr_norm_ema / (1 - smoothing**t)
        gains.append((v + m) / (v / scale + m) if v + m > 0 else 1.0)
    return gains


@pytest.mark.parametrize("scale, smoothing", [(2, 0.0), (4, 0.9), (16, 0.984), (32, 0.5)])
def test_update_gain_matches_numpy_over_a_sequence(scale, smoothing):
    rng = np.random.RandomState(scale)
    sequence = [rng.randn(scale, 7) * rng.uniform(0.1, 3) + rng.randn(7) for _ in range(12)]
    np.testing.assert_allclose(
        run_update_gain(sequence, scale, smoothing), numpy_gains(sequence, scale, smoothing), rtol=1e-5
    )


def test_gain_is_one_for_identical_samples():
    samples = [np.tile(np.array([1.0, -2.0, 0.5]), (8, 1))] * 3
    assert run_update_gain(samples, 8, 0.9) == pytest.approx([1.0] * 3, abs=1e-5)


def test_gain_tends_to_scale_for_pure_noise():
    rng = np.random.RandomState(0)
    sequence = []
    for _ in range(30):
        half = rng.randn(4, 50)
        sequence.append(np.concatenate([half, -half]))  # mean exactly 0
    assert run_update_gain(sequence, 8, 0.9)[-1] == pytest.approx(8.0, rel=1e-5)


def test_gain_is_one_for_zero_gradients_and_for_scale_one():
    assert run_update_gain([np.zeros((4, 3))] * 2, 4, 0.5) == [1.0, 1.0]
    rng = np.random.RandomState(1)
    assert run_update_gain([rng.randn(1, 5) for _ in range(3)], 1, 0.5) == [1.0] * 3


def test_gradient_moments_are_clipped_at_zero():
    four = tf.constant(4.0)
    variance, sqr_norm = gain.gradient_moments(tf.constant(1.0), tf.constant(2.0), four, four)
    assert float(variance) == 0.0 and float(sqr_norm) > 0.0
    variance, sqr_norm = gain.gradient_moments(tf.constant(100.0), tf.constant(0.0), four, four)
    assert float(variance) == pytest.approx(100.0 / 3) and float(sqr_norm) == 0.0


@pytest.mark.parametrize("samples, scale", [(4, 8), (4, 6.5), (8, 2), (2, 16), (3, 1.5)])
def test_update_gain_matches_numpy_when_scale_differs_from_samples(samples, scale):
    rng = np.random.RandomState(samples)
    sequence = [rng.randn(samples, 7) * rng.uniform(0.1, 3) + rng.randn(7) for _ in range(12)]
    gains = run_update_gain(sequence, scale, 0.5)
    np.testing.assert_allclose(gains, numpy_gains(sequence, scale, 0.5), rtol=1e-5)
    assert all(1.0 <= g <= scale * (1 + 1e-6) for g in gains)


def test_baseline_batch_variance_is_the_sample_variance_times_batches_per_sample():
    # Two samples, each two baseline batches (S = 4, N = 2): sample variance 2 -> sigma2 4.
    variance, sqr_norm = gain.gradient_moments(
        tf.constant(1.0**2 + 3.0**2, tf.float64), tf.constant(2.0**2, tf.float64),
        tf.constant(2.0, tf.float64), tf.constant(4.0, tf.float64),
    )
    assert float(variance) == pytest.approx(4.0) and float(sqr_norm) == pytest.approx(4.0 - 2.0 / 2)


@settings(max_examples=40, deadline=None)
@given(
    scale=st.integers(min_value=2, max_value=64),
    dim=st.integers(min_value=1, max_value=20),
    magnitude=st.floats(min_value=1e-6, max_value=1e6),
    smoothing=st.floats(min_value=0.0, max_value=0.999),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_gain_matches_numpy_and_stays_in_bounds(scale, dim, magnitude, smoothing, seed):
    rng = np.random.RandomState(seed)
    sequence = [magnitude * (rng.randn(scale, dim) + rng.uniform(-1, 1) * rng.randn(dim)) for _ in range(3)]
    gains = run_update_gain(sequence, scale, smoothing)
    assert all(1.0 <= g <= scale for g in gains)
    np.testing.assert_allclose(gains, numpy_gains(sequence, scale, smoothing), rtol=2e-3)


def initial_state(dtype=tf.float64):
    zero = tf.zeros((), dtype)
    return gain.AdaScaleState(zero, zero, zero, tf.constant(1.0), tf.constant(0, tf.int64), tf.constant(0.0),
                              tf.constant(0.0), tf.constant(0, tf.int64))


@pytest.mark.parametrize("samples, scale", [(4, 4), (4, 8), (8, 2.5)])
def test_the_state_step_matches_the_reference_without_keras(samples, scale):
    from reference import AdaScaleReference

    rng = np.random.RandomState(samples)
    learning_rate = lambda step: 0.1 / (1 + step // 3)  # noqa: E731  (a schedule keyed on floor(tau))
    reference = AdaScaleReference(np.zeros(5), learning_rate, scale=scale, smoothing=0.7)
    step = tf.function(gain.step, jit_compile=True)
    state = initial_state()
    f64 = lambda value: tf.constant(float(value), tf.float64)  # noqa: E731
    for _ in range(10):
        batch = rng.randn(samples, 5) + rng.randn(5)
        mean = batch.mean(axis=0)
        rate = learning_rate(int(state.tau_whole))
        state, finite = step(state, f64(np.sum(batch**2)), f64(mean @ mean), tf.constant(rate, tf.float32),
                             f64(samples), f64(scale), f64(0.7))
        reference.step(list(batch))
        assert bool(finite)
        assert float(state.gain) == pytest.approx(reference.gain, rel=1e-6)
        assert int(state.tau_whole) + float(state.tau_fraction) == pytest.approx(reference.tau, rel=1e-6)
        assert float(state.effective_learning_rate) == pytest.approx(reference.effective_learning_rate, rel=1e-6)
        assert 0.0 <= float(state.tau_fraction) < 1.0
    assert int(state.skipped_updates) == 0 and reference.tau > 10  # tau crossed several schedule steps


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_the_state_step_keeps_the_state_and_counts_a_non_finite_update(bad):
    state = initial_state()
    f64 = lambda value: tf.constant(value, tf.float64)  # noqa: E731
    state, _ = gain.step(state, f64(10.0), f64(1.0), tf.constant(0.1), f64(4.0), f64(4.0), f64(0.5))
    kept, finite = gain.step(state, f64(bad), f64(1.0), tf.constant(0.1), f64(4.0), f64(4.0), f64(0.5))
    assert not bool(finite)
    assert [float(v) for v in kept[:-1]] == [float(v) for v in state[:-1]]
    assert int(kept.skipped_updates) == int(state.skipped_updates) + 1
