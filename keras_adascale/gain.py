"""Pure AdaScale math: gradient statistics, their moving averages, the gain, one state step.

Backend-neutral (`keras.ops`, traced or eager, on TensorFlow, JAX or PyTorch) and free of any
distribution machinery: every function maps tensors to tensors, and `step` is the whole per-update
scalar path of Algorithm 1 over a named `AdaScaleState`. The sums of squares over the gradients, which
depend on how a backend holds its gradients and its float64, are the mechanics' (`backend/tensorflow/`
on TensorFlow, `backend/common/` on JAX and PyTorch).
"""

from typing import NamedTuple

import keras

from keras_adascale.numerics import TENSORS


class AdaScaleState(NamedTuple):
    """Everything AdaScale carries from one update to the next.

    The statistics dtype is float64 on TensorFlow (float32 under `TPUStrategy`) and float32 on JAX
    and PyTorch, where the two averages are mantissas of one int32 power-of-two exponent that the
    mechanics keep beside the state (`backend/common/`). The counters are int64 on TensorFlow, int32 on
    JAX and PyTorch.

    Attributes:
        variance_average: running (uncorrected) average of the raw sigma2 estimates, statistics dtype.
        sqr_norm_average: running (uncorrected) average of the raw mu2 estimates, statistics dtype.
        average_weight: running average of 1 (`1 - theta^t`): the bias correction.
        gain: r of the last update, float32 (1 before any).
        tau_whole: integer whole part of tau, the scale-invariant iterations (counters dtype).
        tau_fraction: float32 fractional part of tau, in [0, 1): a float32 tau
            alone would round r away once tau reaches ~1e6, and floor(tau)
            picks the learning rate.
        effective_learning_rate: float32 `gain * lr(floor(tau))` of the last update.
        skipped_updates: count of updates skipped for NaN or Inf gradients (counters dtype).
    """

    variance_average: object
    sqr_norm_average: object
    average_weight: object
    gain: object
    tau_whole: object
    tau_fraction: object
    effective_learning_rate: object
    skipped_updates: object


# Below this, a sum of float32 squares may have lost precision (squares under ~1e-38 are subnormal or
# zero): the mechanics' sums of squares redo it there, TensorFlow's in float64 (`backend/tensorflow/`), JAX's and
# PyTorch's in float32 over the gradients scaled by a power of two, as a float32 mantissa and an int32
# exponent (`backend/common/block_float.py`, which also does so above its LARGEST_FAST_SUM).
SMALLEST_FAST_SUM = 1e-20

# How an `AdaScaleState` is stored: the statistics-dtype fields (the float32 ones held exactly in it) in
# one variable, the integer counters in another.
FLOAT_FIELDS = (
    "variance_average", "sqr_norm_average", "average_weight", "gain", "tau_fraction", "effective_learning_rate",
)
FLOAT32_FIELDS = ("gain", "tau_fraction", "effective_learning_rate")
COUNTER_FIELDS = ("tau_whole", "skipped_updates")


def gradient_moments(sample_sqr_norm_sum, mean_sqr_norm, samples, scale, ops=TENSORS):
    """Unbiased estimates of the gradient variance and squared norm, in baseline batches, not clipped.

    With N gradient samples g_1..g_N and their mean g (the applied gradient),
    the sample variance is
    `sample_var = (sum_i ||g_i||^2 - N ||g||^2) / (N - 1)`. One sample covers
    S / N baseline batches (S examples per update over the baseline batch
    B0), so the variance of one baseline-batch gradient is
    `sigma2 = sample_var * S / N` and the squared norm of the true gradient
    `mu2 = ||g||^2 - sample_var / N`. With N = S these are the paper's
    estimates. With N = 1 there is no variance to see: `sigma2 = 0`,
    `mu2 = ||g||^2`.

    Both are unbiased, so either may be negative for one update (at small N,
    mu2 often is: the noise dominates one update's mean). They go into the
    moving averages as they are, and only what is read from the averages is
    clipped at 0 (`corrected_moments`): clipping each update's estimate
    first (FairScale's way) lifts the negative mu2 estimates and biases the
    noise scale low (McCandlish et al., 2018, Appendix A; AdaptDL's
    `GradientNoiseScale` averages the raw estimates too).

    Args:
        sample_sqr_norm_sum: float scalar, `sum_i ||g_i||^2`.
        mean_sqr_norm: float scalar of the same dtype, `||g||^2`.
        samples: float scalar of the same dtype, N >= 1.
        scale: float scalar of the same dtype, S >= 1.
        ops: `numerics.TENSORS` (the default), or a namespace of the same operations (PyTorch's own ops).

    Returns:
        `(gradient_variance, gradient_sqr_norm)`, scalars of any sign.

    References:
        Johnson et al., 2020, Section 3.3 and Algorithm 1.
    """
    sample_variance = (sample_sqr_norm_sum - samples * mean_sqr_norm) / ops.maximum(samples - 1.0, 1.0)
    sample_variance = ops.where(samples > 1.0, sample_variance, ops.zeros_like(sample_variance))
    sqr_norm = mean_sqr_norm - sample_variance / samples
    variance = sample_variance * (scale / samples)
    return variance, sqr_norm


