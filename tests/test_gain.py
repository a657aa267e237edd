"""The pure gain math against NumPy and its limits, in float64 as the optimizer runs it on CPU and GPU.

float32 appears only where a test is about the TPU path, where the statistics are float32.
"""

import math

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from keras_adascale import gain
from keras_adascale.backend.tensorflow.statistics import sqr_norm_sum
from keras_adascale.numerics import NUMBERS
from reference import AdaScaleReference, gain_statistics


def run_update_gain(samples_sequence, scale, smoothing, dtype=tf.float64):
    """The gains `gain.update_gain` gives over a sequence of (N, dim) sample arrays, its scalars in `dtype`."""
    constant = lambda value: tf.constant(value, dtype)  # noqa: E731
    state = [constant(0.0), constant(0.0), constant(0.0)]
    gains = []
    for samples in samples_sequence:
        samples = np.asarray(samples, np.float64)
        mean = samples.mean(axis=0)
        *state, value = gain.update_gain(
            constant(np.sum(samples**2)),
            constant(mean @ mean),
            constant(float(len(samples))),
            constant(float(scale)),
            constant(smoothing),
            *state,
        )
        gains.append(float(value))
    return gains


def numpy_gains(samples_sequence, scale, smoothing):
    """The averages take the raw estimates; the gain reads them bias-corrected and clipped at 0."""
    variance_ema = sqr_norm_ema = 0.0
    gains = []
    for t, samples in enumerate(samples_sequence, start=1):
        sigma2, mu2 = gain_statistics(samples, scale)
        variance_ema = smoothing * variance_ema + (1 - smoothing) * sigma2
        sqr_norm_ema = smoothing * sqr_norm_ema + (1 - smoothing) * mu2
        v, m = max(variance_ema / (1 - smoothing**t), 0.0), max(sqr_norm_ema / (1 - smoothing**t), 0.0)
        gains.append((v + m) / (v / scale + m) if v + m > 0 else 1.0)
    return gains


def noisy_sequence(samples, seed, updates=12, dim=7):
    rng = np.random.RandomState(seed)
    return [rng.randn(samples, dim) * rng.uniform(0.1, 3) + rng.randn(dim) for _ in range(updates)]


@pytest.mark.parametrize("scale, smoothing", [(2, 0.0), (4, 0.9), (16, 0.984), (32, 0.5)])
def test_update_gain_matches_numpy_over_a_sequence(scale, smoothing):
    sequence = noisy_sequence(scale, seed=scale)
    np.testing.assert_allclose(
        run_update_gain(sequence, scale, smoothing), numpy_gains(sequence, scale, smoothing), rtol=1e-12
    )


@pytest.mark.parametrize("scale, smoothing", [(2, 0.0), (4, 0.9), (16, 0.984), (32, 0.5)])
def test_update_gain_in_float32_as_on_a_tpu_matches_numpy_over_a_sequence(scale, smoothing):
    sequence = noisy_sequence(scale, seed=scale)
    np.testing.assert_allclose(
        run_update_gain(sequence, scale, smoothing, tf.float32), numpy_gains(sequence, scale, smoothing), rtol=1e-5
    )


def test_gain_is_one_for_identical_samples():
    samples = [np.tile(np.array([1.0, -2.0, 0.5]), (8, 1))] * 3
    assert run_update_gain(samples, 8, 0.9) == pytest.approx([1.0] * 3, abs=1e-12)


def test_gain_tends_to_scale_for_pure_noise():
    rng = np.random.RandomState(0)
    sequence = []
    for _ in range(30):
        half = rng.randn(4, 50)
        sequence.append(np.concatenate([half, -half]))  # mean exactly 0
    assert run_update_gain(sequence, 8, 0.9)[-1] == pytest.approx(8.0, rel=1e-12)


def test_gain_is_one_for_zero_gradients():
    assert run_update_gain([np.zeros((4, 3))] * 2, 4, 0.5) == [1.0, 1.0]


def test_gain_is_one_at_scale_one():
    rng = np.random.RandomState(1)
    assert run_update_gain([rng.randn(1, 5) for _ in range(3)], 1, 0.5) == [1.0] * 3


def f64(value):
    return tf.constant(value, tf.float64)


