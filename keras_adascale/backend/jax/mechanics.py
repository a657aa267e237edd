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
from keras_adascale.backend.common.block_float import (LARGEST_FAST_SUM, _counted_exponent, _in_exponent,
                                                       _largest_of, _or_zero, _present, _scaled_sqr_norm_sum,
                                                       _squared_norm)
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

    def _sqr_norm_sum(self, tensors, largest=None):
        """`sum_k ||t_k||^2` as a block number `(float32 mantissa, int32 exponent)`: the float32 sum where it
        lies in [1e-20, 1e20], else the sum over the tensors scaled by a power of two (`_scaled_sqr_norm_sum`).

        `tensors` is a list, or a function that makes one: then traced apart in the fast sum and in the
        fallback's branch, so that what makes them (the mean gradient's division) fuses into each reduction
        instead of being an operand of the cond. `largest`, a function, makes the fallback's stand-in for
        max|t| (see `_scaled_sqr_norm_sum`) from tensors held anyway: then no tensor that `tensors` makes has
        two readers, which XLA keeps as a buffer of the gradients' size (in a branch that runs only for
        extreme gradients, but in every step's temporary memory)."""
        make = tensors if callable(tensors) else (lambda: tensors)
        fast = sum(_squared_norm(t) for t in make())
        return ops.cond(self._fast_sum_usable(fast), lambda: (fast, ops.zeros((), "int32")),
                        lambda: _scaled_sqr_norm_sum(make(), None if largest is None else largest()))

    @staticmethod
    def _fast_sum_usable(fast):
        """Whether a float32 sum of squares is its block number's mantissa (exponent 0): in [1e-20, 1e20]."""
        return ops.logical_and(ops.isfinite(fast), ops.logical_and(fast >= gain_lib.SMALLEST_FAST_SUM,
                                                                   fast <= LARGEST_FAST_SUM))

    @staticmethod
    def _mean_function(sums, micro_batches):
        """A function that makes the mean gradient `sums / micro_batches` where it is traced."""

        def mean():
            return [s / ops.cast(micro_batches, s.dtype) for s in sums]

        return mean

    def _mean_largest(self, sums, micro_batches, trainable_variables):
        """A function that makes the mean's stand-in for max|t| in `_sqr_norm_sum`: that of `sums`, over
        `micro_batches` (off by rounding at most: well within the factor of 2 `_scaled_sqr_norm_sum` allows)."""
        return lambda: (_largest_of(self._statistic_gradients(sums, trainable_variables))
                        / ops.cast(micro_batches, "float32"))

    def _mean_statistic(self, sums, micro_batches, trainable_variables, mean_statistic=None):
        """`AccumulationMechanics._mean_statistic` without a buffer for the mean gradient: its division is
        traced into each reduction of its squared norm and, through the returned function, into the update
        rule's branch (XLA fuses it there)."""
        mean = self._mean_function(sums, micro_batches)
        if mean_statistic is None:
            mean_statistic = self._sqr_norm_sum(lambda: self._statistic_gradients(mean(), trainable_variables),
                                                self._mean_largest(sums, micro_batches, trainable_variables))
        return mean_statistic, mean

    def _paired_statistics(self, grads, trainable_variables, micro_batches):
        """`(the statistic of grads, the statistic of grads / micro_batches)`, the block numbers `_sqr_norm_sum`
        gives, for one sample without accumulation (Keras's own train step): one pass over the gradients and one
        cond, where `micro_batches` is 1 (always, but for a counter set by hand) and the fast sum is usable, the
        mean then being `grads` to the last bit and both statistics that sum."""

        def measured():
            return self._statistic_gradients(grads, trainable_variables)

        def separately():
            mean = self._mean_function(grads, micro_batches)
            return (self._sqr_norm_sum(measured),
                    self._sqr_norm_sum(lambda: self._statistic_gradients(mean(), trainable_variables),
                                       self._mean_largest(grads, micro_batches, trainable_variables)))

        fast = sum(_squared_norm(t) for t in measured())
        usable = ops.logical_and(self._fast_sum_usable(fast), micro_batches == 1)
        zero = ops.zeros((), "int32")
        return ops.cond(usable, lambda: ((fast, zero), (fast, zero)), separately)

    def _statistic_of_sum(self, total, loss_scale=None):
        """`_replica_statistic` of a sum of squares computed elsewhere (`AdaScaleModel(groups=n)`'s one-pass group
        norms, float32): the block number `(mantissa, exponent)` of `total` over `loss_scale_factor` squared (and
        over `loss_scale` squared: a LossScaleOptimizer's dynamic scale)."""
        import jax.numpy as jnp

        if self.loss_scale_factor is not None:
            total = total / float(self.loss_scale_factor) ** 2
        if loss_scale is not None:
            loss_scale = ops.cast(loss_scale, "float32")
            total = total / loss_scale / loss_scale  # no square: a scale of 2^64 or more stays finite
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
        mean_statistic = None
        if not configured and self._incoming_statistic is None:
            # Keras's own train step: `local` is the statistic of `sums` themselves, taken again here with the
            # mean's in one pass (XLA drops the first).
            statistic_sum, mean_statistic = self._paired_statistics(
                sums, trainable_variables, setting_lib.accumulated(setting, micro_step))
        rule_variables = list(trainable_variables) + self._written_variables()
        targets = rule_variables + accumulators + self._state_variables()

        def update():
            state, finite, mean_grads, values = self._statistics_step(sums, statistic_sum, trainable_variables,
                                                                      setting, micro_step, counted,
                                                                      mean_statistic, gradients_function=True)
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
        `keras.StatelessScope` that maps every variable to its current value; the old ones where not finite.
        `grads` makes the gradients the rule applies (a function: traced inside the rule's branch, so that the
        mean gradient's division fuses into the rule rather than being the cond's operand).

        The choice is a `lax.cond`, not a `where` over every value: with the rule inside a branch, XLA writes
        each new value in place of the old (the donated state) as in Keras's own step, where a `where` made
        it keep a copy of every slot the rule reads after writing it (SGD's momentum: the gradients' size)."""
        current = [ops.convert_to_tensor(v.value) for v in rule_variables]
        mapped = {id(v) for v in rule_variables}
        mapping = list(zip(rule_variables, current))
        mapping += [(v, ops.convert_to_tensor(v.value)) for v in self.variables if id(v) not in mapped]

        def update():
            with keras.StatelessScope(state_mapping=mapping) as scope:
                self._apply_update(None, list(zip(grads(), trainable_variables)), state.effective_learning_rate,
                                   state)
            return [ops.cast(scope.get_current_value(v), old.dtype) for v, old in zip(rule_variables, current)]

        return list(ops.cond(finite, update, lambda: current))
