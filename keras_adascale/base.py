"""What every AdaScale optimizer shares: S and N, the state, tau, the statistics' properties, config.

`AdaScaleBase` is mixed in before a Keras optimizer class (see `AdaScaleSGD`, `AdaScaleAdam`); it
stores `gain.AdaScaleState` in two variables and, through the backend's mechanics
(`distribute.AdaScaleMechanics` on TensorFlow, `functional.AdaScaleMechanics` on JAX and PyTorch),
feeds the pure `gain.step` once per update. Backend-neutral: `keras.ops` only. A subclass gives the update rule (`update_step`), the
learning-rate factor of the gain (`_learning_rate_scale`) and may change what the statistics
measure (`_statistic_gradients`) or what an applied update does besides (`_apply_update`).
"""

import functools
import warnings

import keras
import numpy as np
from keras import ops

from keras_adascale import numerics
from keras_adascale import validation
from keras_adascale import gain as gain_lib
from keras_adascale import setting as setting_lib
from keras_adascale.numerics import NUMBERS, TENSORS

if keras.backend.backend() == "tensorflow":
    from keras_adascale.distribute import AdaScaleMechanics
elif keras.backend.backend() == "torch":
    from keras_adascale.torch_mechanics import AdaScaleMechanics
else:
    from keras_adascale.functional import AdaScaleMechanics

_LearningRateSchedule = keras.optimizers.schedules.LearningRateSchedule

_FLOAT_FIELDS, _FLOAT32_FIELDS, _COUNTER_FIELDS = gain_lib.FLOAT_FIELDS, gain_lib.FLOAT32_FIELDS, gain_lib.COUNTER_FIELDS


# How to give an optimizer N >= 2 gradient samples per update, by backend (the S = 1 warning says it).
_SEVERAL_SAMPLES = {
    "tensorflow": "make it (and compile the model) in the scope of a tf.distribute strategy with several replicas "
                  "(on a CPU, logical devices: tf.config.set_logical_device_configuration), or pass "
                  "`gradient_accumulation_steps=k`",
    "jax": "build the model as keras_adascale.AdaScaleModel with `groups=n` (n samples from each batch), or train "
           "it under keras.distribution.DataParallel over several devices with the optimizer made after "
           "`set_distribution` (on a CPU, host devices: jax.config.update('jax_num_cpu_devices', n) before JAX "
           "starts), or pass `gradient_accumulation_steps=k`",
    "torch": "pass `gradient_accumulation_steps=k` (Keras has no multi-device PyTorch fit)",
}


def unique_name(prefix):
    """`prefix`, then `prefix_1`, `prefix_2`...: default names unique per session, as Keras makes them."""
    uid = keras.backend.get_uid(prefix)
    return prefix if uid == 1 else f"{prefix}_{uid - 1}"