def moving_average(average, value, smoothing):
    """One step of an exponential moving average, `theta * a + (1 - theta) * x`.

    Bias correction divides by the same average taken of the constant 1
    (which equals `1 - theta^t` while theta is fixed), as Adam does.

    Args:
        average: the running (uncorrected) average.
        value: the new observation.
        smoothing: theta in [0, 1).

    Returns:
        The updated running average.
    """
    return smoothing * average + (1.0 - smoothing) * value


def corrected_moments(variance_average, sqr_norm_average, average_weight, ops=TENSORS):
    """(sigma2, mu2) as read from the moving averages: bias-corrected, then clipped at 0.

    The averages hold raw, unbiased estimates (see `gradient_moments`); the
    clip comes only here, on read, so that it does not bias them. 0 before
    any update (a weight of 0).

    Args:
        variance_average: running (uncorrected) average of the sigma2 estimates.
        sqr_norm_average: running (uncorrected) average of the mu2 estimates.
        average_weight: the same average of 1 (`1 - theta^t`), the bias correction.
        ops: `numerics.TENSORS` (the default) for tensors, `numerics.NUMBERS` for NumPy scalars.

    Returns:
        `(gradient_variance, gradient_sqr_norm)`, scalars >= 0 of the averages' dtype.
    """
    zero = ops.like(0.0, variance_average)
    return (ops.maximum(ops.divide_no_nan(variance_average, average_weight), zero),
            ops.maximum(ops.divide_no_nan(sqr_norm_average, average_weight), zero))


def gain_ratio(gradient_variance, gradient_sqr_norm, scale, ops=TENSORS):
    """The AdaScale gain `r = (sigma2 + mu2) / (sigma2 / S + mu2)`, in [1, S].

    Args:
        gradient_variance: sigma2 estimate (>= 0).
        gradient_sqr_norm: mu2 estimate (>= 0).
        scale: S >= 1, of the estimates' dtype.
        ops: `numerics.TENSORS` (the default) or `numerics.NUMBERS`.

    Returns:
        The gain, 1 where both estimates are 0.

    References:
        Johnson et al., 2020, Equation (3) / Algorithm 1.
    """
    total = gradient_variance + gradient_sqr_norm
    denominator = gradient_variance / scale + gradient_sqr_norm
    one = ops.like(1.0, total)
    ratio = ops.where(total > 0.0, total / ops.where(total > 0.0, denominator, one), one)
    return ops.minimum(ops.maximum(ratio, one), scale)


def noise_scale(gradient_variance, gradient_sqr_norm, ops=TENSORS):
    """The simple gradient noise scale `sigma2 / mu2` (McCandlish et al., 2018, B_simple).

    In the units of sigma2's batch: baseline batches here. 0 where both are 0,
    +inf where only mu2 is.

    Args:
        gradient_variance: sigma2 estimate (>= 0).
        gradient_sqr_norm: mu2 estimate (>= 0), same dtype.
        ops: `numerics.TENSORS` (the default) or `numerics.NUMBERS`.

    Returns:
        A scalar of the same dtype.
    """
    return ops.where(
        gradient_sqr_norm > 0.0,
        ops.divide_no_nan(gradient_variance, gradient_sqr_norm),
        ops.where(gradient_variance > 0.0, ops.like(float("inf"), gradient_variance),
                  ops.like(0.0, gradient_variance)),
    )


