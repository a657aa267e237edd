"""Replica and accumulation mechanics: per-sample squared norms, one all-reduce, per-replica accumulators.

`AdaScaleMechanics` holds the Keras optimizer hooks that gather AdaScale's statistic where the
gradients are: it is mixed in before a Keras optimizer class (see `AdaScaleSGD`) and hands the
reduced values to the pure `gain.step`.
"""

import inspect

import keras
import numpy as np
import tensorflow as tf

from keras_adascale import gain as gain_lib
from keras_adascale import keras_fixes
from keras_adascale import numerics
from keras_adascale import setting as setting_lib
from keras_adascale.numerics import TENSORS

# A float64 sum of squares travels inside the float32 gradients' all-reduce as two float32
# words scaled by powers of two (float32 alone spans 1e-38..3e38), so a sum of squares of gradients
# from 1e-30 to 1e30 arrives to float32 precision.
_SMALL_WORD_SCALE = numerics.SMALL_WORD_SCALE
_LARGE_WORD_SCALE = numerics.LARGE_WORD_SCALE


def _xla_available():
    """Whether the state step is XLA-compiled: where the machine has an accelerator, as Keras's
    `jit_compile="auto"` decides (Keras turns XLA off on CPU-only machines: it is slower there, and
    TensorFlow would log "Compiled cluster using XLA!" for a run whose model is not compiled)."""
    return any(device.device_type != "CPU" for device in tf.config.list_physical_devices())


def _dense(tensor, dtype):
    if isinstance(tensor, tf.IndexedSlices):  # repeated rows add up before squaring
        tensor = tf.IndexedSlices(tf.cast(tensor.values, dtype), tensor.indices, tensor.dense_shape)
    return tf.cast(tf.convert_to_tensor(tensor), dtype)


def _sum_of_squares(tensors, dtype):
    # l2_loss is one fused kernel (sum(t^2) / 2), faster than square + reduce_sum.
    return tf.add_n([2.0 * tf.cast(tf.nn.l2_loss(t), dtype) for t in tensors])


def sqr_norm_sum(tensors, dtype="float64"):
    """`sum_k ||t_k||^2` over a list of tensors, accurate in `dtype`.

    With `dtype=tf.float64` the squares are first summed in float32 (fast, one
    fused kernel per tensor) and the total kept in float64; only when that
    total overflows (or is NaN) or is below 1e-20, where float32 squares may
    have underflowed, is the sum redone with every element cast to float64. So
    any float16, bfloat16 or float32 gradient from 1e-150 to 1e150 gives its
    squared norm to float32 precision at float32 cost, and a NaN or Inf
    anywhere gives a non-finite sum. `IndexedSlices` are densified first,
    since rows may repeat and the norm is that of the dense gradient.

    Args:
        tensors: list of `tf.Tensor` or `tf.IndexedSlices`.
        dtype: `tf.float64`, or `tf.float32` (TPUs): a plain float32 sum.

    Returns:
        A scalar of dtype `dtype`.
    """
    if tf.as_dtype(dtype) == tf.float32:
        return _sum_of_squares([_dense(t, tf.float32) for t in tensors], tf.float32)
    fast = _sum_of_squares(
        [_dense(t, tf.float64 if t.dtype == tf.float64 else tf.float32) for t in tensors], tf.float64
    )
    return tf.cond(
        tf.logical_and(tf.math.is_finite(fast), fast >= gain_lib.SMALLEST_FAST_SUM),
        lambda: fast,
        lambda: _sum_of_squares([_dense(t, tf.float64) for t in tensors], tf.float64),
    )


def encode_statistic(statistic, dtype):
    """The statistic as the `dtype` tensors that travel beside gradients of that dtype.

    Args:
        statistic: scalar sum of squares in the statistics dtype (float64, or float32 on TPU).
        dtype: the gradients' dtype.

    Returns:
        A list of tensors of `dtype`, to be summed over replicas and read by `decode_statistic`,
        or None where the statistic cannot share the gradients' all-reduce (float16 or bfloat16
        gradients, which are rare: Keras keeps float32 variables under mixed precision).
    """
    if dtype == statistic.dtype:
        return [statistic]
    if dtype == tf.float32 and statistic.dtype == tf.float64:
        # Casting to float32 overflows to inf or underflows to 0 where a word is out of range.
        return [tf.cast(tf.stack([statistic * _SMALL_WORD_SCALE, statistic * _LARGE_WORD_SCALE]), tf.float32)]
    return None


def decode_statistic(words, dtype):
    """The summed statistic from its summed words (see `encode_statistic`), in `dtype`."""
    (words,) = words
    if words.shape.rank == 0:
        return tf.cast(words, dtype)
    words = tf.cast(words, dtype)
    # An inf or NaN in the sum makes both words non-finite, and the large word carries it.
    return tf.where(tf.math.is_finite(words[0]), words[0] / _SMALL_WORD_SCALE, words[1] / _LARGE_WORD_SCALE)


def _distinct(tensor):
    # MirroredStrategy's all-reduce hands back unsummed a tensor object that every replica
    # passed (keras's optimizer_distribute_test passes one gradient tensor to all replicas),
    # while it sums per-replica tensors: identity makes every input per-replica, so the
    # gradients and the statistic computed from them are reduced alike.
    if isinstance(tensor, tf.IndexedSlices):
        return tf.IndexedSlices(tf.identity(tensor.values), tensor.indices, tensor.dense_shape)
    return tf.identity(tensor)


