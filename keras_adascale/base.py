"""What every AdaScale optimizer shares: S and N, the state, tau, the statistics' properties, config.

`AdaScaleBase` is mixed in before a Keras optimizer class (see `AdaScaleSGD`, `AdaScaleAdam`); it
stores `gain.AdaScaleState` in two variables and, through `distribute.AdaScaleMechanics`, feeds
the pure `gain.step` once per update. A subclass gives the update rule (`update_step`), the
learning-rate factor of the gain (`_learning_rate_scale`) and may change what the statistics
measure (`_statistic_gradients`) or what an applied update does besides (`_apply_update`).
"""

import functools
import warnings
from typing import NamedTuple

import keras
import tensorflow as tf

from keras_adascale import distribute, keras_fixes, validation
from keras_adascale import gain as gain_lib

_LearningRateSchedule = keras.optimizers.schedules.LearningRateSchedule

# How `gain.AdaScaleState` is stored: the statistics-dtype fields (float32 ones held exactly
# in it) in one variable, the int64 counters in another.
_FLOAT_FIELDS = (
    "variance_average", "sqr_norm_average", "average_weight", "gain", "tau_fraction", "effective_learning_rate",
)
_FLOAT32_FIELDS = ("gain", "tau_fraction", "effective_learning_rate")
_COUNTER_FIELDS = ("tau_whole", "skipped_updates")
# How S and the accumulation count are stored (see `ScaleSetting`): the counters in one int64
# variable, then the configuration they were made under (a restore into an optimizer made with
# another one takes the new configuration); S and its configured value in a statistics-dtype one.
_SETTING_COUNTERS = ("steps", "next_steps", "update_start", "updates", "configured_steps", "replicas")
_SETTING_SCALES = ("scale", "configured_scale")


class ScaleSetting(NamedTuple):
    """S and the accumulation count in effect, as tensors (see `AdaScaleBase.set_accumulation_steps`).

    Attributes:
        steps: int64, k, the micro-batches the update in progress accumulates.
        next_steps: int64, the k of the updates after it (a change made mid-update waits here).
        update_start: int64, the micro-step (`optimizer._iterations`) the update in progress began at.
        updates: int64, the updates completed (`optimizer.iterations` under accumulation).
        scale: S of the update in progress, statistics dtype.
    """

    steps: tf.Tensor
    next_steps: tf.Tensor
    update_start: tf.Tensor
    updates: tf.Tensor
    scale: tf.Tensor


def unique_name(prefix):
    """`prefix`, then `prefix_1`, `prefix_2`...: default names unique per session, as Keras makes them."""
    uid = keras.backend.get_uid(prefix)
    return prefix if uid == 1 else f"{prefix}_{uid - 1}"