def update_gain(
    sample_sqr_norm_sum,
    mean_sqr_norm,
    samples,
    scale,
    smoothing,
    variance_average,
    sqr_norm_average,
    average_weight,
    ops=TENSORS,
):
    """One AdaScale statistics step: moments, moving averages, gain.

    All arguments are scalars of one float dtype, the statistics dtype, which
    the results keep: float64 on TensorFlow (float32 under `TPUStrategy`),
    float32 on JAX and PyTorch, where the sums and averages are mantissas of
    one power-of-two exponent (`backend/common/`): the gain, a ratio, is the same.

    Args:
        sample_sqr_norm_sum: `sum_i ||g_i||^2` over the N samples.
        mean_sqr_norm: `||mean_i g_i||^2`.
        samples: N, the gradient samples per update.
        scale: S, examples per update over the baseline batch.
        smoothing: theta in [0, 1).
        variance_average: running average of the raw sigma2 estimates (uncorrected).
        sqr_norm_average: running average of the raw mu2 estimates (uncorrected).
        average_weight: running average of 1 (`1 - theta^t`), the bias correction.
        ops: `numerics.TENSORS` (the default), or a namespace of the same operations.

    Returns:
        `(variance_average, sqr_norm_average, average_weight, gain)` after this step.
    """
    variance, sqr_norm = gradient_moments(sample_sqr_norm_sum, mean_sqr_norm, samples, scale, ops)
    variance_average = moving_average(variance_average, variance, smoothing)
    sqr_norm_average = moving_average(sqr_norm_average, sqr_norm, smoothing)
    average_weight = moving_average(average_weight, 1.0, smoothing)
    gain = gain_ratio(*corrected_moments(variance_average, sqr_norm_average, average_weight, ops), scale, ops)
    return variance_average, sqr_norm_average, average_weight, gain


def _identity(gain):
    return gain


def step(state, sample_sqr_norm_sum, mean_sqr_norm, learning_rate, samples, scale, smoothing,
         learning_rate_scale=_identity, measured=None, ops=TENSORS):
    """Algorithm 1's scalar path for one update: statistics, gain, learning rate, tau.

    Where a sum of squares is not finite (a NaN or an Inf in the gradients),
    the update is skipped: the state is kept but for `skipped_updates + 1`,
    and no NaN reaches the averages.

    Args:
        state: the `AdaScaleState` before the update.
        sample_sqr_norm_sum: `sum_i ||g_i||^2` over the N samples, statistics dtype.
        mean_sqr_norm: `||g||^2` of their mean, statistics dtype.
        learning_rate: the single-batch learning rate lr(floor(tau)), a float scalar.
        samples: N, statistics dtype.
        scale: S, statistics dtype.
        smoothing: theta, statistics dtype.
        learning_rate_scale: the learning rate's factor for a gain r, a function of the float32
            gain: r itself (Algorithm 1; the default) or `keras.ops.sqrt` (AdaScaleAdam).
        measured: optional boolean scalar, whether this update's sums measure it: False for an
            update whose micro-batches came from different replica counts (a restore in its
            middle into another configuration), whose samples are neither equal nor counted in
            N. Such an update is applied with the gain the averages give at its S, and the
            averages and their weight are kept as they were. None: always measured.
        ops: `numerics.TENSORS` (the default: `keras.ops`, traced or eager), or a namespace of the same
            operations over one backend's own tensors (PyTorch's eager update, where a `keras.ops` call on a
            scalar costs several times the kernel).

    Returns:
        `(new_state, finite)`: `finite` is the boolean "apply this update".

    References:
        Johnson et al., 2020, Algorithm 1.
    """
    finite = ops.logical_and(ops.isfinite(sample_sqr_norm_sum), ops.isfinite(mean_sqr_norm))
    zero = ops.zeros_like(sample_sqr_norm_sum)
    variance_average, sqr_norm_average, average_weight, gain = update_gain(
        ops.where(finite, sample_sqr_norm_sum, zero),
        ops.where(finite, mean_sqr_norm, zero),
        samples,
        scale,
        smoothing,
        state.variance_average,
        state.sqr_norm_average,
        state.average_weight,
        ops,
    )
    if measured is not None:
        kept = (state.variance_average, state.sqr_norm_average, state.average_weight)
        variance_average, sqr_norm_average, average_weight = (
            ops.where(measured, new, old) for new, old in zip((variance_average, sqr_norm_average, average_weight), kept))
        gain = ops.where(measured, gain, gain_ratio(*corrected_moments(*kept, ops), scale, ops))
    gain = ops.cast(gain, "float32")
    fraction = state.tau_fraction + gain
    carry = ops.floor(fraction)
    counters = keras.backend.standardize_dtype(state.tau_whole.dtype)
    updated = AdaScaleState(
        variance_average=variance_average,
        sqr_norm_average=sqr_norm_average,
        average_weight=average_weight,
        gain=gain,
        tau_whole=state.tau_whole + ops.cast(carry, counters),
        tau_fraction=fraction - carry,
        effective_learning_rate=learning_rate_scale(gain) * ops.cast(learning_rate, "float32"),
        skipped_updates=state.skipped_updates,
    )
    skipped = state._replace(skipped_updates=state.skipped_updates + ops.ones_like(state.skipped_updates))
    new_state = AdaScaleState(*(ops.where(finite, new, old) for new, old in zip(updated, skipped)))
    return new_state, finite