def all_reduce(gradients, local_sqr_norm_sum):
    """Sums the replicas' gradients and their sums of squared norms, in one all-reduce.

    Must run in replica context (inside `strategy.run`, `model.fit`, or with no
    strategy at all). Keras scales each replica's loss by 1/replicas, so each
    replica holds `g_i / R`; the sum over replicas is then the mean gradient.
    With one replica nothing is reduced.

    Args:
        gradients: list of the replica's local gradients (one dtype, as Keras requires).
        local_sqr_norm_sum: scalar, the replica's sum of squared norms (statistics dtype).

    Returns:
        `(reduced_gradients, reduced_sqr_norm_sum, num_replicas)`.

    Raises:
        RuntimeError: if called in cross-replica context with several replicas,
            where the per-replica samples are no longer visible.
    """
    replica_context = tf.distribute.get_replica_context()
    if replica_context is None:
        if tf.distribute.get_strategy().num_replicas_in_sync > 1:
            raise RuntimeError(
                "An AdaScale optimizer's apply_gradients must be called in replica context "
                "(inside `strategy.run`), where each replica's gradient is a "
                "sample: it was called in cross-replica context."
            )
        return list(gradients), local_sqr_norm_sum, 1
    replicas = replica_context.num_replicas_in_sync
    if replicas == 1:
        return list(gradients), local_sqr_norm_sum, 1
    gradients = [_distinct(g) for g in gradients]
    words = encode_statistic(local_sqr_norm_sum, gradients[0].dtype)
    if words is None:
        reduced = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
        sqr_norm_sum = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, local_sqr_norm_sum)
        return reduced, sqr_norm_sum, replicas
    reduced = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, gradients + words)
    count = len(gradients)
    return reduced[:count], decode_statistic(reduced[count:], local_sqr_norm_sum.dtype), replicas


# Keras 3.10 moved the count of `_iterations` from `_backend_apply_gradients` into `apply`, and
# gave `keras.Variable` its `synchronization` argument.
_KERAS_APPLY_COUNTS_ITERATIONS = tuple(int(part) for part in keras.version().split(".")[:2]) >= (3, 10)
_KERAS_VARIABLE_TAKES_SYNCHRONIZATION = "synchronization" in inspect.signature(keras.Variable.__init__).parameters


class _OnReadVariable(keras.Variable):
    """A Keras variable held once per replica and summed on read, for Keras releases whose
    `keras.Variable` has no `synchronization` argument (and makes every variable mirrored)."""

    def _initialize(self, value):
        self._value = tf.Variable(
            value,
            dtype=self._dtype,
            trainable=False,
            name=self.name,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.SUM,
        )

    def _initialize_with_initializer(self, initializer):
        self._initialize(lambda: initializer(self._shape, dtype=self._dtype))


def _tf_variable(variable):
    """The tf.Variable behind a Keras variable. Not `isinstance(v, keras.Variable)`: in Keras < 3.10
    (3.5 at least) layers make variables of a backend class that `keras.Variable` only derives from."""
    return variable if isinstance(variable, tf.Variable) else variable.value


class AdaScaleMechanics:
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

    # What `base.AdaScaleBase` asks of the backend's mechanics (`functional.AdaScaleMechanics` has the same).

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

    def _add_statistic_accumulator(self, variables):
        """The per-replica accumulator of the micro-batches' sums of squares (in the words it travels as)."""
        dtypes = {tf.as_dtype(v.dtype) for v in variables}
        # The statistic travels in the gradients' all-reduce, in their dtype where it can.
        self._statistic_words_dtype = dtypes.pop() if len(dtypes) == 1 else None
        words = encode_statistic(tf.zeros((), self._statistics_dtype), self._statistic_words_dtype)
        words = words[0] if words is not None else tf.zeros((), self._statistics_dtype)
        return self._add_replica_local_variable(words.shape, words.dtype, "sample_sqr_norm_accumulator")

    def _add_count_accumulator(self):
        """The per-replica count of what entered the accumulators (in the statistic's words' dtype, to travel
        in the same all-reduce)."""
        return self._add_replica_local_variable((2,), self._sample_sqr_norm_accumulator.dtype,
                                                "sample_count_accumulator")

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


    def _add_replica_local_variable(self, shape, dtype, name):
        variable_class = keras.Variable if _KERAS_VARIABLE_TAKES_SYNCHRONIZATION else _OnReadVariable
        options = {"synchronization": "on_read"} if _KERAS_VARIABLE_TAKES_SYNCHRONIZATION else {}
        with keras.name_scope(self.name, caller=self):
            variable = variable_class(
                initializer=keras.initializers.Zeros(),
                shape=shape,
                dtype=dtype,
                trainable=False,
                aggregation="sum",
                name=name,
                **options,
            )
        self._track_variable(variable)
        return variable

    def add_variable_from_reference(self, reference_variable, name=None, initializer="zeros"):
        if name != "gradient_accumulator":
            return super().add_variable_from_reference(reference_variable, name, initializer)
        with self._strategy.extended.colocate_vars_with(reference_variable.value):
            return self._add_replica_local_variable(
                reference_variable.shape,
                reference_variable.dtype,
                f"{reference_variable.path.replace('/', '_')}_{name}",
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
