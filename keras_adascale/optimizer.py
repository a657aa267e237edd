"""AdaScaleSGD: the paper's Algorithm 1 around Keras's SGD update."""

import keras
from keras import ops

from keras_adascale import base, validation


@keras.saving.register_keras_serializable(package="keras_adascale")
class AdaScaleSGD(base.AdaScaleBase, keras.optimizers.SGD):
    """SGD (with momentum) that adapts its learning rate to the batch scale S.

    Two numbers describe an update. S (`scale`) is how many baseline batches
    it holds: the examples per update over the batch B0 that the single-batch
    recipe was tuned for. N (`samples_per_update`) is how many gradient
    samples g_1..g_N it sees: the replicas' local gradients under
    `tf.distribute`, times the micro-batches of `gradient_accumulation_steps`.
    By default S = N (each sample is one baseline batch); with the largest
    per-replica batch that fits, S differs: a recipe tuned at batch 256 moved
    to 8 GPUs of 1,024 examples each has N = 8 and S = 8 x 1,024 / 256 = 32.
    With g the mean of the samples (the gradient applied):

    ```python
    sample_var = (sum_i ||g_i||^2 - N * ||g||^2) / (N - 1)
    sigma2 = sample_var * S / N        # variance of one baseline-batch gradient, >= 0
    mu2 = ||g||^2 - sample_var / N     # squared norm of the true gradient, >= 0
    v, m = bias_corrected_ema(sigma2), bias_corrected_ema(mu2)   # smoothing theta
    gain = (v + m) / (v / S + m)                           # in [1, S]
    lr_t = gain * lr(floor(tau))
    velocity = momentum * velocity - lr_t * g              # as keras.optimizers.SGD
    w = w + velocity
    tau = tau + gain
    ```

    A learning-rate schedule is evaluated at `floor(tau)`, the number of
    scale-invariant iterations, so the single-batch schedule needs no
    re-tuning at scale (see `ScaleInvariantSchedule`). `weight_decay` is
    decoupled as in Keras, with the learning rate `lr_t`. `clipnorm` and
    `global_clipnorm` act on the mean gradient after the all-reduce; the gain
    sees the gradients before clipping.

    Each replica's loss is assumed scaled by 1/replicas, as `model.fit` and
    `tf.nn.compute_average_loss(..., global_batch_size=...)` do, so that the
    all-reduced sum of local gradients is the mean gradient g.

    Args:
        learning_rate: float, `keras.optimizers.schedules.LearningRateSchedule`
            (evaluated at floor(tau)) or a callable taking no arguments. The
            single-batch (S = 1) learning rate. Defaults to `0.01`.
        momentum: float in [0, 1]. Defaults to `0.0`.
        nesterov: bool, whether to use Nesterov momentum. Defaults to `False`.
        scale: optional number >= 1 (int or float), S: the examples per
            update over the baseline batch B0 of the single-batch recipe.
            Defaults to N = `num_replicas_in_sync *
            (gradient_accumulation_steps or 1)`, i.e. each gradient sample is
            one baseline batch. Any S >= 1 works with N >= 2 samples (S < N
            too: each sample is then a fraction of a baseline batch); with
            N = 1 the variance cannot be seen and S > 1 raises at build time.
        smoothing: optional float in [0, 1), theta, the moving-average factor
            of the variance and squared-norm estimates. Defaults to
            `max(1 - S / 1000, 0)`.
        non_finite: `"skip"` or `"raise"`, what an update whose gradients hold
            a NaN or an Inf does. `"skip"` (the default) leaves the weights,
            momentum, tau and the averages as they were and adds one to
            `skipped_updates`; `"raise"` also skips and counts it, then raises.
            What raises depends on the backend. TensorFlow: the step fails
            with `tf.errors.InvalidArgumentError` (in `fit`, a custom loop or
            eager); XLA drops that assertion, so under `jit_compile=True`
            only `AdaScaleCallback` raises, `FloatingPointError` after the
            batch that completed the update. JAX and PyTorch: the optimizer
            itself never raises (`fit`, compiled or not, and `apply` go on as
            under `"skip"`); `AdaScaleCallback` raises `FloatingPointError`
            after that batch, so in `fit` add it, and in a custom loop check
            `skipped_updates`. Either way no NaN reaches the averages.
        name: string. Defaults to `"adascale_sgd"`, made unique as Keras
            does (`"adascale_sgd_1"` for the second).
        **kwargs: the keyword arguments of `keras.optimizers.Optimizer`
            (`weight_decay`, `clipnorm`, `global_clipnorm`, `clipvalue`,
            `use_ema`, `loss_scale_factor`, `gradient_accumulation_steps`...).

    References:
        Johnson, Agrawal, Gu, Guestrin. "AdaScale SGD: A User-Friendly
        Algorithm for Distributed Training". ICML 2020, arXiv:2007.05105,
        Algorithm 1.
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.0,
        nesterov=False,
        scale=None,
        smoothing=None,
        non_finite="skip",
        name=None,
        **kwargs,
    ):
        learning_rate = validation.learning_rate(learning_rate)
        momentum = validation.momentum(momentum)
        nesterov = validation.flag(nesterov, "nesterov")
        super().__init__(
            learning_rate=learning_rate,
            momentum=momentum,
            nesterov=nesterov,
            scale=scale,
            smoothing=smoothing,
            non_finite=non_finite,
            name=name or base.unique_name("adascale_sgd"),
            **kwargs,
        )

    def update_step(self, gradient, variable, learning_rate):
        if self.weight_decay is not None and self._use_weight_decay(variable):
            # Keras's own order of operations, so that S = 1 is SGD to the last bit.
            wd, lr = ops.cast(self.weight_decay, variable.dtype), ops.cast(learning_rate, variable.dtype)
            self.assign_sub(variable, variable * wd * lr)
        super().update_step(gradient, variable, learning_rate)