def test_a_negative_sample_variance_is_kept_raw_for_the_averages():
    # sum_i |g_i|^2 = 1 < N |g|^2 = 8: the sample variance (1 - 8) / 3 is negative (impossible for real samples,
    # but rounding can make it so); the estimate stays unclipped, and so does mu^2 = |g|^2 - sample_var / N.
    variance, sqr_norm = gain.gradient_moments(f64(1.0), f64(2.0), f64(4.0), f64(4.0))
    assert float(variance) == pytest.approx(-7.0 / 3, rel=1e-15)
    assert float(sqr_norm) == pytest.approx(2.0 + 7.0 / 12, rel=1e-15)


def test_a_negative_squared_norm_estimate_is_kept_raw_for_the_averages():
    # |g|^2 = 0 < sample_var / N: the estimate of mu^2 is negative, and unbiased as it is.
    variance, sqr_norm = gain.gradient_moments(f64(100.0), f64(0.0), f64(4.0), f64(4.0))
    assert float(sqr_norm) == pytest.approx(-100.0 / 12, rel=1e-15)
    assert float(variance) == pytest.approx(100.0 / 3, rel=1e-15)


def test_what_is_read_from_the_averages_is_corrected_then_clipped_at_zero():
    variance, sqr_norm = gain.corrected_moments(f64(-0.3), f64(0.6), f64(0.5))
    assert float(variance) == 0.0 and float(sqr_norm) == pytest.approx(1.2, rel=1e-15)
    variance, sqr_norm = gain.corrected_moments(f64(0.6), f64(-0.3), f64(0.5))
    assert float(variance) == pytest.approx(1.2, rel=1e-15) and float(sqr_norm) == 0.0
    assert [float(v) for v in gain.corrected_moments(f64(0.0), f64(0.0), f64(0.0))] == [0.0, 0.0]
    # mu^2 read as 0 < sigma^2: the gain is S; both 0: the gain is 1.
    assert float(gain.gain_ratio(f64(1.2), f64(0.0), f64(8.0))) == 8.0
    assert float(gain.gain_ratio(f64(0.0), f64(0.0), f64(8.0))) == 1.0


@pytest.mark.parametrize("samples, scale", [(4, 8), (4, 6.5), (8, 2), (2, 16), (3, 1.5)])
def test_update_gain_matches_numpy_when_scale_differs_from_samples(samples, scale):
    sequence = noisy_sequence(samples, seed=samples)
    np.testing.assert_allclose(run_update_gain(sequence, scale, 0.5), numpy_gains(sequence, scale, 0.5), rtol=1e-12)


@pytest.mark.parametrize("samples, scale", [(4, 8), (4, 6.5), (8, 2), (2, 16), (3, 1.5)])
def test_the_gain_stays_between_one_and_scale_when_scale_differs_from_samples(samples, scale):
    gains = run_update_gain(noisy_sequence(samples, seed=samples), scale, 0.5)
    assert all(1.0 <= g <= scale for g in gains)


def test_baseline_batch_variance_is_the_sample_variance_times_batches_per_sample():
    # Two samples, each two baseline batches (S = 4, N = 2): sample variance 2 -> sigma2 4.
    variance, sqr_norm = gain.gradient_moments(f64(1.0**2 + 3.0**2), f64(2.0**2), f64(2.0), f64(4.0))
    assert float(variance) == pytest.approx(4.0) and float(sqr_norm) == pytest.approx(4.0 - 2.0 / 2)


random_problems = given(
    scale=st.integers(min_value=2, max_value=64),
    dim=st.integers(min_value=1, max_value=20),
    magnitude=st.floats(min_value=1e-6, max_value=1e6),
    smoothing=st.floats(min_value=0.0, max_value=0.999),
    seed=st.integers(min_value=0, max_value=2**16),
)


def random_sequence(scale, dim, magnitude, seed):
    rng = np.random.RandomState(seed)
    return [magnitude * (rng.randn(scale, dim) + rng.uniform(-1, 1) * rng.randn(dim)) for _ in range(3)]


@settings(max_examples=40, deadline=None)
@random_problems
def test_gain_matches_numpy(scale, dim, magnitude, smoothing, seed):
    sequence = random_sequence(scale, dim, magnitude, seed)
    np.testing.assert_allclose(run_update_gain(sequence, scale, smoothing),
                               numpy_gains(sequence, scale, smoothing), rtol=1e-12)


