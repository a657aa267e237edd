"""Accumulation mechanics shared by JAX and PyTorch: one update per k micro-batches, computed once, as values.

`AccumulationMechanics` is the base of `backend.jax.mechanics.AdaScaleMechanics` and
`backend.torch.mechanics.AdaScaleMechanics`, which `base.AdaScaleBase` mixes in before a Keras optimizer
class, as `backend.tensorflow.mechanics.AdaScaleMechanics` on TensorFlow, with the same hooks. Each
micro-batch's gradient is added to an accumulator and its squared norm (a block number:
`block_float`) to a statistic accumulator; on the micro-batch that completes an update (the scale
setting's `is_update_step`: k is a variable, so a change of k needs no retrace), the mean gradient, the
statistics, the gain, tau and the update rule run once. How a micro-batch is applied is the backend's
(`_apply_micro_batch`): on JAX one branch of `lax.cond` (`backend.jax.mechanics`), on PyTorch a Python
`if`, eagerly (`backend.torch.mechanics`).

Replicas: under `keras.distribution.DataParallel` Keras's train step hands the optimizer only the
all-reduced mean gradient. `AdaScaleModel`'s train step (`backend.jax.train_step`) computes each replica's
gradient in `jax.shard_map` and hands the optimizer the sum of their squared norms with it
(`_incoming_statistic`): N = replicas x k. Without that statistic, an optimizer made for several replicas
refuses to apply.
"""

import keras
import numpy as np
from keras import ops

from keras_adascale import gain as gain_lib
from keras_adascale import setting as setting_lib
from keras_adascale.backend.common.block_float import (_block_add, _common_exponent, _exponent_of, _floor_log2,
                                                       _in_exponent, _present)
from keras_adascale.numerics import TENSORS

# The oldest Keras these mechanics run on (`keras.ops.ldexp`; the `[jax]` and `[torch]` extras' lower bound).
MINIMUM_KERAS = (3, 13)


