"""AdaScaleSGD: the paper's Algorithm 1 around Keras's SGD update."""

import numbers
import warnings

import keras
import tensorflow as tf

from keras_adascale import distribute, keras_fixes
from keras_adascale import gain as gain_lib

_LearningRateSchedule = keras.optimizers.schedules.LearningRateSchedule


@keras.saving.register_keras_serializable(package="keras_adascale")
class AdaScaleSGD(keras.optimizers.SGD):
    """SGD (with momentum) that adapts its learning rate to the batch scale S.

    Each update sees S gradient samples g_1..g_S: the replicas' local gradients
    under `tf.distribute`, times the micro-batches of
    `gradient_accumulation_steps`. With g their mean (the gradient applied):

    ```python
    sigma2 = (sum_i ||g_i||^2 - S * ||g||^2) / (S - 1)     # clipped at >= 0
    mu2 = ||g||^2 - sigma2 / S                             # clipped at >= 0
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
        scale: optional int >= 1, S. Defaults to
            `num_replicas_in_sync * (gradient_accumulation_steps or 1)`, the
            only value for which the statistics are right: a different value
            raises at build time.
        smoothing: optional float in [0, 1), theta, the moving-average factor
            of the variance and squared-norm estimates. Defaults to
            `max(1 - S / 1000, 0)`.
        non_finite: `"skip"` or `"raise"`, what an update whose gradients hold
            a NaN or an Inf does. `"skip"` (the default) leaves the weights,
            momentum, tau and the averages as they were and adds one to
            `skipped_updates`; `"raise"` also skips and counts it, then fails
            the step with `tf.errors.InvalidArgumentError` (XLA drops that
            assertion: under `jit_compile=True`, `AdaScaleCallback` raises
            `FloatingPointError` after the batch). Either way no NaN reaches
            the averages.
        name: string. Defaults to `"adascale_sgd"`.
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
        name="adascale_sgd",
        **kwargs,
    ):
        learning_rate = _checked_learning_rate(learning_rate)
        momentum = _checked_momentum(momentum)
        if not isinstance(nesterov, bool):
            raise ValueError(f"Argument `nesterov` must be a bool. Received: nesterov={nesterov!r}")
        if scale is not None and (
            isinstance(scale, bool) or not isinstance(scale, numbers.Integral) or scale < 1
        ):
            raise ValueError(f"Argument `scale` must be an integer >= 1 or None. Received: scale={scale!r}")
        if smoothing is not None and (
            isinstance(smoothing, bool)
            or not isinstance(smoothing, numbers.Real)
            or not 0.0 <= smoothing < 1.0
        ):
            raise ValueError(
                "Argument `smoothing` must be a float in [0, 1) or None. "
                f"Received: smoothing={smoothing!r}"
            )
        if non_finite not in ("skip", "raise"):
            raise ValueError(
                f"Argument `non_finite` must be 'skip' or 'raise'. Received: non_finite={non_finite!r}"
            )
        super().__init__(
            learning_rate=learning_rate,
            momentum=momentum,
            nesterov=nesterov,
            name=name,
            **kwargs,
        )
        self._requested_scale = None if scale is None else int(scale)
        self._requested_smoothing = None if smoothing is None else float(smoothing)
        self.non_finite = non_finite
        # float64 statistics square any float32 gradient without overflow or
        # underflow; TPUs have no float64.
        self._statistics_dtype = (
            tf.float32 if isinstance(self._distribution_strategy, tf.distribute.TPUStrategy) else tf.float64
        )
        self._add_adascale_state()
        keras_fixes.enable_for(self._distribution_strategy)

    def _add_adascale_state(self):
        def scalar(name, initial=0.0, dtype="float32"):
            return self.add_variable(
                shape=(),
                initializer=keras.initializers.Constant(initial),
                dtype=dtype,
                aggregation="only_first_replica",
                name=name,
            )

        # Created here rather than in build() so that `learning_rate`, which
        # reads tau, works before the first update, as Keras's `iterations` does.
        statistics = self._statistics_dtype.name
        self._variance_average = scalar("gradient_variance_average", dtype=statistics)
        self._sqr_norm_average = scalar("gradient_sqr_norm_average", dtype=statistics)
        self._average_weight = scalar("average_weight", dtype=statistics)
        self._gain = scalar("gain", 1.0)
        # tau = whole + fraction: a float32 alone would round r away once tau
        # reaches ~1e6, and floor(tau) picks the learning rate.
        self._tau_whole = scalar("scale_invariant_iterations_whole", 0, "int64")
        self._tau_fraction = scalar("scale_invariant_iterations_fraction")
        self._effective_learning_rate = scalar("effective_learning_rate")
        self._skipped_updates = scalar("skipped_updates", 0, "int64")
        self._adascale_state = [
            self._variance_average,
            self._sqr_norm_average,
            self._average_weight,
            self._gain,
            self._tau_whole,
            self._tau_fraction,
            self._effective_learning_rate,
            self._skipped_updates,
        ]
        if self.gradient_accumulation_steps:
            self._sample_sqr_norm_accumulator = self._add_replica_local_variable(
                (), statistics, "sample_sqr_norm_accumulator"
            )

    def _add_replica_local_variable(self, shape, dtype, name):
        # Sync on read: each replica adds its own micro-batch gradients without a
        # merge_call (Keras's mirrored accumulators need one inside a cond, which
        # MirroredStrategy rejects: keras-team/keras#20582).
        with keras.name_scope(self.name, caller=self):
            variable = keras.Variable(
                initializer=keras.initializers.Zeros(),
                shape=shape,
                dtype=dtype,
                trainable=False,
                synchronization="on_read",
                aggregation="sum",
                name=name,
            )
        self._track_variable(variable)
        return variable

    def add_variable_from_reference(self, reference_variable, name=None, initializer="zeros"):
        if name != "gradient_accumulator":
            return super().add_variable_from_reference(reference_variable, name, initializer)
        with self._distribution_strategy.extended.colocate_vars_with(reference_variable.value):
            return self._add_replica_local_variable(
                reference_variable.shape,
                reference_variable.dtype,
                f"{reference_variable.path.replace('/', '_')}_{name}",
            )

    @property
    def scale(self):
        """S, the number of gradient samples per update (int)."""
        if self._requested_scale is not None:
            return self._requested_scale
        return self._default_scale()

    def _default_scale(self):
        replicas = self._distribution_strategy.num_replicas_in_sync
        return replicas * (self.gradient_accumulation_steps or 1)

    @property
    def smoothing(self):
        """theta, the moving-average factor of the gain statistics (float)."""
        if self._requested_smoothing is not None:
            return self._requested_smoothing
        return max(1.0 - self.scale / 1000.0, 0.0)

    @property
    def gain(self):
        """The gain r of the last update (1.0 before any)."""
        return tf.convert_to_tensor(self._gain.value)

    @property
    def scale_invariant_iterations(self):
        """tau, the sum of the gains of all updates so far (float64 tensor)."""
        return tf.cast(self._tau_whole.value, tf.float64) + tf.cast(
            self._tau_fraction.value, tf.float64
        )

    @property
    def gradient_variance(self):
        """The smoothed, bias-corrected estimate of sigma^2 (0.0 before any update)."""
        return self._corrected(self._variance_average)

    @property
    def gradient_sqr_norm(self):
        """The smoothed, bias-corrected estimate of mu^2 (0.0 before any update)."""
        return self._corrected(self._sqr_norm_average)

    @property
    def skipped_updates(self):
        """How many updates were skipped for NaN or Inf gradients (int64 tensor)."""
        return tf.convert_to_tensor(self._skipped_updates.value)

    @property
    def effective_learning_rate(self):
        """`gain * lr(floor(tau))` as used by the last update (0.0 before any)."""
        return tf.convert_to_tensor(self._effective_learning_rate.value)

    def _corrected(self, average):
        weight = tf.convert_to_tensor(self._average_weight.value)
        return tf.math.divide_no_nan(tf.convert_to_tensor(average.value), weight)

    def _check_strategy(self):
        if tf.distribute.has_strategy() and tf.distribute.get_strategy() is not self._distribution_strategy:
            raise ValueError(
                "AdaScaleSGD was created outside the `strategy.scope()` it is used in, so "
                "it cannot see the replicas. Create the optimizer (and compile the model) "
                "inside `with strategy.scope():`."
            )

    def apply(self, grads, trainable_variables=None):
        # Built outside the scope too (a custom loop's `optimizer.build`), the first
        # update would fail deep in tf.distribute with a bare AssertionError.
        self._check_strategy()
        return super().apply(grads, trainable_variables)

    def build(self, variables):
        if self.built:
            return
        self._check_strategy()
        expected = self._default_scale()
        if self._requested_scale is not None and self._requested_scale != expected:
            raise ValueError(
                f"Argument `scale` is {self._requested_scale}, but each update "
                f"sees {expected} gradient samples (num_replicas_in_sync="
                f"{self._distribution_strategy.num_replicas_in_sync} x "
                f"gradient_accumulation_steps={self.gradient_accumulation_steps or 1}). "
                "Leave `scale=None` or make them agree."
            )
        if self.scale == 1:
            warnings.warn(
                "AdaScaleSGD has scale S = 1 (one replica, no gradient "
                "accumulation): the gain is always 1 and it behaves as plain "
                "SGD. Use several replicas or `gradient_accumulation_steps`.",
                stacklevel=2,
            )
        super().build(variables)

    def _get_current_learning_rate(self):
        if isinstance(self._learning_rate, _LearningRateSchedule):
            return self._learning_rate(self._tau_whole)
        return super()._get_current_learning_rate()

    def _backend_apply_gradients(self, grads, trainable_variables):
        if not self.gradient_accumulation_steps:
            super()._backend_apply_gradients(grads, trainable_variables)
            return
        accumulators = [
            self._accumulated_gradients[self._get_variable_index(v)] for v in trainable_variables
        ]
        for grad, accumulator in zip(grads, accumulators):
            self.assign_add(accumulator, grad)
        self.assign_add(
            self._sample_sqr_norm_accumulator, distribute.sqr_norm_sum(grads, self._statistics_dtype)
        )
        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            learning_rate = self.learning_rate
            tf.cond(
                self._is_update_step(),
                lambda: self._update_from_accumulators(accumulators, trainable_variables, learning_rate),
                tf.no_op,
            )
        else:
            # The cond must not hold a merge_call: take the one merge_call first
            # and branch in cross-replica context.
            tf.distribute.get_replica_context().merge_call(
                self._cross_replica_update_from_accumulators,
                args=(accumulators, trainable_variables),
            )
        if self.use_ema:
            self._update_model_variables_moving_average(self._trainable_variables)
            if self.ema_overwrite_frequency:
                tf.cond(
                    tf.equal((self.iterations + 1) % self.ema_overwrite_frequency, 0),
                    lambda: self._overwrite_model_variables_with_average_value(
                        self._trainable_variables
                    ),
                    tf.no_op,
                )

    def _update_from_accumulators(self, accumulators, trainable_variables, learning_rate):
        steps = float(self.gradient_accumulation_steps)
        grads = [tf.convert_to_tensor(a.value) / steps for a in accumulators]
        self._backend_update_step(grads, trainable_variables, learning_rate)
        for accumulator in accumulators:
            self.assign(accumulator, tf.zeros_like(accumulator.value))
        return tf.no_op()

    def _cross_replica_update_from_accumulators(self, distribution, accumulators, trainable_variables):
        def update():
            # Destinations on every replica's device make this one batched all-reduce.
            sums = distribution.extended.batch_reduce_to(
                tf.distribute.ReduceOp.SUM,
                [(a.value, v.value) for a, v in zip(accumulators, trainable_variables)],
            )
            # Its own reduce: a float64 statistic cannot share the float32 buffer.
            (sample_sqr_norm_sum,) = distribution.extended.batch_reduce_to(
                tf.distribute.ReduceOp.SUM, [(self._sample_sqr_norm_accumulator.value, self._gain.value)]
            )
            steps = float(self.gradient_accumulation_steps)
            grads = [distribution.experimental_local_results(g)[0] / steps for g in sums]
            sample_sqr_norm_sum = distribution.experimental_local_results(sample_sqr_norm_sum)[0]
            grads, learning_rate, state_values, finite = self._adascale_step(
                grads, sample_sqr_norm_sum, distribution.num_replicas_in_sync, self.learning_rate
            )
            self._distributed_adascale_update(
                distribution, list(zip(grads, trainable_variables)), learning_rate, state_values, finite
            )
            for accumulator in accumulators + [self._sample_sqr_norm_accumulator]:
                for component in distribution.experimental_local_results(accumulator.value):
                    component.assign(tf.zeros_like(component))
            return tf.no_op()

        tf.cond(self._is_update_step(), update, tf.no_op)

    def _is_update_step(self):
        return tf.equal((self._iterations + 1) % self.gradient_accumulation_steps, 0)

    def _clip_gradients(self, grads):
        # Clipping happens in _adascale_step, on the all-reduced mean gradient:
        # Keras would clip each replica's share before the reduce.
        return grads

    def _apply_weight_decay(self, variables):
        # Weight decay happens in update_step, with the gain-scaled rate.
        return

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # Replica context: one all-reduce carries the gradients and the replica's
        # sum of squared sample norms.
        if self.gradient_accumulation_steps:
            local_sqr_norm_sum = tf.identity(self._sample_sqr_norm_accumulator.value)
            self.assign(self._sample_sqr_norm_accumulator, tf.zeros((), self._statistics_dtype))
        else:
            local_sqr_norm_sum = distribute.sqr_norm_sum(grads, self._statistics_dtype)
        grads, sample_sqr_norm_sum, replicas = distribute.all_reduce_gradients(
            grads, local_sqr_norm_sum
        )
        # With one sample, the sample is the mean: no second pass over it.
        single_sample = replicas == 1 and not self.gradient_accumulation_steps
        grads, learning_rate, state_values, finite = self._adascale_step(
            grads, sample_sqr_norm_sum, replicas, learning_rate,
            mean_sqr_norm=sample_sqr_norm_sum if single_sample else None,
        )
        tf.__internal__.distribute.interim.maybe_merge_call(
            self._distributed_adascale_update,
            self._distribution_strategy,
            list(zip(grads, trainable_variables)),
            learning_rate,
            state_values,
            finite,
        )

    def _adascale_step(self, grads, sample_sqr_norm_sum, replicas, learning_rate, mean_sqr_norm=None):
        """Algorithm 1 on reduced values.

        Returns:
            `(clipped grads, r * lr, new state values, finite)`: where the
            gradients hold a NaN or an Inf, `finite` is false and the state
            values are the current ones (but for `skipped_updates` + 1).
        """
        dtype = self._statistics_dtype
        if mean_sqr_norm is None:
            mean_sqr_norm = distribute.sqr_norm_sum(grads, dtype)
        # Each replica held g_i / R (loss scaled by 1/R): the samples are R times that.
        sample_sqr_norm_sum = sample_sqr_norm_sum * float(replicas**2)
        # A NaN or Inf anywhere makes a sum of squares non-finite; all replicas
        # see the same reduced sums, so they all take the same branch.
        finite = tf.logical_and(tf.math.is_finite(sample_sqr_norm_sum), tf.math.is_finite(mean_sqr_norm))
        current = [tf.convert_to_tensor(variable.value) for variable in self._adascale_state]
        zero = tf.zeros((), dtype)
        variance_average, sqr_norm_average, average_weight, gain = gain_lib.update_gain(
            tf.where(finite, sample_sqr_norm_sum, zero),
            tf.where(finite, mean_sqr_norm, zero),
            tf.constant(float(self.scale), dtype),
            tf.constant(self.smoothing, dtype),
            *current[:3],
        )
        gain = tf.cast(gain, tf.float32)
        effective_learning_rate = gain * tf.cast(learning_rate, tf.float32)
        fraction = current[5] + gain
        carry = tf.floor(fraction)
        new = [
            variance_average,
            sqr_norm_average,
            average_weight,
            gain,
            current[4] + tf.cast(carry, tf.int64),
            fraction - carry,
            effective_learning_rate,
            current[7],
        ]
        state_values = [tf.where(finite, value, old) for value, old in zip(new, current)]
        state_values[-1] = current[7] + tf.cast(tf.logical_not(finite), tf.int64)
        return super()._clip_gradients(grads), effective_learning_rate, state_values, finite

    def _distributed_adascale_update(
        self, distribution, grads_and_vars, learning_rate, state_values, finite
    ):
        grads_and_vars = [
            (g, v.value if isinstance(v, keras.Variable) else v) for g, v in grads_and_vars
        ]
        if isinstance(finite, tf.distribute.DistributedValues):  # identical on every replica
            finite = distribution.experimental_local_results(finite)[0]

        def apply():
            self._distributed_tf_update_step(distribution, grads_and_vars, learning_rate)
            return tf.no_op()

        tf.cond(finite, apply, tf.no_op)
        assignments = []
        for variable, value in zip(self._adascale_state, state_values):
            assignments += distribution.extended.update(
                variable.value, lambda var, x: var.assign(x), args=(value,), group=False
            )
        if self.non_finite == "raise":
            # After the skip is recorded. XLA drops Assert: AdaScaleCallback raises there.
            with tf.control_dependencies(assignments):
                tf.debugging.Assert(finite, ["AdaScaleSGD: NaN or Inf in the gradients (non_finite='raise')"])

    def update_step(self, gradient, variable, learning_rate):
        if self.weight_decay is not None and self._use_weight_decay(variable):
            decay = tf.cast(learning_rate, variable.dtype) * tf.cast(
                self.weight_decay, variable.dtype
            )
            self.assign_sub(variable, variable * decay)
        super().update_step(gradient, variable, learning_rate)

    def load_own_variables(self, store):
        # Keras warns and skips a mismatched optimizer: that would silently restart
        # tau, the gain statistics and the momentum. Refuse instead.
        saved = len(store.keys())
        if saved != len(self.variables):
            raise ValueError(
                f"Cannot restore AdaScaleSGD '{self.name}': the checkpoint holds {saved} optimizer "
                f"variables and this optimizer has {len(self.variables)}. Build it first "
                "(`optimizer.build(model.trainable_variables)`) with the same `momentum` and "
                "`gradient_accumulation_steps` as the saved one, or load the model with "
                "`compile=False` to restore only the weights."
            )
        for index, variable in enumerate(self.variables):
            shape = tuple(store[str(index)].shape)
            if shape != tuple(variable.shape):
                raise ValueError(
                    f"Cannot restore AdaScaleSGD '{self.name}': variable {variable.path} has shape "
                    f"{tuple(variable.shape)} but the checkpoint's has {shape}."
                )
        super().load_own_variables(store)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "scale": self._requested_scale,
                "smoothing": self._requested_smoothing,
                "non_finite": self.non_finite,
            }
        )
        return config


def _checked_learning_rate(learning_rate):
    if isinstance(learning_rate, _LearningRateSchedule) or (
        callable(learning_rate) and not isinstance(learning_rate, numbers.Number)
    ):
        return learning_rate
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, numbers.Real):
        raise ValueError(
            "Argument `learning_rate` must be a float, a "
            "keras.optimizers.schedules.LearningRateSchedule or a callable. "
            f"Received: learning_rate={learning_rate!r}"
        )
    if not learning_rate >= 0:
        raise ValueError(f"Argument `learning_rate` must be >= 0. Received: learning_rate={learning_rate}")
    return float(learning_rate)


def _checked_momentum(momentum):
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, numbers.Real)
        or not 0.0 <= momentum <= 1.0
    ):
        raise ValueError(f"Argument `momentum` must be a float in [0, 1]. Received: momentum={momentum!r}")
    return float(momentum)