@settings(max_examples=40, deadline=None)
@random_problems
def test_gain_stays_between_one_and_scale(scale, dim, magnitude, smoothing, seed):
    gains = run_update_gain(random_sequence(scale, dim, magnitude, seed), scale, smoothing)
    assert all(1.0 <= g <= scale for g in gains)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32])
def test_sums_of_squares_keep_float32_precision_whatever_the_gradient_dtype_and_range(dtype):
    values = tf.cast(tf.constant(np.random.RandomState(0).randn(1000) * 1000.0 if dtype != tf.bfloat16
                                 else np.random.RandomState(0).randn(1000) * 1e30), dtype)
    expected = float(np.sum(values.numpy().astype(np.float64) ** 2))
    result = sqr_norm_sum([values, tf.IndexedSlices(values[:3], tf.constant([0, 0, 5]), tf.constant([1000]))])
    assert result.dtype == tf.float64
    dense = np.zeros(1000)
    np.add.at(dense, [0, 0, 5], values.numpy()[:3].astype(np.float64))
    # bfloat16 at 1e30 overflows float32 squares: that sum is redone in float64.
    assert float(result) == pytest.approx(expected + float(dense @ dense), rel=1e-6)


def test_the_float32_sum_of_squares_of_a_tpu_is_a_float32_sum():
    values = tf.constant(np.random.RandomState(0).randn(1000) * 1000.0, tf.float32)
    result = sqr_norm_sum([values, tf.IndexedSlices(values[:3], tf.constant([0, 0, 5]), tf.constant([1000]))],
                               dtype=tf.float32)
    assert result.dtype == tf.float32
    dense = np.zeros(1000)
    np.add.at(dense, [0, 0, 5], values.numpy()[:3].astype(np.float64))
    expected = float(np.sum(values.numpy().astype(np.float64) ** 2)) + float(dense @ dense)
    assert float(result) == pytest.approx(expected, rel=1e-5)


extreme_samples = given(
    scale=st.integers(min_value=2, max_value=32),
    dim=st.integers(min_value=1, max_value=50),
    exponent=st.integers(min_value=-30, max_value=30),
    noise=st.floats(min_value=0.0, max_value=10.0),
    seed=st.integers(min_value=0, max_value=2**16),
)


def extreme_moments(scale, dim, exponent, noise, seed):
    """float32 samples of magnitude 10^exponent and `gain.gradient_moments` of them: `(samples, sigma2, mu2)`."""
    rng = np.random.RandomState(seed)
    sample_list = (10.0**exponent * (rng.randn(dim) + noise * rng.randn(scale, dim))).astype(np.float32)
    mean = sample_list.astype(np.float64).mean(axis=0)
    variance, sqr_norm = gain.gradient_moments(
        sqr_norm_sum([tf.constant(sample_list)]), sqr_norm_sum([tf.constant(mean)]),
        f64(float(scale)), f64(float(scale)),
    )
    return sample_list, variance, sqr_norm


@settings(max_examples=40, deadline=None)
@extreme_samples
def test_statistics_match_numpy_from_1e_minus_30_to_1e30(scale, dim, exponent, noise, seed):
    sample_list, variance, sqr_norm = extreme_moments(scale, dim, exponent, noise, seed)
    expected_variance, expected_sqr_norm = gain_statistics(sample_list)
    # Sums of squares carry float32 rounding (~1e-7 of the samples' total), which the
    # difference in sigma^2 turns into an absolute error of that size.
    tolerance = 1e-5 * float(np.sum(sample_list.astype(np.float64) ** 2))
    assert math.isfinite(float(variance)) and math.isfinite(float(sqr_norm))
    assert float(variance) == pytest.approx(expected_variance, rel=1e-5, abs=tolerance)
    assert float(sqr_norm) == pytest.approx(expected_sqr_norm, rel=1e-5, abs=tolerance)


@settings(max_examples=40, deadline=None)
@extreme_samples
def test_the_gain_stays_between_one_and_scale_from_1e_minus_30_to_1e30(scale, dim, exponent, noise, seed):
    _, variance, sqr_norm = extreme_moments(scale, dim, exponent, noise, seed)
    ratio = gain.gain_ratio(variance, sqr_norm, f64(float(scale)))
    assert 1.0 <= float(ratio) <= scale