class AdaScaleBase(AdaScaleMechanics):
    """S, N, the AdaScale state and its read-only views, for a Keras optimizer class after it in the MRO.

    Keyword arguments taken here (documented on each optimizer): `scale`,
    `smoothing`, `non_finite`; the rest go to the Keras optimizer.
    """

    # The learning-rate factor of a gain r: r for SGD (Algorithm 1), sqrt(r) for Adam.
    _learning_rate_scale = staticmethod(gain_lib._identity)
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
        # The strategy in scope, as Keras's TensorFlow optimizer captures it (there privately); None elsewhere.
        self._strategy = self._strategy_in_scope()
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self._requested_scale = scale
        self._requested_smoothing = smoothing
        self.non_finite = non_finite
        self._statistics_dtype = keras.backend.standardize_dtype(self._choose_statistics_dtype())
        self._counters_dtype = self._choose_counters_dtype()
        self._configuration = setting_lib.Configuration(
            steps=gradient_accumulation_steps or 0,
            replicas=self._replicas_in_sync(),
            scale=float(scale or 0.0),
        )
        # Per optimizer, not at import: a compiled function outlives a reset of TensorFlow's
        # context (keras's tests do that) and then fails on its first call.
        self._state_step = self._compiled_state_step(
            functools.partial(gain_lib.step, learning_rate_scale=type(self)._learning_rate_scale))
        self._add_state_variables()
        self._enable_backend_fixes()

    @property
    def gradient_accumulation_steps(self):
        """k, the micro-batches per update: eagerly the count in effect (None without accumulation).

        Keras's attribute. It follows `set_accumulation_steps` and `AutoScale`, so it always equals
        `accumulation_steps` when read eagerly; `get_config` (and so a saved model's config) keeps
        the count the optimizer was made with, and a traced function reads that one.
        """
        configured = self.__dict__.get("_configured_accumulation_steps")
        if not configured or "_setting_counters" not in self.__dict__ or not self._executing_eagerly():
            return configured
        return self._setting_numbers().next_steps

    @gradient_accumulation_steps.setter
    def gradient_accumulation_steps(self, steps):
        # Keras's __init__ sets it (to None here); then this class's, once.
        self.__dict__["_configured_accumulation_steps"] = steps

    def _add_state_variables(self):
        # Created here rather than in build() so that `learning_rate`, which reads tau,
        # works before the first update, as Keras's `iterations` does. Two variables,
        # written once per update: the statistics-dtype fields and the int64 counters.
        initial = gain_lib.AdaScaleState(0.0, 0.0, 0.0, 1.0, 0, 0.0, 0.0, 0)
        self._state_floats = self.add_variable(
            shape=(len(_FLOAT_FIELDS),),
            initializer=keras.initializers.Constant([getattr(initial, f) for f in _FLOAT_FIELDS]),
            dtype=self._statistics_dtype,
            aggregation="only_first_replica",
            name="adascale_state",
        )
        self._state_counters = self.add_variable(
            shape=(len(_COUNTER_FIELDS),),
            initializer="zeros",
            dtype=self._counters_dtype,
            aggregation="only_first_replica",
            name="adascale_counters",
        )
        # S and k (see `setting`): the counters and the configuration in one int64 variable, S in one of
        # the statistics dtype.
        counters, scales = setting_lib.initial_values(self._configuration)
        self._setting_counters = self.add_variable(
            shape=(len(setting_lib.COUNTERS),),
            initializer=keras.initializers.Constant(counters),
            dtype=self._counters_dtype,
            aggregation="only_first_replica",
            name="adascale_accumulation",
        )
        self._setting_scales = self.add_variable(
            shape=(len(setting_lib.SCALES),),
            initializer=keras.initializers.Constant(scales),
            dtype=self._statistics_dtype,
            aggregation="only_first_replica",
            name="adascale_scale",
        )
        self._add_backend_state_variables()

    def _use_groups(self, groups):
        """`AdaScaleModel(groups=n)` (JAX): every replica's batch gives n gradient samples, so N = R x n x k.
        Called by the model's `compile`, before the first update: the optimizer counts R x n as its replicas
        (S = N by default follows). An optimizer that has updated already is refused."""
        current = self.__dict__.get("_groups", 1)
        if current == groups:
            return
        if self.built:
            raise ValueError(
                f"{type(self).__name__} has been built for {current} group{'s' if current != 1 else ''} per replica "
                f"and cannot take {groups} now: compile the model with a new optimizer."
            )
        self.__dict__["_groups"] = groups
        self._configuration = self._configuration._replace(replicas=self._configuration.replicas // current * groups)
        counters, scales = setting_lib.initial_values(self._configuration)
        self._setting_counters.assign(counters)
        self._setting_scales.assign(scales)

    def _resolved_setting(self):
        """`(ScaleSetting, same)` as tensors, from one read of the two variables (see `setting.resolve`)."""
        return setting_lib.resolve(ops.convert_to_tensor(self._setting_counters.value),
                                   ops.convert_to_tensor(self._setting_scales.value),
                                   self._configuration, TENSORS)

    def _scale_setting(self):
        """The `setting.ScaleSetting` in effect, as tensors."""
        return self._resolved_setting()[0]

    def _setting_numbers(self):
        """`_scale_setting` as Python numbers, eagerly, from one `.numpy()` of each variable.

        The same `setting.resolve` over NumPy: callbacks read it after every batch, where a dozen eager
        ops would cost more than the step of a small model.
        """
        setting, _ = setting_lib.resolve(self._setting_counters.numpy(), self._setting_scales.numpy(),
                                         self._configuration, NUMBERS)
        return setting_lib.as_numbers(setting)

    def _write_setting(self, setting):
        """Eagerly writes `setting` (numbers; from `set_accumulation_steps` / `set_scale`, between steps)."""
        counters, scales = setting_lib.values(setting, self._configuration, NUMBERS,
                                              self._setting_counters.numpy(), self._setting_scales.numpy())
        self.assign(self._setting_counters, counters)
        self.assign(self._setting_scales, scales)

    @property
    def iterations(self):
        """The updates so far (a micro-batch of gradient accumulation is not one), as Keras counts them."""
        updates = setting_lib.COUNTERS.index("updates")
        if not self._configuration.steps:
            # Keras's variable, which counts the updates here, unless a checkpoint of an accumulating run was
            # restored into this optimizer (a `tf.train.Checkpoint` restores the micro-step count into it).
            # Traced, Keras's variable: Keras's own EMA reads it before it counts the micro-step.
            if not self._executing_eagerly() or (
                    int(self._setting_counters.numpy()[updates]) == int(self._iterations.numpy())):
                return self._iterations
            return ops.convert_to_tensor(self._setting_counters.value)[updates]
        return ops.convert_to_tensor(self._setting_counters.value)[updates]

    @property
    def accumulation_steps(self):
        """k, the micro-batches each update accumulates from the next update on (1 without gradient accumulation).

        A change made in the middle of an update (`set_accumulation_steps`) shows here at once; the
        update in progress keeps its own count.
        """
        if not self._executing_eagerly():
            return self._scale_setting().next_steps
        return self._setting_numbers().next_steps

    def set_accumulation_steps(self, steps):
        """Makes each update from now on accumulate `steps` micro-batches, without a retrace.

        S keeps its ratio to N: it becomes `S * steps / k` for the current k
        (S = N by default). tau, the statistics' averages and the update rule's
        state (momentum, Adam's moments) carry over: the averages are kept in
        baseline-batch units, so they stay valid at the new S. Called between
        two micro-batches of one update, the change waits for that update to
        finish (the update in progress keeps its k and S; `accumulation_steps`
        and `scale` tell the new ones at once). Call it between steps, outside
        `tf.function` (a callback or a custom loop's Python); the compiled step
        reads the count from a variable. The new k and S are optimizer state:
        saved and restored with it.

        Args:
            steps: int >= 1, the micro-batches per update. With one replica,
                1 is allowed only at S = 1 (the gain needs two samples).

        Raises:
            ValueError: for a bad `steps`, or when the optimizer was made
                without `gradient_accumulation_steps`.
        """
        steps = validation.accumulation_steps(steps, "steps")
        if not self._configuration.steps:
            raise ValueError(
                f"{type(self).__name__} was created without gradient accumulation, so its accumulation "
                "steps cannot change: create it with `gradient_accumulation_steps=k` (any k >= 1, "
                "the count to start from)."
            )
        if not self._executing_eagerly():
            raise RuntimeError("`set_accumulation_steps` must be called eagerly, between steps (not in a traced function).")
        changed = setting_lib.change_steps(self._setting_numbers(), steps, int(self._iterations.numpy()))
        setting_lib.check(self._configuration.replicas, changed.next_steps, changed.next_scale, "steps")
        self._write_setting(changed)

    def set_scale(self, scale):
        """Sets S, the examples per update over the baseline batch, from the next update on.

        For custom loops that change their own per-replica batch (FairScale's
        `set_scale`): N stays, S changes. tau and the averages carry over.
        Called between two micro-batches of one update, the change waits for
        that update to finish, and is checked against the count the next
        update will use (a change of the accumulation steps still pending). A
        later `set_accumulation_steps` scales it by `k_new / k`. Call it
        eagerly, between steps.

        Args:
            scale: number >= 1, S.

        Raises:
            ValueError: for a bad `scale`, or S > 1 where the next update sees one gradient sample.
        """
        scale = validation.scale(scale)
        if not self._executing_eagerly():
            raise RuntimeError("`set_scale` must be called eagerly, between steps (not in a traced function).")
        current = self._setting_numbers()
        setting_lib.check(self._configuration.replicas, current.next_steps, scale, "scale")
        self._write_setting(setting_lib.change_scale(current, scale, int(self._iterations.numpy())))

    def _read_state(self):
        """The `gain.AdaScaleState` held in the state variables."""
        floats = ops.convert_to_tensor(self._state_floats.value)
        counters = ops.convert_to_tensor(self._state_counters.value)
        fields = {name: floats[i] for i, name in enumerate(_FLOAT_FIELDS)}
        fields.update({name: counters[i] for i, name in enumerate(_COUNTER_FIELDS)})
        for name in _FLOAT32_FIELDS:
            fields[name] = ops.cast(fields[name], "float32")
        return gain_lib.AdaScaleState(**fields)

    @property
    def scale(self):
        """S, the examples per update over the baseline batch, from the next update on (defaults to N; an int where it is one).

        Like `accumulation_steps`, a change made in the middle of an update shows here at once.
        """
        if not self._executing_eagerly():
            return self._scale_setting().next_scale
        value = self._setting_numbers().next_scale
        keep_float = isinstance(self._requested_scale, float) and value == self._requested_scale
        return int(value) if value.is_integer() and not keep_float else value

    @property
    def samples_per_update(self):
        """N, the gradient samples per update: replicas x accumulation steps (int)."""
        return self._configuration.replicas * self.accumulation_steps

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
            return TENSORS.like(self._requested_smoothing, scale)
        return ops.maximum(1.0 - scale / 1000.0, ops.zeros_like(scale))

    @property
    def gain(self):
        """The gain r of the last update (1.0 before any)."""
        return self._read_state().gain

    @property
    def scale_invariant_iterations(self):
        """tau, the sum of the gains of all updates so far (a float64 tensor; float32 on JAX without x64)."""
        state = self._read_state()
        dtype = "float64" if self._has_64_bits() else "float32"
        return ops.cast(state.tau_whole, dtype) + ops.cast(state.tau_fraction, dtype)

    @property
    def gradient_variance(self):
        """The smoothed, bias-corrected estimate of sigma^2 (0.0 before any update)."""
        return self._statistics_in_units(self._corrected_moments()[0])

    @property
    def gradient_sqr_norm(self):
        """The smoothed, bias-corrected estimate of mu^2 (0.0 before any update)."""
        return self._statistics_in_units(self._corrected_moments()[1])

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
        if not ops.is_tensor(scale):
            validation.scale(scale)
        variance, sqr_norm = self._corrected_moments()
        return gain_lib.gain_ratio(variance, sqr_norm, ops.cast(scale, variance.dtype))

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
        would otherwise read the state once per property. The statistics are
        computed from the read values with NumPy (the same functions of `gain`
        as the compiled step, over `numerics.NUMBERS`): callbacks call this
        after every batch, where eager TensorFlow ops would cost a millisecond.

        Returns:
            A dict with `gain`, `scale_invariant_iterations`, `effective_learning_rate`,
            `skipped_updates` (int), `gradient_variance`, `gradient_sqr_norm`,
            `gradient_noise_scale` (of the last update), and `scale` (S),
            `accumulation_steps` (k) and `scaling_efficiency` (the predicted gain at that S over
            S; the last update's gain / S while S is unchanged), all three of the next update.
        """
        state = self._state_numbers()
        setting = self._setting_numbers()
        variance, sqr_norm = gain_lib.corrected_moments(
            state.variance_average, state.sqr_norm_average, state.average_weight, NUMBERS)
        scale = setting.next_scale
        predicted = gain_lib.gain_ratio(variance, sqr_norm, NUMBERS.like(scale, variance), NUMBERS)
        exponent = self._statistics_exponent_number()  # the averages' own on JAX and PyTorch; 0 on TensorFlow
        return {
            "gain": float(state.gain),
            "scale_invariant_iterations": float(state.tau_whole) + float(state.tau_fraction),
            "effective_learning_rate": float(state.effective_learning_rate),
            "skipped_updates": int(state.skipped_updates),
            "gradient_variance": float(np.ldexp(np.float64(variance), exponent)),
            "gradient_sqr_norm": float(np.ldexp(np.float64(sqr_norm), exponent)),
            "gradient_noise_scale": float(gain_lib.noise_scale(variance, sqr_norm, NUMBERS)),
            "scaling_efficiency": float(predicted) / scale,
            "scale": scale,
            "accumulation_steps": setting.next_steps,
        }

    def _state_numbers(self):
        """The `gain.AdaScaleState` as NumPy scalars, from one `.numpy()` of each state variable (eager)."""
        fields = dict(zip(_FLOAT_FIELDS, self._state_floats.numpy()))
        fields.update(zip(_COUNTER_FIELDS, self._state_counters.numpy()))
        for name in _FLOAT32_FIELDS:
            fields[name] = np.float32(fields[name])
        return gain_lib.AdaScaleState(**fields)

    def _corrected_moments(self):
        """(sigma^2, mu^2): the bias-corrected averages clipped at 0, from one read of the state."""
        return self._moments(self._read_state())

    @staticmethod
    def _moments(state):
        return gain_lib.corrected_moments(state.variance_average, state.sqr_norm_average, state.average_weight)

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
        configuration = self._configuration
        if configuration.replicas * configuration.initial_steps == 1 and configuration.initial_scale > 1:
            raise ValueError(
                f"Argument `scale` is {configuration.initial_scale:g}, but each update sees one gradient "
                "sample (num_replicas_in_sync=1, no gradient accumulation), and the "
                "gain needs at least two samples to see the gradient variance. Use "
                ">= 2 replicas or `gradient_accumulation_steps >= 2`."
            )
        if configuration.initial_scale == 1 and not configuration.steps:
            warnings.warn(
                f"{type(self).__name__} has scale S = 1 (each update holds one baseline batch): "
                f"the gain is always 1 and it behaves as plain {self._plain_optimizer}. It sees one gradient "
                "sample per update (one replica, no gradient accumulation), so it cannot measure the gradient "
                f"noise. For N >= 2 samples: {_SEVERAL_SAMPLES[keras.backend.backend()]}.",
                stacklevel=2,
            )
        if configuration.steps:
            self._sample_sqr_norm_accumulator = self._add_statistic_accumulator(variables)
            # What entered the accumulators: per micro-batch, [R, R^2] for its R replicas. An update whose
            # micro-batches all came from this optimizer's R holds [R m, R^2 m] for its m micro-batches, and
            # (Cauchy-Schwarz) only such an update does: see `_measured`.
            self._sample_count_accumulator = self._add_count_accumulator()
        super().build(variables)

    def _moving_average_step(self, updates):
        """Keras's EMA of the model's weights (`use_ema`), after every micro-step as in Keras's own
        `_backend_apply_gradients`, with `updates` its `iterations` before the micro-step: the average starts
        at the weights (`updates` 0) and, every `ema_overwrite_frequency` updates, overwrites them. Written with
        `where` rather than a cond, as Keras's JAX optimizer does, so that it assigns on every backend."""
        pairs = [(v, a) for v, a in zip(self._trainable_variables, self._model_variables_moving_average)
                 if a is not None]
        for variable, average in pairs:
            momentum = ops.cast(ops.not_equal(updates, 0), variable.dtype) * self.ema_momentum
            average.assign(momentum * average.value + (1.0 - momentum) * variable.value)
        if self.ema_overwrite_frequency:
            overwrite = ops.equal((updates + 1) % self.ema_overwrite_frequency, 0)
            for variable, average in pairs:
                variable.assign(ops.where(overwrite, average.value, variable.value))

    def _count_increment(self):
        """What one micro-batch adds to the count accumulator on each replica: [1, R] (summed: [R, R^2])."""
        return [1.0, float(self._configuration.replicas)]

    def _measured(self, counted, micro_batches):
        """Whether the update's sums measure it: every micro-batch in it came from this optimizer's replicas.

        `counted` is the count accumulator summed over the replicas, `micro_batches` m: an update with a
        restore in its middle into another replica count holds micro-batches from two counts, whose samples
        are neither equal nor counted in N = R m. Its gradient is applied; its statistics are not averaged
        (`gain.step`'s `measured`)."""
        replicas = float(self._configuration.replicas)
        m = ops.cast(micro_batches, counted.dtype)
        return ops.logical_and(ops.abs(counted[0] - replicas * m) < 0.5,
                               ops.abs(counted[1] - replicas * replicas * m) < 0.5)

    def _get_current_learning_rate(self):
        if isinstance(self._learning_rate, _LearningRateSchedule):
            # floor(tau) alone: the schedule needs only the counters variable.
            return self._learning_rate(self._state_counters.value[_COUNTER_FIELDS.index("tau_whole")])
        return super()._get_current_learning_rate()

    # Saving. A `.keras` or `.weights.h5` file holds the optimizer in one layout on every backend, so that a
    # file saved on one loads on any other (train on JAX, fine-tune on TensorFlow): every variable but the
    # backend's own (the statistics' exponent on JAX and PyTorch), the state and the statistic accumulator
    # in float64 numbers (not a backend's mantissas or all-reduce words), the statistic as the sum of the
    # samples' squared norms. TensorFlow's layout of 0.3.0 is this one without the count accumulator; JAX's
    # and PyTorch's of 0.3.0 had the exponent and no count: both still load (`_from_0_3_0`).

    def _portable_variables(self):
        """The variables a saved store holds, in its order: all but the backend's own."""
        own = {id(v) for v in self._backend_only_variables()}
        return [v for v in self.variables if id(v) not in own]

    def save_own_variables(self, store):
        for index, variable in enumerate(self._portable_variables()):
            store[str(index)] = self._portable_value(variable)

    def _portable_value(self, variable):
        """A variable's value as a saved store holds it (NumPy)."""
        value = self._portable_number(variable)
        # An accumulator whose sums were applied already (PyTorch's fused update keeps them): 0, as elsewhere.
        return np.zeros_like(value) if self._spent_sums(variable) else value

    def _portable_number(self, variable):
        if variable is self._state_floats:
            return self._portable_floats(variable.numpy())
        if variable is getattr(self, "_sample_sqr_norm_accumulator", None):
            return np.float64(self._statistic_number(np.asarray(variable.numpy())))
        if variable is getattr(self, "_sample_count_accumulator", None):
            return np.asarray(variable.numpy(), np.float64)
        return variable.numpy()

    def _assign_portable(self, variable, value):
        """`variable = value`, a value as a saved store holds it."""
        if variable is self._state_floats:
            self._assign_floats(np.asarray(value, np.float64))
        elif variable is getattr(self, "_sample_sqr_norm_accumulator", None):
            variable.assign(self._statistic_value(float(np.asarray(value, np.float64))))
        elif variable is getattr(self, "_sample_count_accumulator", None):
            variable.assign(np.asarray(value, keras.backend.standardize_dtype(variable.dtype)))
        else:
            variable.assign(value)

    def _from_0_3_0(self, values, portable):
        """A 0.3.0 store's values (a list) in this version's layout, or the values as they are."""
        accumulating = hasattr(self, "_sample_count_accumulator")
        if not accumulating and len(values) != len(portable) + 1:
            return values
        index = {id(v): i for i, v in enumerate(portable)}
        scales = index[id(self._setting_scales)]
        exponent = None
        if len(values) == len(portable) + (0 if accumulating else 1) and len(values) > scales + 1:
            candidate = np.asarray(values[scales + 1])
            if candidate.shape == () and np.issubdtype(candidate.dtype, np.integer):
                exponent = int(candidate)  # JAX's or PyTorch's: the statistics' exponent after S
        if exponent is None and not (accumulating and len(values) == len(portable) - 1):
            return values
        original, values = values, list(values)
        if exponent is not None:
            del values[scales + 1]
            floats = np.asarray(values[index[id(self._state_floats)]], np.float64).copy()
            floats[:2] = np.ldexp(floats[:2], exponent)
            values[index[id(self._state_floats)]] = floats
        if not accumulating:
            return values if len(values) == len(portable) else original
        counters = np.asarray(values[index[id(self._setting_counters)]])
        iterations = int(np.asarray(values[index[id(self._iterations)]]))
        replicas = int(counters[setting_lib.COUNTERS.index("replicas")])
        in_progress = iterations - int(counters[setting_lib.COUNTERS.index("update_start")])
        statistic = index[id(self._sample_sqr_norm_accumulator)]
        words = np.asarray(values[statistic])
        if exponent is not None:  # [mantissa, exponent] of the replicas' own squared norms
            values[statistic] = np.ldexp(np.float64(words[0]), int(words[1]))
        else:  # TensorFlow's all-reduce words of the squared norms of g_i / R
            values[statistic] = numerics.decoded_words(words) * replicas**2
        # 0.3.0 counted nothing: the micro-batches in progress came from the saved replicas.
        values.insert(index[id(self._sample_count_accumulator)],
                      np.asarray([replicas * in_progress, replicas**2 * in_progress], np.float64))
        # Another optimizer's store (other slots) may have the same number of values: only a store whose
        # every value has its variable's shape is taken for 0.3.0's.
        if any(tuple(np.shape(value)) != self._portable_shape(variable) for value, variable in zip(values, portable)):
            return original
        return values

    def load_own_variables(self, store):
        # Keras warns and skips a mismatched optimizer: that would silently restart
        # tau, the gain statistics and the moments. Refuse instead.
        portable = self._portable_variables()
        keys = sorted(store.keys(), key=lambda key: int(key) if key.isdigit() else key)
        values = self._from_0_2_0([np.asarray(store[key]) for key in keys], portable)
        values = self._from_0_3_0(values, portable)
        saved = len(values)
        name = type(self).__name__
        if saved != len(portable):
            raise ValueError(
                f"Cannot restore {name} '{self.name}': the checkpoint holds {saved} optimizer "
                f"variables and this optimizer has {len(portable)}. Build it first "
                "(`optimizer.build(model.trainable_variables)`) with the same arguments "
                f"({self._shape_arguments}, `gradient_accumulation_steps`) as the saved one, "
                "or load the model with `compile=False` to restore only the weights."
                + (" If it was saved by keras-adascale 0.1.0, which kept 2 fewer (S and the accumulation "
                   "count became optimizer variables in 0.2.0), load it with `compile=False`."
                   if saved == len(portable) - 2 else "")
            )
        for value, variable in zip(values, portable):
            shape, expected = tuple(np.shape(value)), self._portable_shape(variable)
            if shape != expected:
                raise ValueError(
                    f"Cannot restore {name} '{self.name}': variable {variable.path} has shape "
                    f"{expected} but the checkpoint's has {shape}."
                )
        for value, variable in zip(values, portable):
            self._assign_portable(variable, value)

    def _portable_shape(self, variable):
        """A variable's shape in a saved store."""
        if variable is getattr(self, "_sample_sqr_norm_accumulator", None):
            return ()
        return tuple(variable.shape)

    def _from_0_2_0(self, values, portable):
        """A 0.2.0 store's setting in this version's layout (`setting.from_0_2_0`), else the values as they are.

        0.2.0's variables before the statistic accumulator are where this version's are."""
        index = {id(v): i for i, v in enumerate(portable)}
        counters_at, scales_at = index[id(self._setting_counters)], index[id(self._setting_scales)]
        if len(values) <= scales_at:
            return values
        migrated = setting_lib.from_0_2_0(np.asarray(values[counters_at]), np.asarray(values[scales_at]),
                                          int(np.asarray(values[index[id(self._iterations)]])))
        if migrated is None:
            return values
        values = list(values)
        values[counters_at], values[scales_at] = migrated
        return values

    def get_config(self):
        config = super().get_config()
        # Keras's attribute tells the count in effect; the config keeps the one this optimizer was made with.
        config["gradient_accumulation_steps"] = self._configuration.steps or None
        config.update(
            {
                "scale": self._requested_scale,
                "smoothing": self._requested_smoothing,
                "non_finite": self.non_finite,
            }
        )
        return config
