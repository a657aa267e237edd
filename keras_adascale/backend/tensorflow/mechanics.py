"""AdaScale's mechanics on TensorFlow: per-sample squared norms, one all-reduce, per-replica accumulators.

`AdaScaleMechanics` holds the Keras optimizer hooks that gather AdaScale's statistic where the
gradients are: `base.AdaScaleBase` mixes it in before a Keras optimizer class (see `AdaScaleSGD`), and it
hands the reduced values to the pure `gain.step`. The statistic and its all-reduce are in `statistics`,
the per-replica accumulators in `variables`.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_adascale import gain as gain_lib
from keras_adascale import numerics
from keras_adascale import setting as setting_lib
from keras_adascale.backend.tensorflow import keras_fixes
from keras_adascale.backend.tensorflow.statistics import all_reduce, decode_statistic, encode_statistic, sqr_norm_sum
from keras_adascale.backend.tensorflow.variables import ReplicaLocalAccumulators, _tf_variable
from keras_adascale.numerics import TENSORS


def _xla_available():
    """Whether the state step is XLA-compiled: where the machine has an accelerator, as Keras's
    `jit_compile="auto"` decides (Keras turns XLA off on CPU-only machines: it is slower there, and
    TensorFlow would log "Compiled cluster using XLA!" for a run whose model is not compiled)."""
    return any(device.device_type != "CPU" for device in tf.config.list_physical_devices())


# Keras 3.10 moved the count of `_iterations` from `_backend_apply_gradients` into `apply`.
_KERAS_APPLY_COUNTS_ITERATIONS = tuple(int(part) for part in keras.version().split(".")[:2]) >= (3, 10)


class AdaScaleMechanics(ReplicaLocalAccumulators):
    """The Keras optimizer hooks that feed AdaScale, for a Keras optimizer class after it in the MRO.

    Where the update sees its N samples: each replica's local gradient (a
    sample, or with `gradient_accumulation_steps` one micro-batch of it) has
    its squared norm summed locally; one all-reduce carries the gradients and
    that statistic; `gain.step` turns the sums into the new state in one
    XLA-compiled call; one `merge_call` applies the update (or skips it) and
    writes the state.

    Accumulators are sync-on-read variables, one per replica, filled without a
    merge_call (Keras's mirrored accumulators need one inside a cond, which
    MirroredStrategy rejects: keras-team/keras#20582). Where the strategy needs
    a merge_call, the one merge_call comes first and the update branches in
    cross-replica context, with one batched all-reduce of the accumulators.

    `base.AdaScaleBase` provides `_strategy` (the strategy it was made under), `_statistics_dtype`, `_statistic_words_dtype`,
    `_read_state()`, `_state_assignments(distribution, state)`, `_state_step`
    (the compiled `gain.step`), `samples_per_update`, `scale`, `smoothing` and
    `_sample_sqr_norm_accumulator` (with accumulation); the optimizer gives the
    update rule (`update_step`).
    """

    # What `base.AdaScaleBase` asks of the backend's mechanics (JAX's and PyTorch's, whose base is
    # `backend.common.mechanics.AccumulationMechanics`, have the same).

    @staticmethod
    def _strategy_in_scope():
        return tf.distribute.get_strategy()

    def _replicas_in_sync(self):
        return self._strategy.num_replicas_in_sync

    @staticmethod
    def _has_64_bits():
        """float64 and int64 tensors (TensorFlow has them on every device it places them on)."""
        return True

    def _choose_statistics_dtype(self):
        # float64 statistics square any float32 gradient without overflow or underflow; TPUs have no float64.
        return "float32" if isinstance(self._strategy, tf.distribute.TPUStrategy) else "float64"

    def _choose_counters_dtype(self):
        return "int64"

    @staticmethod
    def _compiled_state_step(step):
        return tf.function(step, jit_compile=_xla_available())

    @staticmethod
    def _executing_eagerly():
        return tf.executing_eagerly()

    def _enable_backend_fixes(self):
        keras_fixes.enable_for(self._strategy)

    @staticmethod
    def _dense_gradient(gradient):
        """A gradient as a dense tensor (`IndexedSlices` summed into rows)."""
        return tf.convert_to_tensor(gradient)

    def _add_backend_state_variables(self):
        return  # float64 statistics (float32 under TPUStrategy): sums of squares need no exponent of their own

    @staticmethod
    def _statistics_in_units(values):
        return values

    @staticmethod
    def _statistics_exponent_number():
        return 0

    # A saved file's layout (see `base.AdaScaleBase.save_own_variables`).

    @staticmethod
    def _spent_sums(variable):
        """Whether `variable` is an accumulator holding sums already applied (kept by PyTorch's fused update)."""
        return False

    @staticmethod
    def _backend_only_variables():
        return []

    def _portable_floats(self, floats):
        return np.asarray(floats, np.float64)

    def _assign_floats(self, floats):
        self._state_floats.assign(floats.astype(self._statistics_dtype))

    def _statistic_number(self, words):
        """The saved statistic: each replica held g_i / R (the loss scaled by 1/R), a sample is g_i."""
        return numerics.decoded_words(words) * self._configuration.replicas**2

    def _statistic_value(self, number):
        return numerics.encoded_words(number / self._configuration.replicas**2,
                                      np.zeros(self._sample_sqr_norm_accumulator.shape,
                                               self._sample_sqr_norm_accumulator.dtype))

    def _check_strategy(self):
        if tf.distribute.has_strategy() and tf.distribute.get_strategy() is not self._strategy:
            raise ValueError(
                f"{type(self).__name__} was created outside the `strategy.scope()` it is used in, so "
                "it cannot see the replicas. Create the optimizer (and compile the model) "
                "inside `with strategy.scope():`."
            )


    def _setting_assignments(self, distribution, setting):
        """Writes `setting` (tensors) into its two variables, in cross-replica context."""

        def write(counters, setting, scales):
            counter_values, scale_values = setting_lib.values(setting, self._configuration, TENSORS,
                                                              counters, scales)
            self.assign(counters, tf.stack(counter_values))
            self.assign(scales, tf.stack(scale_values))

        distribution.extended.update(
            self._setting_counters.value, write, args=(setting, self._setting_scales.value), group=False,
        )


    def _state_assignments(self, distribution, state):
        """Writes `state` (possibly per replica) into the two state variables, in cross-replica context.

        Returns the variables' values read after the writes, for what must run after them.
        """

        def write(floats, counters, state):
            dtype = self._statistics_dtype
            self.assign(floats, tf.stack([tf.cast(getattr(state, f), dtype) for f in gain_lib.FLOAT_FIELDS]))
            self.assign(counters, tf.stack([getattr(state, f) for f in gain_lib.COUNTER_FIELDS]))
            # `self.assign` returns nothing; a read of a variable is ordered after its write.
            return [floats.read_value(), counters.read_value()]

        return distribution.extended.update(
            self._state_floats.value, lambda floats, state, counters: write(floats, counters, state),
            args=(state, self._state_counters.value), group=False,
        )


    def _clip_gradients(self, grads):
        # Clipping happens after the all-reduce, on the mean gradient: Keras would
        # clip each replica's share before the reduce.
        return grads

    def _apply_weight_decay(self, variables):
        # Weight decay happens in update_step, with the gain-scaled rate.
        return

    def _backend_apply_gradients(self, grads, trainable_variables):
        if not self._configuration.steps:
            super()._backend_apply_gradients(grads, trainable_variables)
            return
        # Keras's `iterations` before this micro-step, as its EMA reads it.
        updates_before = tf.identity(self._scale_setting().updates) if self.use_ema else None
        accumulators = [
            self._accumulated_gradients[self._get_variable_index(v)] for v in trainable_variables
        ]
        for grad, accumulator in zip(grads, accumulators):
            self.assign_add(accumulator, grad)
        self.assign_add(self._sample_sqr_norm_accumulator, self._local_statistic_words(grads, trainable_variables))
        self.assign_add(self._sample_count_accumulator,
                        tf.constant(self._count_increment(), self._sample_count_accumulator.dtype))
        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            learning_rate = self.learning_rate
            setting = self._scale_setting()
            tf.cond(
                self._is_update_step(setting),
                lambda: self._update_from_accumulators(accumulators, trainable_variables, learning_rate, setting),
                tf.no_op,
            )
        else:
            # The cond must not hold a merge_call: take the one merge_call first
            # and branch in cross-replica context.
            tf.distribute.get_replica_context().merge_call(
                self._cross_replica_update_from_accumulators,
                args=(accumulators, trainable_variables),
            )
        if not _KERAS_APPLY_COUNTS_ITERATIONS:
            # This replaces the method that counts the micro-step in Keras < 3.10.
            self.assign_add(self._iterations, 1)
        if self.use_ema:
            self._moving_average_step(updates_before)

    def _micro_step(self):
        return tf.cast(tf.convert_to_tensor(self._iterations), tf.int64)

    def _is_update_step(self, setting):
        # The count is a variable: a change of k needs no retrace.
        return setting_lib.is_update_step(setting, self._micro_step())

    def _next_setting(self, setting):
        """The setting after the update in progress completes: its pending count and S take effect."""
        return setting_lib.complete(setting, self._micro_step(), TENSORS)

    def _statistic_gradients(self, grads, variables):
        """What the statistics measure: the gradients themselves (AdaScaleAdam may precondition them)."""
        return grads

    def _local_statistic_words(self, grads, variables):
        """A micro-batch's sum of squares in the form the accumulator keeps (see `encode_statistic`)."""
        statistic = sqr_norm_sum(self._statistic_gradients(grads, variables), self._statistics_dtype)
        words = encode_statistic(statistic, self._statistic_words_dtype)
        return statistic if words is None else words[0]

    def _update_from_accumulators(self, accumulators, trainable_variables, learning_rate, setting):
        # Replica context, no merge_call needed (default strategy; XLA on GPU).
        grads = [tf.convert_to_tensor(a.value) for a in accumulators]
        micro_batches = setting_lib.accumulated(setting, self._micro_step())
        grads = [g / tf.cast(micro_batches, g.dtype) for g in grads]
        local_sqr_norm_sum = decode_statistic(
            [tf.convert_to_tensor(self._sample_sqr_norm_accumulator.value)], self._statistics_dtype
        )
        counted = tf.convert_to_tensor(self._sample_count_accumulator.value)
        replica_context = tf.distribute.get_replica_context()
        if replica_context is not None and replica_context.num_replicas_in_sync > 1:
            counted = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, counted)
        self._reduce_and_update(grads, local_sqr_norm_sum, trainable_variables, learning_rate, setting,
                                micro_batches, measured=self._measured(counted, micro_batches))
        for accumulator in accumulators + [self._sample_sqr_norm_accumulator, self._sample_count_accumulator]:
            self.assign(accumulator, tf.zeros_like(accumulator.value))
        return tf.no_op()

    def _cross_replica_update_from_accumulators(self, distribution, accumulators, trainable_variables):
        statistic_accumulator = self._sample_sqr_norm_accumulator
        count_accumulator = self._sample_count_accumulator

        def update():
            # Destinations on every replica's device make this one batched all-reduce,
            # the statistic's words and the count in the same buffer as the gradients where dtypes allow.
            pairs = [(a.value, v.value) for a, v in zip(accumulators, trainable_variables)]
            counts = [(statistic_accumulator.value, trainable_variables[0].value),
                      (count_accumulator.value, trainable_variables[0].value)]
            same_dtype = statistic_accumulator.dtype == accumulators[0].dtype
            if same_dtype:
                pairs += counts
            sums = distribution.extended.batch_reduce_to(tf.distribute.ReduceOp.SUM, pairs)
            if not same_dtype:
                sums += distribution.extended.batch_reduce_to(tf.distribute.ReduceOp.SUM, counts)
            sums = [distribution.experimental_local_results(s)[0] for s in sums]
            micro_batches = setting_lib.accumulated(setting, self._micro_step())
            grads = [s / tf.cast(micro_batches, s.dtype) for s in sums[:-2]]
            sample_sqr_norm_sum = decode_statistic(sums[-2:-1], self._statistics_dtype)
            state, finite, grads, learning_rate = self._adascale_step(
                grads, trainable_variables, sample_sqr_norm_sum, distribution.num_replicas_in_sync,
                self.learning_rate, setting, micro_batches, measured=self._measured(sums[-1], micro_batches),
            )
            self._apply_and_record(distribution, list(zip(grads, trainable_variables)), learning_rate, state, finite,
                                   self._next_setting(setting))
            for accumulator in accumulators + [statistic_accumulator, count_accumulator]:
                for component in distribution.experimental_local_results(accumulator.value):
                    self.assign(component, tf.zeros_like(component))
            return tf.no_op()

        setting = self._scale_setting()
        tf.cond(self._is_update_step(setting), update, tf.no_op)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # Without accumulation only: the accumulators carry their own statistic.
        local_sqr_norm_sum = sqr_norm_sum(
            self._statistic_gradients(grads, trainable_variables), self._statistics_dtype
        )
        self._reduce_and_update(grads, local_sqr_norm_sum, trainable_variables, learning_rate,
                                self._scale_setting(), 1)

    def _reduce_and_update(self, grads, local_sqr_norm_sum, trainable_variables, learning_rate, setting,
                           micro_batches, measured=None):
        """Replica context: one all-reduce, the state step, one merge_call to apply."""
        grads, sample_sqr_norm_sum, replicas = all_reduce(grads, local_sqr_norm_sum)
        # With one sample, the sample is the mean: no second pass over it.
        single_sample = replicas == 1 and not self._configuration.steps
        state, finite, grads, learning_rate = self._adascale_step(
            grads, trainable_variables, sample_sqr_norm_sum, replicas, learning_rate, setting, micro_batches,
            mean_sqr_norm=sample_sqr_norm_sum if single_sample else None, measured=measured,
        )
        tf.__internal__.distribute.interim.maybe_merge_call(
            self._apply_and_record,
            self._strategy,
            list(zip(grads, trainable_variables)),
            learning_rate,
            state,
            finite,
            self._next_setting(setting),
        )

    def _adascale_step(self, grads, variables, sample_sqr_norm_sum, replicas, learning_rate, setting,
                       micro_batches, mean_sqr_norm=None, measured=None):
        """Algorithm 1 on reduced values: `(new state, finite, clipped grads, effective learning rate)`.

        `micro_batches` is how many the update holds (its k, unless a restore into another
        configuration left more): N = replicas x micro_batches, S in its ratio to them.
        """
        dtype = self._statistics_dtype
        if mean_sqr_norm is None:
            mean_sqr_norm = sqr_norm_sum(self._statistic_gradients(grads, variables), dtype)
        # Each replica held g_i / R (loss scaled by 1/R): the samples are R times that.
        sample_sqr_norm_sum = sample_sqr_norm_sum * float(replicas**2)
        scale = tf.cast(setting_lib.update_scale(setting, micro_batches, TENSORS), dtype)
        state, finite = self._state_step(
            self._read_state(),
            sample_sqr_norm_sum,
            mean_sqr_norm,
            tf.cast(learning_rate, tf.float32),
            float(replicas) * tf.cast(micro_batches, dtype),
            scale,
            self._smoothing_tensor(scale),
            measured=measured,
        )
        return state, finite, super()._clip_gradients(grads), state.effective_learning_rate

    def _apply_and_record(self, distribution, grads_and_vars, learning_rate, state, finite, next_setting):
        """Cross-replica context: the update (where finite), then the state in one write per variable.

        `next_setting` is the `setting.ScaleSetting` after this update: written whether or not the
        update was finite (its micro-batches are spent either way).
        """
        grads_and_vars = [(g, _tf_variable(v)) for g, v in grads_and_vars]

        def first_replicas(value):  # identical on every replica
            if isinstance(value, tf.distribute.DistributedValues):
                return distribution.experimental_local_results(value)[0]
            return value

        finite, state, next_setting = tf.nest.map_structure(first_replicas, (finite, state, next_setting))

        def apply_finite_update():
            self._apply_update(distribution, grads_and_vars, learning_rate, state)
            return tf.no_op()

        tf.cond(finite, apply_finite_update, tf.no_op)
        self._setting_assignments(distribution, next_setting)
        assignments = self._state_assignments(distribution, state)
        if self.non_finite == "raise":
            # After the skip is recorded. XLA drops Assert: AdaScaleCallback raises there.
            with tf.control_dependencies(assignments):
                tf.debugging.Assert(finite, [f"{type(self).__name__}: NaN or Inf in the gradients (non_finite='raise')"])

    def _apply_update(self, distribution, grads_and_vars, learning_rate, state):
        """Cross-replica context, a finite update: the update rule on every variable."""
        self._update_variables(distribution, grads_and_vars, learning_rate)

    def _update_variables(self, distribution, grads_and_vars, learning_rate):
        """The optimizer's `update_step(gradient, variable, learning_rate)` on every variable."""
        self._distributed_tf_update_step(distribution, grads_and_vars, learning_rate)

    def _assign_in_update(self, distribution, variable, value):
        """`variable = value` inside an update (one value for every replica's copy)."""
        distribution.extended.update(variable.value, self.assign, args=(value,), group=False)