class AdaScaleBase(distribute.AdaScaleMechanics):
    """S, N, the AdaScale state and its read-only views, for a Keras optimizer class after it in the MRO.

    Keyword arguments taken here (documented on each optimizer): `scale`,
    `smoothing`, `non_finite`; the rest go to the Keras optimizer.
    """

    # The learning-rate factor of a gain r: r for SGD (Algorithm 1), sqrt(r) for Adam.
    _learning_rate_scale = staticmethod(tf.identity)
    # The Keras optimizer that a run at S = 1 equals.
    _plain_optimizer = "SGD"
    # The arguments that decide which optimizer variables exist (named in a restore error).
    _shape_arguments = "`momentum`"

    def __init__(self, *, scale=None, smoothing=None, non_finite="skip", gradient_accumulation_steps=None, **kwargs):
        scale = validation.optional(validation.scale, scale)
        smoothing = validation.optional(validation.smoothing, smoothing)
        if non_finite not in ("skip", "raise"):
            raise ValueError(
                f"Argument `non_finite` must be 'skip' or 'raise'. Received: non_finite={non_finite!r}"
            )
        if gradient_accumulation_steps is not None:
            gradient_accumulation_steps = validation.accumulation_steps(
                gradient_accumulation_steps, "gradient_accumulation_steps"
            )
        # Keras refuses 1; here it means "accumulate, one micro-batch for now", so that
        # `set_accumulation_steps` can start from k = 1. Keras builds the accumulators for any
        # truthy value, and every other use of the count is this class's.
        super().__init__(**kwargs)
        # The strategy in scope, as Keras's TensorFlow optimizer captures it (there privately).
        self._strategy = tf.distribute.get_strategy()
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self._requested_scale = scale
        self._requested_smoothing = smoothing
        self.non_finite = non_finite
        # float64 statistics square any float32 gradient without overflow or
        # underflow; TPUs have no float64.
        self._statistics_dtype = (
            tf.float32 if isinstance(self._strategy, tf.distribute.TPUStrategy) else tf.float64
        )
        # Per optimizer, not at import: a compiled function outlives a reset of TensorFlow's
        # context (keras's tests do that) and then fails on its first call.
        self._state_step = tf.function(
            functools.partial(gain_lib.step, learning_rate_scale=type(self)._learning_rate_scale),
            jit_compile=True,
        )
        self._add_state_variables()
        keras_fixes.enable_for(self._strategy)

    def _add_state_variables(self):
        # Created here rather than in build() so that `learning_rate`, which reads tau,
        # works before the first update, as Keras's `iterations` does. Two variables,
        # written once per update: the statistics-dtype fields and the int64 counters.
        initial = gain_lib.AdaScaleState(0.0, 0.0, 0.0, 1.0, 0, 0.0, 0.0, 0)
        self._state_floats = self.add_variable(
            shape=(len(_FLOAT_FIELDS),),
            initializer=keras.initializers.Constant([getattr(initial, f) for f in _FLOAT_FIELDS]),
            dtype=self._statistics_dtype.name,
            aggregation="only_first_replica",
            name="adascale_state",
        )
        self._state_counters = self.add_variable(
            shape=(len(_COUNTER_FIELDS),),
            initializer="zeros",
            dtype="int64",
            aggregation="only_first_replica",
            name="adascale_counters",
        )
        steps = self.gradient_accumulation_steps or 1
        replicas = self._strategy.num_replicas_in_sync
        self._configured_counts = (self.gradient_accumulation_steps or 0, replicas)
        self._configured_scale = float(self._requested_scale or 0.0)
        self._initial_scale = self._requested_scale or replicas * steps
        self._setting_counters = self.add_variable(
            shape=(len(_SETTING_COUNTERS),),
            initializer=keras.initializers.Constant([steps, steps, 0, 0, *self._configured_counts]),
            dtype="int64",
            aggregation="only_first_replica",
            name="adascale_accumulation",
        )
        self._setting_scales = self.add_variable(
            shape=(len(_SETTING_SCALES),),
            initializer=keras.initializers.Constant([float(self._initial_scale), self._configured_scale]),
            dtype=self._statistics_dtype.name,
            aggregation="only_first_replica",
            name="adascale_scale",
        )

    def _scale_setting(self):
        """The `ScaleSetting` in effect, from one read of its two variables.

        The stored one, unless it was made under another configuration (a checkpoint
        restored into an optimizer made with another `scale`, `gradient_accumulation_steps` or
        replica count): then this optimizer's own S and k, from the restored update counts.
        """
        counters = tf.convert_to_tensor(self._setting_counters.value)
        scales = tf.convert_to_tensor(self._setting_scales.value)
        configured = tf.constant(self._configured_counts, tf.int64)
        same = tf.logical_and(
            tf.reduce_all(tf.equal(counters[4:], configured)),
            tf.equal(scales[1], tf.constant(self._configured_scale, scales.dtype)),
        )
        steps = tf.constant(self.gradient_accumulation_steps or 1, tf.int64)
        return ScaleSetting(
            steps=tf.where(same, counters[0], steps),
            next_steps=tf.where(same, counters[1], steps),
            update_start=counters[2],
            updates=counters[3],
            scale=tf.where(same, scales[0], tf.constant(float(self._initial_scale), scales.dtype)),
        )

    def _setting_values(self, setting):
        """The two variables' values holding `setting` and this optimizer's configuration."""
        counters = tf.stack([tf.cast(value, tf.int64) for value in (
            setting.steps, setting.next_steps, setting.update_start, setting.updates, *self._configured_counts)])
        dtype = self._setting_scales.dtype
        scales = tf.stack([tf.cast(setting.scale, dtype), tf.constant(self._configured_scale, dtype)])
        return counters, scales

    def _setting_assignments(self, distribution, setting):
        """Writes `setting` into its two variables, in cross-replica context."""

        def write(counters, setting, scales):
            counter_values, scale_values = self._setting_values(setting)
            self.assign(counters, counter_values)
            self.assign(scales, scale_values)

        distribution.extended.update(
            self._setting_counters.value, write, args=(setting, self._setting_scales.value), group=False,
        )

    def _write_setting(self, setting):
        """Eagerly writes `setting` (from `set_accumulation_steps` / `set_scale`, between steps)."""
        counters, scales = self._setting_values(setting)
        self.assign(self._setting_counters, counters)
        self.assign(self._setting_scales, scales)

    def _setting_numbers(self):
        """`_scale_setting` as Python numbers, eagerly, from one `.numpy()` of each variable.

        The same rule in NumPy: callbacks read it after every batch, where a dozen eager ops
        would cost more than the step of a small model.
        """
        counters = self._setting_counters.numpy()
        scales = self._setting_scales.numpy()
        same = (tuple(int(c) for c in counters[4:]) == tuple(self._configured_counts)
                and float(scales[1]) == self._configured_scale)
        steps = self.gradient_accumulation_steps or 1
        return ScaleSetting(
            steps=int(counters[0]) if same else steps,
            next_steps=int(counters[1]) if same else steps,
            update_start=int(counters[2]),
            updates=int(counters[3]),
            scale=float(scales[0]) if same else float(self._initial_scale),
        )

    @property
    def iterations(self):
        """The updates so far (a micro-batch of gradient accumulation is not one), as Keras counts them."""
        if not self.gradient_accumulation_steps:
            return self._iterations
        return tf.convert_to_tensor(self._setting_counters.value)[_SETTING_COUNTERS.index("updates")]

    @property
    def accumulation_steps(self):
        """k, the micro-batches each update accumulates now (1 without gradient accumulation)."""
        if not tf.executing_eagerly():
            return self._scale_setting().next_steps
        return self._setting_numbers().next_steps

    def _check_setting(self, steps, scale, argument):
        replicas = self._strategy.num_replicas_in_sync
        if replicas * steps == 1 and scale > 1:
            raise ValueError(
                f"Argument `{argument}` would give S = {scale:g} with one gradient sample per update "
                "(one replica, one micro-batch): the gain needs at least two samples to see the "
                "gradient variance. Accumulate >= 2 micro-batches or use >= 2 replicas."
            )

    def set_accumulation_steps(self, steps):
        """Makes each update from now on accumulate `steps` micro-batches, without a retrace.

        S keeps its ratio to N: it becomes `S * steps / k` for the current k
        (S = N by default). tau, the statistics' averages and the update rule's
        state (momentum, Adam's moments) carry over: the averages are kept in
        baseline-batch units, so they stay valid at the new S. Called between
        two micro-batches of one update, the change waits for that update to
        finish. Call it between steps, outside `tf.function` (a callback or a
        custom loop's Python); the compiled step reads the count from a
        variable. The new k and S are optimizer state: saved and restored with
        it.

        Args:
            steps: int >= 1, the micro-batches per update. With one replica,
                1 is allowed only at S = 1 (the gain needs two samples).

        Raises:
            ValueError: for a bad `steps`, or when the optimizer was made
                without `gradient_accumulation_steps`.
        """
        steps = validation.accumulation_steps(steps, "steps")
        if not self.gradient_accumulation_steps:
            raise ValueError(
                f"{type(self).__name__} was created without gradient accumulation, so its accumulation "
                "steps cannot change: create it with `gradient_accumulation_steps=k` (any k >= 1, "
                "the count to start from)."
            )
        if not tf.executing_eagerly():
            raise RuntimeError("`set_accumulation_steps` must be called eagerly, between steps (not in a tf.function).")
        setting = self._setting_numbers()
        in_update = int(self._iterations.numpy()) != setting.update_start
        # S belongs to the count of the update in progress; a change still pending replaces
        # the pending one.
        scale = setting.scale * steps / setting.steps
        self._check_setting(steps, scale, "steps")
        if in_update:
            setting = setting._replace(next_steps=steps)
        else:
            setting = setting._replace(steps=steps, next_steps=steps, scale=scale)
        self._write_setting(setting)

    def set_scale(self, scale):
        """Sets S, the examples per update over the baseline batch, from the next update on.

        For custom loops that change their own per-replica batch (FairScale's
        `set_scale`): N stays, S changes. tau and the averages carry over. A
        change of the accumulation steps still pending scales it by
        `k_new / k`. Call it eagerly, between steps.

        Args:
            scale: number >= 1, S.
        """
        scale = validation.scale(scale)
        if not tf.executing_eagerly():
            raise RuntimeError("`set_scale` must be called eagerly, between steps (not in a tf.function).")
        setting = self._setting_numbers()
        self._check_setting(setting.steps, scale, "scale")
        self._write_setting(setting._replace(scale=float(scale)))

    def _read_state(self):
        """The `gain.AdaScaleState` held in the state variables."""
        floats = tf.unstack(tf.convert_to_tensor(self._state_floats.value))
        counters = tf.unstack(tf.convert_to_tensor(self._state_counters.value))
        fields = dict(zip(_FLOAT_FIELDS, floats))
        fields.update(zip(_COUNTER_FIELDS, counters))
        for name in _FLOAT32_FIELDS:
            fields[name] = tf.cast(fields[name], tf.float32)
        return gain_lib.AdaScaleState(**fields)

    def _state_assignments(self, distribution, state):
        """Writes `state` (possibly per replica) into the two state variables, in cross-replica context.

        Returns the variables' values read after the writes, for what must run after them.
        """

        def write(floats, counters, state):
            dtype = self._statistics_dtype
            self.assign(floats, tf.stack([tf.cast(getattr(state, f), dtype) for f in _FLOAT_FIELDS]))
            self.assign(counters, tf.stack([getattr(state, f) for f in _COUNTER_FIELDS]))
            # `self.assign` returns nothing; a read of a variable is ordered after its write.
            return [floats.read_value(), counters.read_value()]

        return distribution.extended.update(
            self._state_floats.value, lambda floats, state, counters: write(floats, counters, state),
            args=(state, self._state_counters.value), group=False,
        )

    @property
    def scale(self):
        """S, the examples per update over the baseline batch (defaults to N; an int where it is one)."""
        if not tf.executing_eagerly():
            return self._scale_setting().scale
        value = self._setting_numbers().scale
        keep_float = isinstance(self._requested_scale, float) and value == self._requested_scale
        return int(value) if value.is_integer() and not keep_float else value

    @property
    def samples_per_update(self):
        """N, the gradient samples per update: replicas x accumulation steps (int)."""
        replicas = self._strategy.num_replicas_in_sync
        return replicas * self.accumulation_steps

    @property
    def smoothing(self):
        """theta, the moving-average factor of the gain statistics (float).

        By default `max(1 - S / 1000, 0)` at the S of each update: a memory of
        about 1000 / S updates, i.e. of about 1,000 baseline batches of
        examples whatever S is. When S changes during training the memory
        therefore stays the same in examples (and in tau, near the gain's
        ceiling): the averages neither restart at a change nor lag further
        behind a rising noise scale at large S, where each update holds more
        examples. The bias correction follows the changing theta exactly.
        """
        if self._requested_smoothing is not None:
            return self._requested_smoothing
        return max(1.0 - self.scale / 1000.0, 0.0)

    def _smoothing_tensor(self, scale):
        if self._requested_smoothing is not None:
            return tf.constant(self._requested_smoothing, scale.dtype)
        return tf.maximum(1.0 - scale / 1000.0, tf.zeros_like(scale))

    @property
    def gain(self):
        """The gain r of the last update (1.0 before any)."""
        return self._read_state().gain

    @property
    def scale_invariant_iterations(self):
        """tau, the sum of the gains of all updates so far (float64 tensor)."""
        state = self._read_state()
        return tf.cast(state.tau_whole, tf.float64) + tf.cast(state.tau_fraction, tf.float64)

    @property
    def gradient_variance(self):
        """The smoothed, bias-corrected estimate of sigma^2 (0.0 before any update)."""
        return self._corrected_moments()[0]

    @property
    def gradient_sqr_norm(self):
        """The smoothed, bias-corrected estimate of mu^2 (0.0 before any update)."""
        return self._corrected_moments()[1]

    @property
    def gradient_noise_scale(self):
        """The simple gradient noise scale B_simple = sigma^2 / mu^2, in baseline batches.

        sigma^2 is the variance of one baseline-batch gradient, tr(Sigma) / B0,
        and mu^2 = |G|^2, both from the smoothed, bias-corrected averages, so
        this is McCandlish et al.'s `B_simple = tr(Sigma) / |G|^2` divided by the
        baseline batch B0: multiply by B0 for examples. Scaling pays while S
        is below it or near it (the gain r = (b + 1) / (b / S + 1) for b this
        value, i.e. a scaling efficiency r / S of 50% at S = b + 2). 0.0 before
        any update; +inf when mu^2 = 0 < sigma^2. A float64 tensor (float32
        under `TPUStrategy`).

        References:
            McCandlish, Kaplan, Amodei et al. "An Empirical Model of
            Large-Batch Training", 2018, arXiv:1812.06162, Equation 2.8 (B_simple).
        """
        return gain_lib.noise_scale(*self._corrected_moments())

    def predicted_gain(self, scale):
        """The gain a run at scale `scale` would have with the current statistics.

        `(sigma2 + mu2) / (sigma2 / scale + mu2)`, in [1, scale], from the
        smoothed, bias-corrected averages: at the optimizer's own S it equals
        `gain`. `predicted_gain(S') / S'` is the scaling efficiency at S'.

        Args:
            scale: number >= 1, or a float tensor of such (S').

        Returns:
            A tensor of the statistics' dtype, shaped like `scale`.
        """
        if not tf.is_tensor(scale):
            validation.scale(scale)
        variance, sqr_norm = self._corrected_moments()
        return gain_lib.gain_ratio(variance, sqr_norm, tf.cast(scale, variance.dtype))

    @property
    def skipped_updates(self):
        """How many updates were skipped for NaN or Inf gradients (int64 tensor)."""
        return self._read_state().skipped_updates

    @property
    def effective_learning_rate(self):
        """The learning rate the last update used, the gain's factor times lr(floor(tau)) (0.0 before any)."""
        return self._read_state().effective_learning_rate

    def snapshot(self):
        """Every statistic of the last update as Python numbers, from one read of the state.

        Eager only (it calls `.numpy()`): for callbacks and logging, which
        would otherwise read the state once per property.

        Returns:
            A dict with `gain`, `scale_invariant_iterations`, `effective_learning_rate`,
            `skipped_updates` (int), `gradient_variance`, `gradient_sqr_norm`,
            `gradient_noise_scale`, `scaling_efficiency` (gain / S), `scale` (S) and
            `accumulation_steps` (k; both for the next update).
        """
        state = self._read_state()
        setting = self._setting_numbers()
        variance, sqr_norm = self._moments(state)
        gain = float(state.gain.numpy())
        scale = setting.scale
        return {
            "gain": gain,
            "scale_invariant_iterations": float(state.tau_whole.numpy()) + float(state.tau_fraction.numpy()),
            "effective_learning_rate": float(state.effective_learning_rate.numpy()),
            "skipped_updates": int(state.skipped_updates.numpy()),
            "gradient_variance": float(variance.numpy()),
            "gradient_sqr_norm": float(sqr_norm.numpy()),
            "gradient_noise_scale": float(gain_lib.noise_scale(variance, sqr_norm).numpy()),
            "scaling_efficiency": gain / scale,
            "scale": scale,
            "accumulation_steps": setting.next_steps,
        }

    def _corrected_moments(self):
        """(sigma^2, mu^2): the bias-corrected averages, from one read of the state."""
        return self._moments(self._read_state())

    @staticmethod
    def _moments(state):
        return (tf.math.divide_no_nan(state.variance_average, state.average_weight),
                tf.math.divide_no_nan(state.sqr_norm_average, state.average_weight))

    def _check_strategy(self):
        if tf.distribute.has_strategy() and tf.distribute.get_strategy() is not self._strategy:
            raise ValueError(
                f"{type(self).__name__} was created outside the `strategy.scope()` it is used in, so "
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
        # The configured values: build may run inside a traced function.
        replicas = self._strategy.num_replicas_in_sync
        if replicas * (self.gradient_accumulation_steps or 1) == 1 and self._initial_scale > 1:
            raise ValueError(
                f"Argument `scale` is {self._initial_scale}, but each update sees one gradient "
                "sample (num_replicas_in_sync=1, no gradient accumulation), and the "
                "gain needs at least two samples to see the gradient variance. Use "
                ">= 2 replicas or `gradient_accumulation_steps >= 2`."
            )
        if self._initial_scale == 1 and not self.gradient_accumulation_steps:
            warnings.warn(
                f"{type(self).__name__} has scale S = 1 (each update holds one baseline batch): "
                f"the gain is always 1 and it behaves as plain {self._plain_optimizer}. Use several "
                "replicas or `gradient_accumulation_steps`, or set `scale`.",
                stacklevel=2,
            )
        dtypes = {tf.as_dtype(v.dtype) for v in variables}
        # The statistic travels in the gradients' all-reduce, in their dtype where it can.
        self._statistic_words_dtype = dtypes.pop() if len(dtypes) == 1 else None
        if self.gradient_accumulation_steps:
            words = distribute.encode_statistic(tf.zeros((), self._statistics_dtype), self._statistic_words_dtype)
            words = words[0] if words is not None else tf.zeros((), self._statistics_dtype)
            self._sample_sqr_norm_accumulator = self._add_replica_local_variable(
                words.shape, words.dtype, "sample_sqr_norm_accumulator"
            )
        super().build(variables)

    def _get_current_learning_rate(self):
        if isinstance(self._learning_rate, _LearningRateSchedule):
            # floor(tau) alone: the schedule needs only the counters variable.
            return self._learning_rate(self._state_counters.value[_COUNTER_FIELDS.index("tau_whole")])
        return super()._get_current_learning_rate()

    def load_own_variables(self, store):
        # Keras warns and skips a mismatched optimizer: that would silently restart
        # tau, the gain statistics and the moments. Refuse instead.
        saved = len(store.keys())
        name = type(self).__name__
        if saved != len(self.variables):
            raise ValueError(
                f"Cannot restore {name} '{self.name}': the checkpoint holds {saved} optimizer "
                f"variables and this optimizer has {len(self.variables)}. Build it first "
                "(`optimizer.build(model.trainable_variables)`) with the same arguments "
                f"({self._shape_arguments}, `gradient_accumulation_steps`) as the saved one, "
                "or load the model with `compile=False` to restore only the weights."
                + (" If it was saved by keras-adascale 0.1.0, which kept 2 fewer (S and the accumulation "
                   "count became optimizer variables in 0.2.0), load it with `compile=False`."
                   if saved == len(self.variables) - 2 else "")
            )
        for index, variable in enumerate(self.variables):
            shape = tuple(store[str(index)].shape)
            if shape != tuple(variable.shape):
                raise ValueError(
                    f"Cannot restore {name} '{self.name}': variable {variable.path} has shape "
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
