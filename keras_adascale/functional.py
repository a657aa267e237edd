"""Accumulation mechanics on JAX and PyTorch: one update per k micro-batches, computed once, as values.

`AdaScaleMechanics` is mixed in before a Keras optimizer class, as `distribute.AdaScaleMechanics` is on
TensorFlow, and gives `base.AdaScaleBase` the same hooks. Each micro-batch's gradient is added to an
accumulator and its squared norm to a statistic accumulator; on the micro-batch that completes an
update (the scale setting's `is_update_step`: k is a variable, so a change of k needs no retrace),
the mean gradient, the statistics, the gain, tau and the update rule run once.

Keras's JAX optimizer computes the whole update at every micro-step and keeps one in k by selection
after the fact. Here, on JAX, the update is one branch of `keras.ops.cond` (`jax.lax.cond`), which runs
only on the k-th micro-step. The branches of a `lax.cond` may not assign variables, so both return the
new values of every variable the step writes, and the assignments come after the cond. Inside the
update branch the optimizer's own `update_step` (Keras's SGD, AdaScaleAdam's rule) runs unchanged in a
`keras.StatelessScope` that maps every variable of the optimizer and every trained one to its current
value and collects what it assigns (an `update_step` that read another variable would read its stored
value, which JAX's `fit` empties during an epoch). PyTorch is eager: a Python `if` on the
micro-batch that completes an update, and the accumulation and the update rule in place.

One replica: under `keras.distribution.DataParallel` the optimizer sees the all-reduced mean gradient
of each micro-batch, so N = k. Per-replica statistics on JAX need a train step of their own.
"""

import keras
from keras import ops

from keras_adascale import gain as gain_lib
from keras_adascale import setting as setting_lib
from keras_adascale.numerics import TENSORS

def _squared_norm(tensor, dtype):
    """`||t||^2` in `dtype`: one dot product of the flattened tensor with itself (no tensor of squares)."""
    flat = ops.reshape(ops.cast(tensor, dtype), [-1])
    return ops.vdot(flat, flat)


def _x64_enabled():
    import jax

    return bool(jax.config.jax_enable_x64)