class AccumulationMechanics:
    """The Keras optimizer hooks of AdaScale that JAX and PyTorch share (gradient accumulation, values)."""

    # What `base.AdaScaleBase` asks of the backend's mechanics (`backend.tensorflow.mechanics.AdaScaleMechanics`
    # has the same).

    @staticmethod
    def _strategy_in_scope():
        return None

    # Set by `AdaScaleModel`'s train step, while it applies a gradient, to the block number of the sum of the
    # replicas' squared norms: the optimizer's own of the mean gradient would see one sample.
    _incoming_statistic = None

    def _choose_statistics_dtype(self):
        return "float32"  # with an exponent of its own (see LARGEST_FAST_SUM)

    def _choose_counters_dtype(self):
        return "int32"  # 2^31 micro-batches; Keras's own `iterations` is int32 on JAX without x64

    @staticmethod
    def _compiled_state_step(step):
        return step  # inside the backend's compiled train step already (JAX), or eager (PyTorch)

    def _enable_backend_fixes(self):
        # `keras.ops.ldexp` (the statistics' exponents) is in Keras from 3.13. Keras counts the micro-step
        # in `apply`, after `_backend_apply_gradients`, from 3.10 on; before, it counted it in the method
        # this class replaces (the TensorFlow mechanics count it there themselves).
        if tuple(int(part) for part in keras.__version__.split(".")[:2]) < MINIMUM_KERAS:
            minimum = ".".join(map(str, MINIMUM_KERAS))
            raise RuntimeError(
                f"{type(self).__name__} on the {keras.backend.backend()} backend needs Keras {minimum} or newer "
                f"(this is Keras {keras.__version__}): pip install 'keras>={minimum}'."
            )

    def _check_strategy(self):
        return

    @staticmethod
    def _dense_gradient(gradient):
        return gradient

    def _add_statistic_accumulator(self, variables):
        """The accumulator of the micro-batches' sums of squares, `[mantissa, exponent]` in the statistics dtype
        (an exponent is an integer well inside float32's exact ones)."""
        return self.add_variable((2,), initializer="zeros", dtype=self._statistics_dtype,
                                 name="sample_sqr_norm_accumulator")

    def _add_count_accumulator(self):
        """The count of what entered the accumulators: [R, R^2] per micro-batch of R replicas."""
        return self.add_variable((2,), initializer="zeros", dtype="float32", name="sample_count_accumulator")

    # A saved file's layout (see `base.AdaScaleBase.save_own_variables`): numbers, not mantissas.

    @staticmethod
    def _spent_sums(variable):
        """Whether `variable` is an accumulator holding sums already applied (kept by PyTorch's fused update)."""
        return False

    def _backend_only_variables(self):
        return [self._statistics_exponent]

    def _portable_floats(self, floats):
        floats = np.asarray(floats, np.float64).copy()
        floats[:2] = np.ldexp(floats[:2], self._statistics_exponent_number())
        return floats

    def _assign_floats(self, floats):
        exponent = _exponent_of(max(abs(floats[0]), abs(floats[1])))
        mantissas = floats.copy()
        mantissas[:2] = np.ldexp(floats[:2], -exponent)
        self._state_floats.assign(mantissas.astype("float32"))
        self._statistics_exponent.assign(np.asarray(exponent, "int32"))

    @staticmethod
    def _statistic_number(value):
        return float(np.ldexp(np.float64(value[0]), int(value[1])))

    @staticmethod
    def _statistic_value(number):
        exponent = _exponent_of(abs(number))
        return np.asarray([np.ldexp(number, -exponent), exponent], "float32")

    def _add_backend_state_variables(self):
        # The exponent of the moving averages of the variance and the squared norm.
        self._statistics_exponent = self.add_variable((), initializer="zeros", dtype="int32",
                                                      aggregation="only_first_replica",
                                                      name="adascale_statistics_exponent")

    # Keras's hooks.

    def _clip_gradients(self, grads):
        # Clipping happens on the mean gradient of the update.
        return grads

    def _apply_weight_decay(self, variables):
        # Weight decay happens in update_step, with the gain-scaled rate.
        return

    @staticmethod
    def _accumulated_statistic(accumulated, local):
        """The statistic accumulator's value `[mantissa, exponent]` after adding the block number `local`."""
        mantissa, exponent = _block_add((accumulated[0], ops.cast(accumulated[1], "int32")), local)
        return ops.stack([mantissa, ops.cast(exponent, "float32")])

    def _statistics_in_units(self, values):
        """The variance or squared norm `values` (mantissas of the averages' exponent) as numbers (tensors)."""
        return ops.ldexp(values, ops.convert_to_tensor(self._statistics_exponent.value))

    def _statistics_exponent_number(self):
        """The moving averages' exponent as a Python int (eager)."""
        return int(self._statistics_exponent.numpy())

    def _statistic_gradients(self, grads, variables):
        """What the statistics measure: the gradients themselves (AdaScaleAdam may precondition them)."""
        return grads

    def _update_variables(self, distribution, grads_and_vars, learning_rate):
        """The optimizer's `update_step(gradient, variable, learning_rate)` on every variable."""
        for grad, variable in grads_and_vars:
            self.update_step(grad, variable, learning_rate)

    def _assign_in_update(self, distribution, variable, value):
        self.assign(variable, value)

    def _apply_update(self, distribution, grads_and_vars, learning_rate, state):
        """A finite update: the update rule on every variable."""
        self._update_variables(distribution, grads_and_vars, learning_rate)

    def _replica_statistic(self, grads, trainable_variables, loss_scale=None):
        """One replica's sum of squares of what the statistics measure, a block number (in its train step).

        Of the gradients `apply` will see: divided by `loss_scale_factor` where one is set, as `apply` divides,
        and by `loss_scale` (a LossScaleOptimizer's dynamic scale, which divides before this optimizer sees them)."""
        divisor = self.loss_scale_factor
        if loss_scale is not None:
            divisor = loss_scale if divisor is None else loss_scale * divisor
        if divisor is not None:  # one division of each gradient, fused into the squares' reduction where traced
            grads = [g / ops.cast(divisor, g.dtype) for g in grads]
        return self._sqr_norm_sum(self._statistic_gradients(grads, trainable_variables))

    def _backend_apply_gradients(self, grads, trainable_variables):
        setting = self._scale_setting()
        counters_dtype = keras.backend.standardize_dtype(self._setting_counters.dtype)
        micro_step = ops.cast(ops.convert_to_tensor(self._iterations.value), counters_dtype)
        if self._incoming_statistic is not None:
            local = self._incoming_statistic  # the replicas', from AdaScaleModel's train step
        elif self._configuration.replicas > 1:
            raise ValueError(
                f"{type(self).__name__} under keras.distribution with {self._configuration.replicas} devices on "
                "the batch axis sees only the replicas' mean gradient in Keras's own train step: build the model "
                "as keras_adascale.AdaScaleModel (or AdaScaleSequential), whose train step gives it each "
                "replica's gradient statistics."
            )
        else:
            local = self._sqr_norm_sum(self._statistic_gradients(grads, trainable_variables))
        # Keras's `iterations` before this micro-step, as its EMA reads it (a copy: on PyTorch a view of a counter).
        updates_before = ops.copy(setting.updates) if self.use_ema else None
        self._apply_micro_batch(grads, trainable_variables, local, setting, micro_step)
        if self.use_ema:
            self._moving_average_step(updates_before)

    def _accumulators(self, trainable_variables):
        if not self._configuration.steps:
            return []
        return [self._accumulated_gradients[self._get_variable_index(v)] for v in trainable_variables]

    def _apply_micro_batch(self, grads, trainable_variables, local, setting, micro_step):
        """The backend's: adds a micro-batch (`local`: its statistic) to the accumulators and, on the one that
        completes an update, applies the update (JAX: `_traced_apply`; PyTorch: `_eager_apply`)."""
        raise NotImplementedError

    def _state_variables(self):
        return [self._state_floats, self._state_counters, self._setting_counters, self._setting_scales,
                self._statistics_exponent]

    def _written_variables(self):
        """The optimizer variables an update rule may write: its slots (momentum, Adam's moments...)."""
        own = {id(v) for v in [self._iterations, *self._state_variables()]}
        own |= {id(v) for v in getattr(self, "_accumulated_gradients", None) or []}
        if self._configuration.steps:
            own |= {id(self._sample_sqr_norm_accumulator), id(self._sample_count_accumulator)}
        if isinstance(self._learning_rate, keras.Variable):
            own.add(id(self._learning_rate))
        return [v for v in self.variables if id(v) not in own]

    def _mean_statistic(self, sums, micro_batches, trainable_variables, mean_statistic=None):
        """The block number of the squared norm of what the statistics measure of the mean gradient
        `sums / micro_batches` (`mean_statistic` where the backend computed it already), and a function that
        makes that mean gradient."""
        grads = [s / ops.cast(micro_batches, s.dtype) for s in sums]
        if mean_statistic is None:
            mean_statistic = self._sqr_norm_sum(self._statistic_gradients(grads, trainable_variables))
        return mean_statistic, lambda: grads

    def _statistics_step(self, sums, statistic_sum, trainable_variables, setting, micro_step, counted=None,
                         mean_statistic=None, gradients_function=False):
        """The update that completes at `micro_step`, up to its rule (pure). `statistic_sum` is the block
        number `(mantissa, exponent)` of the micro-batches' sums of squares, `counted` the count accumulator
        with them (None without accumulation); `mean_statistic`, where given, the block number of the mean
        gradient's, computed by the backend (see `_mean_statistic`).

        Returns:
            `(state, finite, clipped mean gradients, the new values of the state variables)`; with
            `gradients_function`, a function that makes the clipped mean gradients in their place (JAX traces
            it inside the update rule's branch: see `backend.jax.mechanics`).
        """
        dtype = self._statistics_dtype
        micro_batches = setting_lib.accumulated(setting, micro_step)
        mean_sqr_norm, mean = self._mean_statistic(sums, micro_batches, trainable_variables, mean_statistic)
        scale = ops.cast(setting_lib.update_scale(setting, micro_batches, TENSORS), dtype)
        state, exponent = self._read_state(), ops.convert_to_tensor(self._statistics_exponent.value)
        # The averages and both sums in one exponent: the largest of those that are not 0.
        averaged = ops.logical_or(state.variance_average != 0.0, state.sqr_norm_average != 0.0)
        common = _common_exponent([(averaged, exponent), (_present(statistic_sum[0]), statistic_sum[1]),
                                   (_present(mean_sqr_norm[0]), mean_sqr_norm[1])])
        state = state._replace(variance_average=_in_exponent(state.variance_average, exponent, common),
                               sqr_norm_average=_in_exponent(state.sqr_norm_average, exponent, common))
        statistic_sum, mean_sqr_norm = _in_exponent(*statistic_sum, common), _in_exponent(*mean_sqr_norm, common)
        state, finite = self._state_step(
            state, statistic_sum, mean_sqr_norm, ops.cast(self.learning_rate, "float32"),
            ops.cast(micro_batches, dtype) * float(self._configuration.replicas), scale, self._smoothing_tensor(scale),
            measured=None if counted is None else self._measured(counted, micro_batches),
        )
        # Renormalized: the larger average's mantissa near 1, so that the next sums, of any size, fit.
        shift = _floor_log2(ops.maximum(ops.abs(state.variance_average), ops.abs(state.sqr_norm_average)))
        state = state._replace(variance_average=ops.ldexp(state.variance_average, -shift),
                               sqr_norm_average=ops.ldexp(state.sqr_norm_average, -shift))
        exponent = common + shift
        # The setting advances whether or not the update was finite: its micro-batches are spent.
        next_setting = setting_lib.complete(setting, micro_step, TENSORS)
        counters, scales = setting_lib.values(next_setting, self._configuration, TENSORS,
                                              self._setting_counters.value, self._setting_scales.value)
        floats = ops.stack([ops.cast(getattr(state, f), dtype) for f in gain_lib.FLOAT_FIELDS])
        state_counters = ops.stack([getattr(state, f) for f in gain_lib.COUNTER_FIELDS])
        values = [floats, state_counters, ops.stack(counters), ops.stack(scales), exponent]
        def clipped():
            return super(AccumulationMechanics, self)._clip_gradients(mean())

        return state, finite, clipped if gradients_function else clipped(), values

