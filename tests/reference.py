"""An independent NumPy implementation of AdaScale SGD (Johnson et al., 2020, Algorithm 1).

Written from the paper, in float64, sharing no code with keras_adascale.
"""

import math

import numpy as np


def piecewise_constant(boundaries, values):
    """lr(step) = values[i] for boundaries[i-1] < step <= boundaries[i] (Keras's convention)."""

    def learning_rate(step):
        for boundary, value in zip(boundaries, values):
            if step <= boundary:
                return value
        return values[-1]

    return learning_rate


def gain_statistics(samples, scale=None):
    """Returns (sigma2, mu2) of a list of N flat gradient samples, clipped at 0.

    sigma2 is the variance of one baseline-batch gradient: each of the N
    samples holds scale / N baseline batches (scale defaults to N).
    """
    samples = np.asarray(samples, dtype=np.float64)
    count = samples.shape[0]
    scale = count if scale is None else scale
    mean = samples.mean(axis=0)
    mean_sqr = float(mean @ mean)
    if count == 1:
        return 0.0, mean_sqr
    deviations = samples - mean
    sample_var = float(np.sum(deviations * deviations)) / (count - 1)
    sigma2 = sample_var * scale / count
    mu2 = mean_sqr - sample_var / count
    return max(sigma2, 0.0), max(mu2, 0.0)


class AdaScaleReference:
    """Algorithm 1 on a flat parameter vector, with Keras-style SGD momentum.

    Args:
        learning_rate: float or function of the integer floor(tau).
        scale: S, examples per update over the baseline batch; each step may
            get any number N of samples (N = S in the paper).
        smoothing: theta; None for max(1 - S/1000, 0).
        momentum, nesterov, weight_decay: as keras.optimizers.SGD.
    """

    def __init__(self, params, learning_rate, scale, smoothing=None, momentum=0.0,
                 nesterov=False, weight_decay=None):
        self.params = np.asarray(params, dtype=np.float64).copy()
        self.learning_rate = (
            learning_rate if callable(learning_rate) else (lambda step: learning_rate)
        )
        self.scale = scale
        self.smoothing = max(1.0 - scale / 1000.0, 0.0) if smoothing is None else smoothing
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.velocity = np.zeros_like(self.params)
        self.variance_ema = 0.0
        self.sqr_norm_ema = 0.0
        self.updates = 0
        self.tau = 0.0
        self.gain = 1.0

    def step(self, samples):
        """One update from N flat gradient samples; returns the new parameters."""
        theta = self.smoothing
        sigma2, mu2 = gain_statistics(samples, self.scale)
        self.updates += 1
        self.variance_ema = theta * self.variance_ema + (1 - theta) * sigma2
        self.sqr_norm_ema = theta * self.sqr_norm_ema + (1 - theta) * mu2
        correction = 1.0 - theta**self.updates
        variance = self.variance_ema / correction
        sqr_norm = self.sqr_norm_ema / correction
        if variance + sqr_norm > 0:
            self.gain = (variance + sqr_norm) / (variance / self.scale + sqr_norm)
        else:
            self.gain = 1.0
        rate = self.gain * self.learning_rate(math.floor(self.tau))
        grad = np.mean(np.asarray(samples, dtype=np.float64), axis=0)
        if self.weight_decay:
            self.params = self.params - self.params * self.weight_decay * rate
        if self.momentum:
            self.velocity = self.momentum * self.velocity - rate * grad
            if self.nesterov:
                self.params = self.params + self.momentum * self.velocity - rate * grad
            else:
                self.params = self.params + self.velocity
        else:
            self.params = self.params - rate * grad
        self.tau += self.gain
        self.effective_learning_rate = rate
        return self.params
