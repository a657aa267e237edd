"""Pure AdaScale statistics: gradient moments, their bias-corrected moving averages and the gain."""

import tensorflow as tf


def gradient_moments(sample_sqr_norm_sum, mean_sqr_norm, samples, scale):
    """Unbiased estimates of the gradient variance and squared norm, in baseline batches.

    With N gradient samples g_1..g_N and their mean g (the applied gradient),
    the sample variance is
    `sample_var = (sum_i ||g_i||^2 - N ||g||^2) / (N - 1)`. One sample covers
    S / N baseline batches (S examples per update over the baseline batch
    B0), so the variance of one baseline-batch gradient is
    `sigma2 = sample_var * S / N` and the squared norm of the true gradient
    `mu2 = ||g||^2 - sample_var / N`, both clipped at 0. With N = S these are
    the paper's estimates. With N = 1 there is no variance to see:
    `sigma2 = 0`, `mu2 = ||g||^2`.

    Args:
        sample_sqr_norm_sum: float scalar, `sum_i ||g_i||^2`.
        mean_sqr_norm: float scalar of the same dtype, `||g||^2`.
        samples: float scalar of the same dtype, N >= 1.
        scale: float scalar of the same dtype, S >= 1.

    Returns:
        `(gradient_variance, gradient_sqr_norm)`, scalars >= 0.

    References:
        Johnson et al., 2020, Section 3.3 and Algorithm 1.
    """
    sample_variance = (sample_sqr_norm_sum - samples * mean_sqr_norm) / tf.maximum(samples - 1.0, 1.0)
    sample_variance = tf.where(samples > 1.0, sample_variance, tf.zeros_like(sample_variance))
    sqr_norm = mean_sqr_norm - sample_variance / samples
    variance = sample_variance * (scale / samples)
    return tf.maximum(variance, 0.0), tf.maximum(sqr_norm, 0.0)


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


def gain_ratio(gradient_variance, gradient_sqr_norm, scale):
    """The AdaScale gain `r = (sigma2 + mu2) / (sigma2 / S + mu2)`, in [1, S].

    Args:
        gradient_variance: sigma2 estimate (>= 0).
        gradient_sqr_norm: mu2 estimate (>= 0).
        scale: S >= 1.

    Returns:
        The gain, 1 where both estimates are 0.

    References:
        Johnson et al., 2020, Equation (3) / Algorithm 1.
    """
    total = gradient_variance + gradient_sqr_norm
    denominator = gradient_variance / scale + gradient_sqr_norm
    safe_denominator = tf.where(total > 0.0, denominator, tf.ones_like(total))
    ratio = tf.where(total > 0.0, total / safe_denominator, tf.ones_like(total))
    return tf.clip_by_value(ratio, 1.0, scale)


def noise_scale(gradient_variance, gradient_sqr_norm):
    """The simple gradient noise scale `sigma2 / mu2` (McCandlish et al., 2018, B_simple).

    In the units of sigma2's batch: baseline batches here. 0 where both are 0,
    +inf where only mu2 is.

    Args:
        gradient_variance: sigma2 estimate (>= 0).
        gradient_sqr_norm: mu2 estimate (>= 0), same dtype.

    Returns:
        A scalar of the same dtype.
    """
    infinite = tf.constant(float("inf"), gradient_variance.dtype)
    return tf.where(
        gradient_sqr_norm > 0.0,
        tf.math.divide_no_nan(gradient_variance, gradient_sqr_norm),
        tf.where(gradient_variance > 0.0, infinite, tf.zeros_like(gradient_variance)),
    )


@tf.function(jit_compile=True)
def update_gain(
    sample_sqr_norm_sum,
    mean_sqr_norm,
    samples,
    scale,
    smoothing,
    variance_average,
    sqr_norm_average,
    average_weight,
):
    """One AdaScale statistics step, XLA-compiled.

    All arguments are scalars of one float dtype (float64 on CPU and GPU,
    float32 on TPU; see `AdaScaleSGD`), which the results keep.

    Args:
        sample_sqr_norm_sum: `sum_i ||g_i||^2` over the N samples.
        mean_sqr_norm: `||mean_i g_i||^2`.
        samples: N, the gradient samples per update.
        scale: S, examples per update over the baseline batch.
        smoothing: theta in [0, 1).
        variance_average: running average of sigma2 (uncorrected).
        sqr_norm_average: running average of mu2 (uncorrected).
        average_weight: running average of 1 (`1 - theta^t`), the bias correction.

    Returns:
        `(variance_average, sqr_norm_average, average_weight, gain)` after this step.
    """
    variance, sqr_norm = gradient_moments(sample_sqr_norm_sum, mean_sqr_norm, samples, scale)
    variance_average = moving_average(variance_average, variance, smoothing)
    sqr_norm_average = moving_average(sqr_norm_average, sqr_norm, smoothing)
    average_weight = moving_average(average_weight, 1.0, smoothing)
    gain = gain_ratio(
        variance_average / average_weight, sqr_norm_average / average_weight, scale
    )
    return variance_average, sqr_norm_average, average_weight, gain