class AdaScaleMechanics:
    """The Keras optimizer hooks of AdaScale on JAX and PyTorch (one replica, gradient accumulation)."""

    # What `base.AdaScaleBase` asks of the backend's mechanics (`distribute.AdaScaleMechanics` has the same).

    @staticmethod
    def _strategy_in_scope():
        return None

    def _replicas_in_sync(self):
        return 1

    @staticmethod
    def _has_64_bits():
        """float64 and int64 tensors: PyTorch has them but on Apple's MPS (where Keras places tensors when
        there is no CUDA device); JAX only with `jax_enable_x64`."""
        if keras.backend.backend() == "jax":
            return _x64_enabled()
        import torch

        return torch.cuda.is_available() or not torch.backends.mps.is_available()

    def _choose_statistics_dtype(self):
        # float64 statistics square any float32 gradient without overflow or underflow where the backend
        # has float64; JAX without x64 turns a float64 request into float32 (with a warning): ask for that.
        return "float64" if self._has_64_bits() else "float32"

    def _choose_counters_dtype(self):
        return "int64" if self._has_64_bits() else "int32"

    @staticmethod
    def _compiled_state_step(step):
        return step  # inside the backend's compiled train step already (JAX), or eager (PyTorch)

    def _executing_eagerly(self):
        value = self.__dict__.get("_setting_counters")
        if keras.backend.backend() == "jax":
            import jax

            return value is None or not isinstance(value.value, jax.core.Tracer)
        import torch

        return not torch.compiler.is_compiling()

    def _enable_backend_fixes(self):
        # Keras counts the micro-step in `apply`, after `_backend_apply_gradients`, from 3.10 on; before, it
        # counted it in the method this class replaces (the TensorFlow mechanics count it there themselves).
        if tuple(int(part) for part in keras.__version__.split(".")[:2]) < (3, 10):
            raise RuntimeError(
                f"{type(self).__name__} on the {keras.backend.backend()} backend needs Keras 3.10 or newer "
                f"(this is Keras {keras.__version__}): pip install 'keras>=3.10'."
            )

    def _check_strategy(self):
        return

    @staticmethod
    def _dense_gradient(gradient):
        return gradient

    def _add_statistic_accumulator(self, variables):
        """The accumulator of the micro-batches' sums of squares, in the statistics dtype."""
        return self.add_variable((), initializer="zeros", dtype=self._statistics_dtype,
                                 name="sample_sqr_norm_accumulator")

    # Keras's hooks.

    def build(self, variables):
        if self.built:
            return
        if self.use_ema:
            raise ValueError(
                f"{type(self).__name__} does not support `use_ema=True` on the {keras.backend.backend()} "
                "backend yet (it does on TensorFlow)."
            )
        super().build(variables)

    def _clip_gradients(self, grads):
        # Clipping happens on the mean gradient of the update.
        return grads

    def _apply_weight_decay(self, variables):
        # Weight decay happens in update_step, with the gain-scaled rate.
        return

    def _sqr_norm_sum(self, tensors):
        """`sum_k ||t_k||^2` in the statistics dtype: float32 squares summed into a float64 total, redone
        in float64 where that total is not finite or below 1e-20 (as `distribute.sqr_norm_sum`)."""
        dtype = self._statistics_dtype
        if dtype == "float32":
            return sum(_squared_norm(t, "float32") for t in tensors)

        def fast_dtype(t):
            return "float64" if keras.backend.standardize_dtype(t.dtype) == "float64" else "float32"

        fast = sum(ops.cast(_squared_norm(t, fast_dtype(t)), "float64") for t in tensors)
        return ops.cond(
            ops.logical_and(ops.isfinite(fast), fast >= gain_lib.SMALLEST_FAST_SUM),
            lambda: fast,
            lambda: sum(_squared_norm(t, "float64") for t in tensors),
        )

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

    def _backend_apply_gradients(self, grads, trainable_variables):
        setting = self._scale_setting()
        counters_dtype = keras.backend.standardize_dtype(self._setting_counters.dtype)
        micro_step = ops.cast(ops.convert_to_tensor(self._iterations.value), counters_dtype)
        local = self._sqr_norm_sum(self._statistic_gradients(grads, trainable_variables))
        if keras.backend.backend() == "torch":
            self._eager_apply(grads, trainable_variables, local, setting, micro_step)
        else:
            self._traced_apply(grads, trainable_variables, local, setting, micro_step)

    def _accumulators(self, trainable_variables):
        if not self._configuration.steps:
            return []
        return [self._accumulated_gradients[self._get_variable_index(v)] for v in trainable_variables]

    def _eager_apply(self, grads, trainable_variables, local, setting, micro_step):
        """PyTorch (eager): accumulate in place; on the micro-batch that completes an update (one read of a
        scalar), the statistics, then the update rule in place where the gradients are finite."""
        accumulators = self._accumulators(trainable_variables)
        if accumulators:
            # In place (Keras's `assign_add` on PyTorch makes a new tensor and copies it back).
            for accumulator, grad in zip(accumulators, grads):
                accumulator.value.add_(ops.cast(grad, accumulator.dtype))
            self._sample_sqr_norm_accumulator.value.add_(local)
            if not bool(setting_lib.is_update_step(setting, micro_step)):
                return
            sums = [ops.convert_to_tensor(a.value) for a in accumulators]
            statistic_sum = ops.convert_to_tensor(self._sample_sqr_norm_accumulator.value)
        else:
            sums, statistic_sum = list(grads), local
        state, finite, grads, values = self._statistics_step(sums, statistic_sum, trainable_variables, setting,
                                                             micro_step)
        if bool(finite):
            self._apply_update(None, list(zip(grads, trainable_variables)), state.effective_learning_rate, state)
        for variable, value in zip(self._state_variables(), values):
            variable.assign(value)
        for accumulator in accumulators + ([self._sample_sqr_norm_accumulator] if accumulators else []):
            accumulator.value.zero_()

    def _traced_apply(self, grads, trainable_variables, local, setting, micro_step):
        """JAX (traced): the update is one branch of `lax.cond`, run on the micro-batch that completes it; both
        branches return the new values of every variable the step may write, assigned after the cond."""
        accumulators = self._accumulators(trainable_variables)
        configured = bool(accumulators)
        if configured:
            sums = [ops.convert_to_tensor(a.value) + ops.cast(g, a.dtype) for a, g in zip(accumulators, grads)]
            statistic_sum = ops.convert_to_tensor(self._sample_sqr_norm_accumulator.value) + local
            accumulators = accumulators + [self._sample_sqr_norm_accumulator]
        else:
            sums, statistic_sum = list(grads), local
        rule_variables = list(trainable_variables) + self._written_variables()
        targets = rule_variables + accumulators + self._state_variables()

        def update():
            state, finite, mean_grads, values = self._statistics_step(sums, statistic_sum, trainable_variables,
                                                                      setting, micro_step)
            updated = self._updated_values(rule_variables, mean_grads, trainable_variables, state, finite)
            # the accumulators start the next update from zero
            zeros = [ops.zeros_like(s) for s in sums] + [ops.zeros_like(statistic_sum)] if configured else []
            return updated + zeros + values

        def accumulate():
            return ([ops.convert_to_tensor(v.value) for v in rule_variables] + sums + [statistic_sum]
                    + [ops.convert_to_tensor(v.value) for v in self._state_variables()])

        if configured:
            values = ops.cond(setting_lib.is_update_step(setting, micro_step), update, accumulate)
        else:
            values = update()
        for variable, value in zip(targets, values):
            variable.assign(value)

    def _state_variables(self):
        return [self._state_floats, self._state_counters, self._setting_counters, self._setting_scales]

    def _written_variables(self):
        """The optimizer variables an update rule may write: its slots (momentum, Adam's moments...)."""
        own = {id(v) for v in [self._iterations, *self._state_variables()]}
        own |= {id(v) for v in getattr(self, "_accumulated_gradients", None) or []}
        if self._configuration.steps:
            own.add(id(self._sample_sqr_norm_accumulator))
        if isinstance(self._learning_rate, keras.Variable):
            own.add(id(self._learning_rate))
        return [v for v in self.variables if id(v) not in own]

    def _statistics_step(self, sums, statistic_sum, trainable_variables, setting, micro_step):
        """The update that completes at `micro_step`, up to its rule (pure).

        Returns:
            `(state, finite, clipped mean gradients, the new values of the state variables)`.
        """
        dtype = self._statistics_dtype
        micro_batches = setting_lib.accumulated(setting, micro_step)
        grads = [s / ops.cast(micro_batches, s.dtype) for s in sums]
        mean_sqr_norm = self._sqr_norm_sum(self._statistic_gradients(grads, trainable_variables))
        scale = ops.cast(setting_lib.update_scale(setting, micro_batches, TENSORS), dtype)
        state, finite = self._state_step(
            self._read_state(), statistic_sum, mean_sqr_norm, ops.cast(self.learning_rate, "float32"),
            ops.cast(micro_batches, dtype), scale, self._smoothing_tensor(scale),
        )
        # The setting advances whether or not the update was finite: its micro-batches are spent.
        next_setting = setting_lib.complete(setting, micro_step, TENSORS)
        counters, scales = setting_lib.values(next_setting, self._configuration, TENSORS,
                                              self._setting_counters.value, self._setting_scales.value)
        floats = ops.stack([ops.cast(getattr(state, f), dtype) for f in gain_lib.FLOAT_FIELDS])
        state_counters = ops.stack([getattr(state, f) for f in gain_lib.COUNTER_FIELDS])
        values = [floats, state_counters, ops.stack(counters), ops.stack(scales)]
        return state, finite, super()._clip_gradients(grads), values

    def _updated_values(self, rule_variables, grads, trainable_variables, state, finite):
        """The rule's new values of `rule_variables` (pure): the optimizer's own `update_step` in a
        `keras.StatelessScope` that maps every variable to its current value; the old ones where not finite."""
        current = [ops.convert_to_tensor(v.value) for v in rule_variables]
        mapped = {id(v) for v in rule_variables}
        mapping = list(zip(rule_variables, current))
        mapping += [(v, ops.convert_to_tensor(v.value)) for v in self.variables if id(v) not in mapped]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self._apply_update(None, list(zip(grads, trainable_variables)), state.effective_learning_rate, state)
        return [ops.where(finite, scope.get_current_value(v), old) for v, old in zip(rule_variables, current)]