def initial_state(dtype=tf.float64):
    zero = tf.zeros((), dtype)
    return gain.AdaScaleState(zero, zero, zero, tf.constant(1.0), tf.constant(0, tf.int64), tf.constant(0.0),
                              tf.constant(0.0), tf.constant(0, tf.int64))


@pytest.mark.parametrize("samples, scale", [(4, 4), (4, 8), (8, 2.5)])
def test_the_state_step_matches_the_reference_without_keras(samples, scale):
    rng = np.random.RandomState(samples)
    learning_rate = lambda step: 0.1 / (1 + step // 3)  # noqa: E731  (a schedule keyed on floor(tau))
    reference = AdaScaleReference(np.zeros(5), learning_rate, scale=scale, smoothing=0.7)
    step = tf.function(gain.step, jit_compile=True)
    state = initial_state()
    for _ in range(10):
        batch = rng.randn(samples, 5) + rng.randn(5)
        mean = batch.mean(axis=0)
        rate = learning_rate(int(state.tau_whole))
        state, finite = step(state, f64(np.sum(batch**2)), f64(mean @ mean), tf.constant(rate, tf.float32),
                             f64(float(samples)), f64(float(scale)), f64(0.7))
        reference.step(list(batch))
        assert bool(finite)
        assert float(state.gain) == pytest.approx(reference.gain, rel=1e-6)
        assert int(state.tau_whole) + float(state.tau_fraction) == pytest.approx(reference.tau, rel=1e-6)
        assert float(state.effective_learning_rate) == pytest.approx(reference.effective_learning_rate, rel=1e-6)
        assert 0.0 <= float(state.tau_fraction) < 1.0
    assert int(state.skipped_updates) == 0 and reference.tau > 10  # tau crossed several schedule steps


def non_finite_step(bad):
    """`(state after one finite update, (state, finite) after a second update whose sum of squares is `bad`)`."""
    state, _ = gain.step(initial_state(), f64(10.0), f64(1.0), tf.constant(0.1), f64(4.0), f64(4.0), f64(0.5))
    return state, gain.step(state, f64(bad), f64(1.0), tf.constant(0.1), f64(4.0), f64(4.0), f64(0.5))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_the_state_step_keeps_the_state_on_a_non_finite_update(bad):
    state, (kept, finite) = non_finite_step(bad)
    assert not bool(finite)
    assert [float(v) for v in kept[:-1]] == [float(v) for v in state[:-1]]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_the_state_step_counts_a_non_finite_update(bad):
    state, (kept, _) = non_finite_step(bad)
    assert int(kept.skipped_updates) == int(state.skipped_updates) + 1


def synthetic_noise_scale(clip, seed, noise_scale=5.0, directions=16, updates=2000):
    """B_simple the reference reads after `updates` updates of N = S = 2 samples of known statistics.

    The true gradient G has |G|^2 = 1; each sample (one baseline batch) adds isotropic Gaussian noise in
    `directions` directions of total variance `noise_scale`, so the true B_simple is `noise_scale`.
    """
    rng = np.random.RandomState(seed)
    true_gradient = np.zeros(directions)
    true_gradient[0] = 1.0
    reference = AdaScaleReference(np.zeros(directions), 0.1, scale=2, smoothing=0.999, clip=clip)
    for _ in range(updates):
        reference.update_gain(true_gradient + rng.randn(2, directions) * np.sqrt(noise_scale / directions))
    return reference.noise_scale()


def test_clipping_each_update_biases_the_noise_scale_low_and_clipping_on_read_does_not():
    # N = 2, true B_simple 5: an update's mu^2 estimate is often negative; clipping it before the average (FairScale's
    # rule, the old one here) lifts mu^2 and reads about 4.1; averaging the raw estimates reads 5 within sampling error.
    old = [synthetic_noise_scale("update", seed) for seed in range(10)]
    new = [synthetic_noise_scale("read", seed) for seed in range(10)]
    standard_error = lambda values: np.std(values, ddof=1) / np.sqrt(len(values))  # noqa: E731
    assert abs(np.mean(new) - 5.0) < 3 * standard_error(new)
    assert np.mean(old) < 5.0 - 10 * standard_error(old)
    assert np.mean(old) < 4.4


def test_the_optimizers_math_reads_the_reference_noise_scale_from_raw_averages():
    rng = np.random.RandomState(7)
    sequence = [np.eye(16)[0] + rng.randn(2, 16) * np.sqrt(5.0 / 16) for _ in range(200)]
    reference = AdaScaleReference(np.zeros(16), 0.1, scale=2, smoothing=0.9)
    state = [f64(0.0), f64(0.0), f64(0.0)]
    for samples in sequence:
        reference.update_gain(samples)
        mean = samples.mean(axis=0)
        *state, _ = gain.update_gain(f64(np.sum(samples**2)), f64(mean @ mean), f64(2.0), f64(2.0), f64(0.9), *state)
    variance, sqr_norm = gain.corrected_moments(*state)
    assert float(gain.noise_scale(variance, sqr_norm)) == pytest.approx(reference.noise_scale(), rel=1e-10)


finite = st.floats(-1e30, 1e30, allow_nan=False, allow_subnormal=False)


@settings(max_examples=200, deadline=None)
@example(np.float32, 1e-20, 1e20, 1.0, 2.0)  # a noise scale of 1e-40, subnormal in float32: flushed by TensorFlow
@example(np.float32, 1.175494351e-38, 0.0, 1.0, 3.0)  # the gain's sigma2 / S subnormal (found on TensorFlow 2.16)
@given(st.sampled_from([np.float32, np.float64]), finite, finite,
       st.one_of(st.just(0.0), st.floats(1e-6, 1.0)), st.floats(1.0, 64.0))
def test_the_statistics_read_with_numpy_equal_the_tensor_ones(dtype, variance_average, sqr_norm_average,
                                                              average_weight, scale):
    """`snapshot` reads the averages with NumPy (`numerics.NUMBERS`); the compiled step and the tensor
    properties with TensorFlow: the same functions, so the same numbers, in float32 (TPU) and float64.

    Except below the smallest normal number: TensorFlow on a CPU flushes subnormal inputs and results to
    zero, NumPy keeps them (hypothesis found a float32 mu2 of 3.6e-44, then a sigma2 of 1.4e-45), and the two
    round a subnormal intermediate differently (the gain's sigma2 / S + mu2 for sigma2 = 1.18e-38, the smallest
    normal float32, mu2 = 0 and S = 3: 3.0 by NumPy, 2.9999998 by TensorFlow 2.16).
    """
    numbers = [dtype(value) for value in (variance_average, sqr_norm_average, average_weight, scale)]
    tiny = np.finfo(dtype).tiny
    # A subnormal input is flushed to zero by TensorFlow's arithmetic, and the rest follows from that zero.
    assume(all(value == 0 or abs(value) >= tiny for value in numbers))
    tensors = [tf.constant(value) for value in numbers]
    with np.errstate(over="ignore"):  # float32 sums of 1e30-sized values overflow to inf in both
        variance, sqr_norm = gain.corrected_moments(*numbers[:3], ops=NUMBERS)
        read = [variance, sqr_norm, gain.gain_ratio(variance, sqr_norm, numbers[3], ops=NUMBERS),
                gain.noise_scale(variance, sqr_norm, ops=NUMBERS)]
    variance, sqr_norm = gain.corrected_moments(*tensors[:3])
    expected = [variance, sqr_norm, gain.gain_ratio(variance, sqr_norm, tensors[3]),
                gain.noise_scale(variance, sqr_norm)]
    with np.errstate(over="ignore"):
        denominator = read[0] / numbers[3] + read[1]  # the gain's
    for name, value, tensor in zip(("sigma2", "mu2", "gain", "noise scale"), read, expected, strict=True):
        assert np.asarray(value).dtype == dtype, name
        if abs(value) < tiny and abs(tensor.numpy()) < tiny:
            continue  # subnormal or zero: flushed to zero by one, kept by the other
        if name == "gain" and 0 < abs(denominator) < tiny:
            continue  # its intermediate subnormal: rounded differently by the two
        np.testing.assert_array_equal(value, tensor.numpy(), err_msg=name)
