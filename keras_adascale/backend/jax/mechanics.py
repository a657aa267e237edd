"""AdaScale's mechanics on JAX: the update one branch of `lax.cond`, computed once per k micro-batches.

Keras's JAX optimizer computes the whole update at every micro-step and keeps one in k by selection
after the fact. Here the update is one branch of `keras.ops.cond` (`jax.lax.cond`), which runs only on
the k-th micro-step. The branches of a `lax.cond` may not assign variables, so both return the new
values of every variable the step writes, and the assignments come after the cond. Inside the update
branch the optimizer's own `update_step` (Keras's SGD, AdaScaleAdam's rule) runs unchanged in a
`keras.StatelessScope` that maps every variable of the optimizer and every trained one to its current
value and collects what it assigns (an `update_step` that read another variable would read its stored
value, which JAX's `fit` empties during an epoch).

Replicas: `AdaScaleModel`'s train step (`train_step`) hands the optimizer the replicas' statistic; see
`backend.common.mechanics`.
"""

import keras
from keras import ops

from keras_adascale import gain as gain_lib
from keras_adascale import setting as setting_lib
from keras_adascale.backend.common.block_float import (LARGEST_FAST_SUM, _counted_exponent, _in_exponent, _or_zero,
                                                       _present, _scaled_sqr_norm_sum, _squared_norm)
from keras_adascale.backend.common.mechanics import AccumulationMechanics
from keras_adascale.backend.jax.distribution import replicas_in_distribution


class AdaScaleMechanics(AccumulationMechanics):
    """The Keras optimizer hooks of AdaScale on JAX (replicas through `AdaScaleModel`, gradient accumulation)."""

    def _replicas_in_sync(self):
        """R, the devices on the batch axis of `keras.distribution`'s distribution."""
        return replicas_in_distribution()

    @staticmethod
    def _has_64_bits():
        """float64 tensors (for views such as tau): JAX only with `jax_enable_x64`."""
        import jax

        return bool(jax.config.jax_enable_x64)

    def _executing_eagerly(self):
        value = self.__dict__.get("_setting_counters")
        import jax

        return value is None or not isinstance(value.value, jax.core.Tracer)

    def _count_added(self):
        """What one micro-batch of all R replicas adds to the count accumulator (the replicas' increments), traced."""
        replicas = float(self._configuration.replicas)
        return ops.convert_to_tensor([replicas * i for i in self._count_increment()], "float32")

    def _sqr_norm_sum(self, tensors):
        """`sum_k ||t_k||^2` as a block number `(float32 mantissa, int32 exponent)`: the float32 sum where it
        lies in [1e-20, 1e20], else the sum over the tensors scaled by a power of two (`_scaled_sqr_norm_sum`)."""
        fast = sum(_squared_norm(t) for t in tensors)
        usable = ops.logical_and(ops.isfinite(fast), ops.logical_and(fast >= gain_lib.SMALLEST_FAST_SUM,
                                                                     fast <= LARGEST_FAST_SUM))
        return ops.cond(usable, lambda: (fast, ops.zeros((), "int32")), lambda: _scaled_sqr_norm_sum(tensors))

    def _statistic_of_sum(self, total):
        """`_replica_statistic` of a sum of squares computed elsewhere (`AdaScaleModel(groups=n)`'s one-pass group
        norms, float32): the block number `(mantissa, exponent)` of `total` over `loss_scale_factor` squared."""
        import jax.numpy as jnp

        if self.loss_scale_factor is not None:
            total = total / float(self.loss_scale_factor) ** 2
        mantissa, exponent = jnp.frexp(ops.cast(total, "float32"))
        return mantissa, ops.cast(exponent, "int32")

    @staticmethod
    def _sum_over_axis(statistic, axis):
        """The block numbers of the replicas along the mesh axis `axis`, summed (inside `shard_map`)."""
        import jax

        mantissa, exponent = statistic
        common = _or_zero(jax.lax.pmax(_counted_exponent(_present(mantissa), exponent), axis))
        return jax.lax.psum(_in_exponent(mantissa, exponent, common), axis), common

    def _apply_micro_batch(self, grads, trainable_variables, local, setting, micro_step):
        self._traced_apply(grads, trainable_variables, local, setting, micro_step)

    def _traced_apply(self, grads, trainable_variables, local, setting, micro_step):
        """JAX (traced): the update is one branch of `lax.cond`, run on the micro-batch that completes it; both
        branches return the new values of every variable the step may write, assigned after the cond."""
        accumulators = self._accumulators(trainable_variables)
        configured = bool(accumulators)
        if configured:
            sums = [ops.convert_to_tensor(a.value) + ops.cast(g, a.dtype) for a, g in zip(accumulators, grads)]
            accumulated = self._accumulated_statistic(
                ops.convert_to_tensor(self._sample_sqr_norm_accumulator.value), local)
            statistic_sum = (accumulated[0], ops.cast(accumulated[1], "int32"))
            counted = ops.convert_to_tensor(self._sample_count_accumulator.value) + self._count_added()
            accumulators = accumulators + [self._sample_sqr_norm_accumulator, self._sample_count_accumulator]
        else:
            sums, statistic_sum, counted = list(grads), local, None
        rule_variables = list(trainable_variables) + self._written_variables()
        targets = rule_variables + accumulators + self._state_variables()

        def update():
            state, finite, mean_grads, values = self._statistics_step(sums, statistic_sum, trainable_variables,
                                                                      setting, micro_step, counted)
            updated = self._updated_values(rule_variables, mean_grads, trainable_variables, state, finite)
            # the accumulators start the next update from zero
            zeros = ([ops.zeros_like(s) for s in sums] + [ops.zeros_like(accumulated), ops.zeros_like(counted)]
                     if configured else [])
            return updated + zeros + values

        def accumulate():
            return ([ops.convert_to_tensor(v.value) for v in rule_variables] + sums + [accumulated, counted]
                    + [ops.convert_to_tensor(v.value) for v in self._state_variables()])

        if configured:
            values = ops.cond(setting_lib.is_update_step(setting, micro_step), update, accumulate)
        else:
            values = update()
        for variable, value in zip(targets, values):
            variable.assign(value)

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
