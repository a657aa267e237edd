"""AdaScaleAdam: Adam (and AdamW) with the square-root scaling rule, driven by AdaScale's gain."""

from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_adascale import base, validation

STATISTICS = ("raw", "preconditioned")


class _UpdateCoefficients(NamedTuple):
    """What one update's gain r makes of Adam's hyper-parameters, shared by every variable."""

    learning_rate: object  # float32, sqrt(r) * lr(floor(tau))
    decay_rate: object  # float32, sqrt(r) * lr_t = r * lr(floor(tau)): decoupled weight decay's rate
    one_minus_betas: object  # statistics dtype [2], min(1, r (1 - beta_i))
    moment_ages: object  # statistics dtype [2], after this update: prod_k beta_ik = beta_i ** age_i
    epsilon: object  # statistics dtype, epsilon / sqrt(r)


@keras.saving.register_keras_serializable(package="keras_adascale")
class AdaScaleAdam(base.AdaScaleBase, keras.optimizers.Adam):
    """Adam that adapts its learning rate and decay rates to the batch scale S.

    S (`scale`), N (`samples_per_update`), the statistics, the gain r in
    [1, S], tau and the schedule keyed on floor(tau) are those of
    `AdaScaleSGD` (see there). Each update applies the square-root scaling
    rule for adaptive methods with r as the batch ratio kappa:

    ```python
    lr_t = sqrt(r) * lr(floor(tau))
    b1, b2 = min(1, r * (1 - beta_1)), min(1, r * (1 - beta_2))   # 1 - beta_i, scaled
    eps_t = epsilon / sqrt(r)
    w = w - r * lr(floor(tau)) * weight_decay * w      # decoupled, as AdaScaleSGD's
    m = m + (g - m) * b1
    v = v + (g**2 - v) * b2
    a1, a2 = a1 + log(1 - b1) / log(beta_1), a2 + log(1 - b2) / log(beta_2)
    w = w - lr_t * sqrt(1 - beta_2**a2) / (1 - beta_1**a1) * m / (sqrt(v) + eps_t)
    tau = tau + r
    ```

    `beta_i ** a_i` is the product of the update's decay factors `1 - b_i`,
    so the bias correction stays exact as r varies; with r = 1 at every
    update, a_i counts updates and this is `keras.optimizers.Adam` exactly
    (at S = 1 the gain is always 1). Weight decay is a drift in the weights
    that does not depend on the gradients' noise: a run over the same
    examples in 1/r as many updates needs r times the decay per update, as
    with AdaScaleSGD's r * lr.

    The statistics measure either the raw gradients (the default) or the
    gradients divided by Adam's current `sqrt(v_hat) + epsilon` (AdaptDL's
    `AdamScale`). The default follows the scale study in docs/benchmarks.md
    (section 4): on MNIST both kept the S = 1 accuracy at every S from 2 to
    32, and the raw statistics gave the larger gain (5.7 against 3.9 at
    S = 32), so the same quality in up to 31% fewer updates. On a character
    language model the preconditioned statistics ended 0.02 - 0.06 bits per
    character lower but barely scaled (gain about 1.03, nearly every one of
    the baseline's updates), while the raw ones still ended below the S = 1
    baseline in up to 1.7x fewer updates. Raw statistics also cost less:
    preconditioning is one more pass over every gradient sample (on 2 CPU
    cores, a 5.8M-parameter MLP's step cost 1.18 - 1.40x Adam's with it,
    1.05 - 1.12x without; docs/benchmarks.md section 1c).

    Args:
        learning_rate: float, `keras.optimizers.schedules.LearningRateSchedule`
            (evaluated at floor(tau)) or a callable taking no arguments. The
            single-batch (S = 1) learning rate. Defaults to `0.001`.
        beta_1: float in [0, 1), the first moment's decay rate at S = 1.
            Defaults to `0.9`.
        beta_2: float in [0, 1), the second moment's decay rate at S = 1.
            Defaults to `0.999`.
        epsilon: float >= 0, Keras's "epsilon hat" at S = 1. Defaults to `1e-7`.
        amsgrad: bool, whether to use the AMSGrad variant. Defaults to `False`.
        statistics: `"raw"` or `"preconditioned"`, what the gain's variance
            and squared norm are measured on (see above). Defaults to `"raw"`.
        scale: optional number >= 1, S (see `AdaScaleSGD`). Defaults to N.
        smoothing: optional float in [0, 1), theta. Defaults to
            `max(1 - S / 1000, 0)`.
        non_finite: `"skip"` or `"raise"` (see `AdaScaleSGD`, which says what
            raises on each backend): a skipped update leaves the weights, both
            moments, their ages, tau and the averages as they were.
        name: string. Defaults to `"adascale_adam"`, made unique as Keras does.
        **kwargs: the keyword arguments of `keras.optimizers.Optimizer`
            (`weight_decay` makes it AdamW, `clipnorm`, `global_clipnorm`,
            `gradient_accumulation_steps`...).

    References:
        Johnson, Agrawal, Gu, Guestrin. "AdaScale SGD: A User-Friendly
        Algorithm for Distributed Training". ICML 2020, arXiv:2007.05105,
        Algorithm 1.
        Malladi, Lyu, Panigrahi, Arora. "On the SDEs and Scaling Rules for
        Adaptive Gradient Algorithms". NeurIPS 2022, arXiv:2205.10287,
        Definition 4.2 (the square-root scaling rule).
    """

    _learning_rate_scale = staticmethod(ops.sqrt)
    _plain_optimizer = "Adam"
    _shape_arguments = "`amsgrad`"

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=False,
        statistics="raw",
        scale=None,
        smoothing=None,
        non_finite="skip",
        name=None,
        **kwargs,
    ):
        learning_rate = validation.learning_rate(learning_rate)
        beta_1 = validation.beta(beta_1, "beta_1")
        beta_2 = validation.beta(beta_2, "beta_2")
        epsilon = validation.non_negative(epsilon, "epsilon")
        amsgrad = validation.flag(amsgrad, "amsgrad")
        if statistics not in STATISTICS:
            raise ValueError(
                f"Argument `statistics` must be one of {STATISTICS}. Received: statistics={statistics!r}"
            )
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            scale=scale,
            smoothing=smoothing,
            non_finite=non_finite,
            name=name or base.unique_name("adascale_adam"),
            **kwargs,
        )
        self.statistics = statistics

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._moment_ages = self.add_variable(
            shape=(2,),
            initializer="zeros",
            dtype=self._statistics_dtype,
            aggregation="only_first_replica",
            name="adascale_moment_ages",
        )

    def _second_moment(self, variable):
        index = self._get_variable_index(variable)
        return self._velocity_hats[index] if self.amsgrad else self._velocities[index]

    def _statistic_gradients(self, grads, variables):
        if self.statistics == "raw":
            return grads
        # g / (sqrt(v_hat) + epsilon) with Adam's moments before this update (v_hat = 0 before any).
        age = ops.convert_to_tensor(self._moment_ages.value)[1]
        preconditioned = []
        for grad, variable in zip(grads, variables):
            dtype = variable.dtype
            second_moment = ops.convert_to_tensor(self._second_moment(variable).value)
            correction = 1.0 - ops.power(ops.cast(self.beta_2, dtype), ops.cast(age, dtype))
            v_hat = ops.divide_no_nan(second_moment, correction)
            grad = ops.cast(self._dense_gradient(grad), dtype)
            preconditioned.append(grad / (ops.sqrt(v_hat) + ops.cast(self.epsilon, dtype)))
        return preconditioned

    def _apply_update(self, distribution, grads_and_vars, learning_rate, state):
        dtype = self._statistics_dtype
        gain = ops.cast(state.gain, dtype)
        one_minus_betas = ops.convert_to_tensor(np.asarray([1.0 - self.beta_1, 1.0 - self.beta_2], dtype), dtype)
        scaled = ops.minimum(ops.ones_like(one_minus_betas), gain * one_minus_betas)
        # log(1 - b) / log(1 - (1 - beta)): exactly 1 at r = 1; +inf once a decay factor is 0.
        # beta = 0 has factor 0 at every update, and any age >= 1 gives the same power 0.
        ages = ops.convert_to_tensor(self._moment_ages.value) + ops.where(
            one_minus_betas < 1.0, ops.log1p(-scaled) / ops.log1p(-one_minus_betas), ops.ones_like(scaled)
        )
        # `state` is read from one replica; so are these, for every replica's update.
        coefficients = _UpdateCoefficients(
            learning_rate=state.effective_learning_rate,
            decay_rate=ops.sqrt(state.gain) * state.effective_learning_rate,
            one_minus_betas=scaled,
            moment_ages=ages,
            epsilon=self.epsilon / ops.sqrt(gain),
        )
        self._update_variables(distribution, grads_and_vars, coefficients)
        self._assign_in_update(distribution, self._moment_ages, ages)

    def update_step(self, gradient, variable, coefficients):
        dtype = variable.dtype
        lr = ops.cast(coefficients.learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        if self.weight_decay is not None and self._use_weight_decay(variable):
            decay_rate = ops.cast(coefficients.decay_rate, dtype)
            self.assign_sub(variable, variable * ops.cast(self.weight_decay, dtype) * decay_rate)
        one_minus_betas = ops.cast(coefficients.one_minus_betas, dtype)
        ages = ops.cast(coefficients.moment_ages, dtype)
        one_minus_beta_1, one_minus_beta_2 = one_minus_betas[0], one_minus_betas[1]
        beta_1_power = ops.power(ops.cast(self.beta_1, dtype), ages[0])
        beta_2_power = ops.power(ops.cast(self.beta_2, dtype), ages[1])
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        self.assign_add(m, (gradient - m) * one_minus_beta_1)
        self.assign_add(v, (ops.square(gradient) - v) * one_minus_beta_2)
        if self.amsgrad:
            v_hat = self._velocity_hats[index]
            self.assign(v_hat, ops.maximum(v_hat, v))
            v = v_hat
        self.assign_sub(variable, (m * alpha) / (ops.sqrt(v) + ops.cast(coefficients.epsilon, dtype)))

    def get_config(self):
        config = super().get_config()
        config["statistics"] = self.statistics
        return config
