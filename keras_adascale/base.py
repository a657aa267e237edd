"""What every AdaScale optimizer shares: the state, S and k in their variables, tau, build, config.

`AdaScaleBase` is mixed in before a Keras optimizer class (see `AdaScaleSGD`, `AdaScaleAdam`); it
stores `gain.AdaScaleState` in two variables and, through the backend's mechanics
(`backend.AdaScaleMechanics`: `backend/tensorflow/`, `backend/jax/` or `backend/torch/`), feeds the
pure `gain.step` once per update. Its public properties and methods (S, k, N, the statistics) are in
`properties.AdaScaleProperties`, its saved layout in `saving.PortableSaving`. Backend-neutral: `keras.ops`
only. A subclass gives the update rule (`update_step`), the learning-rate factor of the gain
(`_learning_rate_scale`) and may change what the statistics measure (`_statistic_gradients`) or what an
applied update does besides (`_apply_update`).
"""

import functools
import warnings

import keras
from keras import ops

from keras_adascale import validation
from keras_adascale import gain as gain_lib
from keras_adascale import setting as setting_lib
from keras_adascale.backend import AdaScaleMechanics
from keras_adascale.numerics import NUMBERS, TENSORS
from keras_adascale.saving import PortableSaving
from keras_adascale.properties import AdaScaleProperties

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


class AdaScaleBase(AdaScaleProperties, PortableSaving, AdaScaleMechanics):
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

    def _read_state(self):
        """The `gain.AdaScaleState` held in the state variables."""
        floats = ops.convert_to_tensor(self._state_floats.value)
        counters = ops.convert_to_tensor(self._state_counters.value)
        fields = {name: floats[i] for i, name in enumerate(_FLOAT_FIELDS)}
        fields.update({name: counters[i] for i, name in enumerate(_COUNTER_FIELDS)})
        for name in _FLOAT32_FIELDS:
            fields[name] = ops.cast(fields[name], "float32")
        return gain_lib.AdaScaleState(**fields)

    def _smoothing_tensor(self, scale):
        if self._requested_smoothing is not None:
            return TENSORS.like(self._requested_smoothing, scale)
        return ops.maximum(1.0 - scale / 1000.0, ops.zeros_like(scale))

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
