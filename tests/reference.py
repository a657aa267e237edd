"""Independent NumPy implementations of AdaScale SGD (Johnson et al., 2020, Algorithm 1) and AdaScaleAdam.

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


def gain_statistics(samples, scale=None, clip=False):
    """Returns the unbiased (sigma2, mu2) of a list of N flat gradient samples; either may be negative.

    sigma2 is the variance of one baseline-batch gradient: each of the N
    samples holds scale / N baseline batches (scale defaults to N). With
    `clip=True`, both are clipped at 0 (FairScale's per-update rule).
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
    if clip:
        return max(sigma2, 0.0), max(mu2, 0.0)
    return sigma2, mu2


class AdaScaleReference:
    """Algorithm 1 on a flat parameter vector, with Keras-style SGD momentum.

    Args:
        learning_rate: float or function of the integer floor(tau).
        scale: S, examples per update over the baseline batch; each step may
            get any number N of samples (N = S in the paper).
        smoothing: theta; None for max(1 - S/1000, 0) at each update's S. `scale` may be
            changed between updates (S that varies during training); the bias correction
            is then the same average taken of 1, which is 1 - theta^t while theta is fixed.
        momentum, nesterov, weight_decay: as keras.optimizers.SGD.
        clip: where sigma2 and mu2 are clipped at 0: "read" (the averages take each update's raw,
            unbiased estimates and what is read from them is clipped: McCandlish et al. 2018,
            Appendix A, and AdaptDL) or "update" (each update's estimates are clipped before they
            enter the averages: FairScale's AdaScale, biased low in the noise scale at small N).
    """

    def __init__(self, params, learning_rate, scale, smoothing=None, momentum=0.0,
                 nesterov=False, weight_decay=None, clip="read"):
        self.params = np.asarray(params, dtype=np.float64).copy()
        self.learning_rate = (
            learning_rate if callable(learning_rate) else (lambda step: learning_rate)
        )
        self.scale = scale
        self.fixed_smoothing = smoothing
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        if clip not in ("read", "update"):
            raise ValueError(f"clip must be 'read' or 'update', not {clip!r}")
        self.clip = clip
        self.velocity = np.zeros_like(self.params)
        self.variance_ema = 0.0
        self.sqr_norm_ema = 0.0
        self.updates = 0
        self.weight = 0.0
        self.tau = 0.0
        self.gain = 1.0

    @property
    def smoothing(self):
        """theta for the next update."""
        if self.fixed_smoothing is not None:
            return self.fixed_smoothing
        return max(1.0 - self.scale / 1000.0, 0.0)

    def moments(self):
        """(sigma2, mu2) read from the averages: bias-corrected and clipped at 0 (0 before any update)."""
        if self.weight == 0:
            return 0.0, 0.0
        return max(self.variance_ema / self.weight, 0.0), max(self.sqr_norm_ema / self.weight, 0.0)

    def noise_scale(self):
        """B_simple = sigma2 / mu2 from `moments` (inf where mu2 = 0 < sigma2, 0 where both are 0)."""
        variance, sqr_norm = self.moments()
        if sqr_norm > 0:
            return variance / sqr_norm
        return math.inf if variance > 0 else 0.0

    def update_gain(self, samples, measured=True):
        """Algorithm 1's statistics and gain for one update's N samples; returns the gain r.

        `measured=False`: an update whose samples are not N equal ones (a restore in its middle into another
        replica count) leaves the averages as they are and takes the gain they give at this S."""
        if not measured:
            variance, sqr_norm = self.moments()
            self.updates += 1
            self.gain = ((variance + sqr_norm) / (variance / self.scale + sqr_norm)
                         if variance + sqr_norm > 0 else 1.0)
            return self.gain
        theta = self.smoothing
        self.weight = theta * self.weight + (1 - theta)
        sigma2, mu2 = gain_statistics(samples, self.scale, clip=self.clip == "update")
        self.updates += 1
        self.variance_ema = theta * self.variance_ema + (1 - theta) * sigma2
        self.sqr_norm_ema = theta * self.sqr_norm_ema + (1 - theta) * mu2
        variance, sqr_norm = self.moments()
        if variance + sqr_norm > 0:
            self.gain = (variance + sqr_norm) / (variance / self.scale + sqr_norm)
        else:
            self.gain = 1.0
        return self.gain

    def step(self, samples, measured=True):
        """One update from N flat gradient samples (their mean is the gradient); returns the new parameters."""
        rate = self.update_gain(samples, measured) * self.learning_rate(math.floor(self.tau))
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


class AdaScaleAdamReference(AdaScaleReference):
    """AdaScaleAdam on a flat parameter vector: Adam with Malladi et al.'s square-root rule at kappa = r.

    Written from Kingma & Ba (Adam, with Keras's "epsilon hat"), Loshchilov & Hutter (decoupled
    weight decay) and Malladi et al. 2022 (lr x sqrt(k), 1 - beta x k, epsilon / sqrt(k)), with
    the bias correction as the plain product of each update's decay factors.

    Args:
        statistics: "raw" (gain from the samples) or "preconditioned" (from the samples divided
            elementwise by sqrt(v_hat) + epsilon, with Adam's moments before the update).
        The rest as `AdaScaleReference` and keras.optimizers.Adam.
    """

    def __init__(self, params, learning_rate, scale, smoothing=None, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-7, amsgrad=False, weight_decay=None, statistics="raw"):
        super().__init__(params, learning_rate, scale, smoothing=smoothing, weight_decay=weight_decay)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.amsgrad, self.statistics = amsgrad, statistics
        self.first_moment = np.zeros_like(self.params)
        self.second_moment = np.zeros_like(self.params)
        self.second_moment_max = np.zeros_like(self.params)
        self.beta_1_product = 1.0
        self.beta_2_product = 1.0

    def _measured(self, samples):
        samples = np.asarray(samples, dtype=np.float64)
        if self.statistics == "raw":
            return samples
        second = self.second_moment_max if self.amsgrad else self.second_moment
        v_hat = second / (1.0 - self.beta_2_product) if self.beta_2_product < 1.0 else np.zeros_like(second)
        return samples / (np.sqrt(v_hat) + self.epsilon)

    def step(self, samples, measured=True):
        """One update from N flat gradient samples; returns the new parameters."""
        r = self.update_gain(self._measured(samples), measured)
        lr = self.learning_rate(math.floor(self.tau))
        grad = np.mean(np.asarray(samples, dtype=np.float64), axis=0)
        b1 = min(1.0, r * (1.0 - self.beta_1))
        b2 = min(1.0, r * (1.0 - self.beta_2))
        self.beta_1_product *= 1.0 - b1
        self.beta_2_product *= 1.0 - b2
        if self.weight_decay:
            self.params = self.params - self.params * self.weight_decay * r * lr
        self.first_moment = (1.0 - b1) * self.first_moment + b1 * grad
        self.second_moment = (1.0 - b2) * self.second_moment + b2 * grad * grad
        second = self.second_moment
        if self.amsgrad:
            self.second_moment_max = np.maximum(self.second_moment_max, self.second_moment)
            second = self.second_moment_max
        m_hat = self.first_moment / (1.0 - self.beta_1_product)
        v_hat = second / (1.0 - self.beta_2_product)
        # Keras adds epsilon to sqrt(v), before the bias correction of v: sqrt(v_hat) + eps / sqrt(1 - b2^t).
        epsilon = self.epsilon / math.sqrt(r) / math.sqrt(1.0 - self.beta_2_product)
        self.effective_learning_rate = math.sqrt(r) * lr
        self.params = self.params - self.effective_learning_rate * m_hat / (np.sqrt(v_hat) + epsilon)
        self.tau += r
        return self.params
