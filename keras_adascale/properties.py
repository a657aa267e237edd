"""The public properties and methods of an AdaScale optimizer beyond Keras's: S and k, N, theta, the statistics.

`AdaScaleProperties` is mixed into `base.AdaScaleBase`: `iterations`, `accumulation_steps` and
`set_accumulation_steps`, `set_scale`, `scale`, `samples_per_update`, `smoothing`, `gain`,
`scale_invariant_iterations`, the gradient statistics, `predicted_gain`, `snapshot` (the API reference lists
them, in this order). Backend-neutral: `keras.ops`, and NumPy for the eager reads; the setting through
`setting` and `base.AdaScaleBase`'s `_setting_numbers` / `_write_setting`, a backend's statistics' exponent
through its mechanics (`_statistics_in_units`, `_statistics_exponent_number`).
"""

import numpy as np
from keras import ops

from keras_adascale import validation
from keras_adascale import gain as gain_lib
from keras_adascale import setting as setting_lib
from keras_adascale.numerics import NUMBERS

_FLOAT_FIELDS, _FLOAT32_FIELDS, _COUNTER_FIELDS = gain_lib.FLOAT_FIELDS, gain_lib.FLOAT32_FIELDS, gain_lib.COUNTER_FIELDS


class AdaScaleProperties:
    """The public properties and methods of `AdaScaleBase` (see `base`), read from its state and setting."""

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
