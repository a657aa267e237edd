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

Replicas: under `keras.distribution.DataParallel` Keras's train step hands the optimizer only the
all-reduced mean gradient. `model.AdaScaleModel`'s train step computes each replica's gradient in
`jax.shard_map` and hands the optimizer the sum of their squared norms with it (`_incoming_statistic`):
N = replicas x k. Without that statistic, an optimizer made for several replicas refuses to apply.
"""

import keras
import numpy as np
from keras import ops

from keras_adascale import gain as gain_lib
from keras_adascale import setting as setting_lib
from keras_adascale.numerics import TENSORS

def _squared_norm(tensor):
    """`||t||^2` in float32: one dot product of the flattened tensor with itself (no tensor of squares)."""
    flat = ops.reshape(ops.cast(tensor, "float32"), [-1])
    return ops.vdot(flat, flat)


# The statistics are float32 here, whatever the backend has. JAX has no float64 without x64, and Keras's
# PyTorch backend computes many 64-bit operations in 32 bits (Keras 3.15.1's type promotion maps float64
# to float32 and int64 to int32 on every backend but TensorFlow: `ops.maximum`, `ops.minimum`,
# `ops.floor`, `ops.divide_no_nan` and `ops.vdot` of two float64 tensors give float32 on PyTorch,
# and `ops.maximum` of two int64 ones int32), so a float64 state would be float32 at every update anyway.
#
# A square of a float32 gradient overflows above ~1.8e19 and is flushed to zero below ~1e-19 (XLA on a
# CPU flushes subnormals). So every sum of squares is a block floating-point number `(mantissa, exponent)`,
# the value `mantissa * 2**exponent`, with a float32 mantissa and an int32 exponent: taken in float32
# (exponent 0) where it lies in [1e-20, 1e20] and, only where it does not, over the gradients scaled by a
# power of two. The moving averages keep one shared exponent, renormalized after every update. The gain and
# the noise scale are ratios of numbers of one exponent, read from the mantissas; the variance and the
# squared norm are the mantissas times 2**exponent.
LARGEST_FAST_SUM = 1e20
# The oldest Keras these mechanics run on (`keras.ops.ldexp`; the `[jax]` and `[torch]` extras' lower bound).
MINIMUM_KERAS = (3, 13)
_NO_EXPONENT = -(2**30)  # below any exponent: where a term is 0 (and its exponent arbitrary)


def _floor_log2(magnitude):
    """floor(log2 m) as int32 where m is finite and positive (off by one at most, next to a power of two), else 0."""
    usable = ops.logical_and(ops.isfinite(magnitude), magnitude > 0.0)
    logarithm = ops.floor(ops.log2(ops.where(usable, magnitude, ops.ones_like(magnitude))))
    return ops.where(usable, ops.cast(logarithm, "int32"), ops.zeros((), "int32"))


def _scaled_sqr_norm_sum(tensors):
    """`sum_k ||t_k||^2` as `(float32 mantissa, exponent)` for any finite float32 tensors: each scaled by
    2^-e, e = floor(log2 max|t|) over all of them, before squaring (NaN or Inf stay in the mantissa)."""
    tensors = [ops.cast(t, "float32") for t in tensors]
    largest = ops.max(ops.stack([ops.max(ops.abs(t)) for t in tensors]))
    shift = _floor_log2(largest)
    mantissa = sum(_squared_norm(ops.ldexp(t, -shift)) for t in tensors)
    return mantissa, 2 * shift


def _present(mantissa):
    """Whether a block number's exponent counts: a finite mantissa that is not 0."""
    return ops.logical_and(mantissa != 0.0, ops.isfinite(mantissa))


def _counted_exponent(present, exponent):
    """`exponent` where its term is present, else below every exponent (for a maximum over terms)."""
    return ops.where(present, exponent, ops.full((), _NO_EXPONENT, "int32"))


def _or_zero(common):
    """A maximum of `_counted_exponent`s, 0 where no term was present."""
    return ops.where(common == _NO_EXPONENT, ops.zeros((), "int32"), common)


def _common_exponent(terms):
    """The largest exponent among the terms `(present, exponent)` that are present; 0 where none is."""
    counted = [_counted_exponent(present, exponent) for present, exponent in terms]
    common = counted[0]
    for exponent in counted[1:]:
        common = ops.maximum(common, exponent)
    return _or_zero(common)


def _in_exponent(mantissa, exponent, common):
    """`mantissa * 2**exponent` as a mantissa of `common` (>= exponent where the mantissa is not 0)."""
    return ops.ldexp(mantissa, ops.where(mantissa != 0.0, exponent - common, ops.zeros((), "int32")))


def _block_add(first, second):
    """The sum of two block numbers, in the larger exponent of the two that are not 0."""
    (m1, e1), (m2, e2) = first, second
    common = _common_exponent([(_present(m1), e1), (_present(m2), e2)])
    return _in_exponent(m1, e1, common) + _in_exponent(m2, e2, common), common


def _exponent_of(magnitude):
    """floor(log2 m) for a finite m > 0 (a Python float), else 0: the exponent that puts m's mantissa in [1, 2)."""
    return int(np.floor(np.log2(magnitude))) if np.isfinite(magnitude) and magnitude > 0 else 0


class AdaScaleMechanics:
    """The Keras optimizer hooks of AdaScale on JAX and PyTorch (one replica, gradient accumulation)."""

    # What `base.AdaScaleBase` asks of the backend's mechanics (`distribute.AdaScaleMechanics` has the same).

    @staticmethod
    def _strategy_in_scope():
        return None

    # Set by `AdaScaleModel`'s train step, while it applies a gradient, to the block number of the sum of the
    # replicas' squared norms: the optimizer's own of the mean gradient would see one sample.
    _incoming_statistic = None

    def _replicas_in_sync(self):
        """R, the devices on the batch axis of `keras.distribution`'s distribution (JAX; else 1)."""
        from keras_adascale.model import replicas_in_distribution

        return replicas_in_distribution()

    @staticmethod
    def _has_64_bits():
        """float64 tensors (for views such as tau): PyTorch has them but on Apple's MPS (where Keras places
        tensors when there is no CUDA device); JAX only with `jax_enable_x64`."""
        if keras.backend.backend() == "jax":
            import jax

            return bool(jax.config.jax_enable_x64)
        import torch

        return torch.cuda.is_available() or not torch.backends.mps.is_available()

    def _choose_statistics_dtype(self):
        return "float32"  # with an exponent of its own (see LARGEST_FAST_SUM)

    def _choose_counters_dtype(self):
        return "int32"  # 2^31 micro-batches; Keras's own `iterations` is int32 on JAX without x64

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

    def _count_added(self):
        """What one micro-batch of all R replicas adds to the count accumulator (the replicas' increments), traced."""
        replicas = float(self._configuration.replicas)
        return ops.convert_to_tensor([replicas * i for i in self._count_increment()], "float32")

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

    def _sqr_norm_sum(self, tensors):
        """`sum_k ||t_k||^2` as a block number `(float32 mantissa, int32 exponent)`: the float32 sum where it
        lies in [1e-20, 1e20], else the sum over the tensors scaled by a power of two (`_scaled_sqr_norm_sum`)."""
        fast = sum(_squared_norm(t) for t in tensors)
        usable = ops.logical_and(ops.isfinite(fast), ops.logical_and(fast >= gain_lib.SMALLEST_FAST_SUM,
                                                                     fast <= LARGEST_FAST_SUM))
        if keras.backend.backend() == "torch":  # eager: the exponent of the usual case as a Python 0
            return (fast, 0) if bool(usable) else _scaled_sqr_norm_sum(tensors)
        return ops.cond(usable, lambda: (fast, ops.zeros((), "int32")), lambda: _scaled_sqr_norm_sum(tensors))

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

    def _replica_statistic(self, grads, trainable_variables):
        """One replica's sum of squares of what the statistics measure, a block number (in its train step).

        Of the gradients `apply` will see: divided by `loss_scale_factor` where one is set, as `apply` divides."""
        if self.loss_scale_factor is not None:
            grads = [g / self.loss_scale_factor for g in grads]
        return self._sqr_norm_sum(self._statistic_gradients(grads, trainable_variables))

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
        if keras.backend.backend() == "torch":
            self._eager_apply(grads, trainable_variables, local, setting, micro_step)
        else:
            self._traced_apply(grads, trainable_variables, local, setting, micro_step)
        if self.use_ema:
            self._moving_average_step(updates_before)

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
            count = self._sample_count_accumulator.value  # in place, from Python numbers: no tensor per micro-batch
            replicas = float(self._configuration.replicas)
            for index, increment in enumerate(self._count_increment()):
                count[index].add_(replicas * increment)
            statistic = self._sample_sqr_norm_accumulator
            if isinstance(local[1], int) and float(statistic.value[1]) == 0.0:
                statistic.value[0].add_(local[0])  # the usual case: both of exponent 0, in place
            else:
                statistic.assign(self._accumulated_statistic(ops.convert_to_tensor(statistic.value), local))
            if not bool(setting_lib.is_update_step(setting, micro_step)):
                return
            sums = [ops.convert_to_tensor(a.value) for a in accumulators]
            accumulated = ops.convert_to_tensor(statistic.value)
            statistic_sum = (accumulated[0], ops.cast(accumulated[1], "int32"))
            counted = ops.convert_to_tensor(self._sample_count_accumulator.value)
            accumulators = accumulators + [statistic, self._sample_count_accumulator]
        else:
            sums, statistic_sum, counted = list(grads), local, None
        state, finite, grads, values = self._statistics_step(sums, statistic_sum, trainable_variables, setting,
                                                             micro_step, counted)
        if bool(finite):
            self._apply_update(None, list(zip(grads, trainable_variables)), state.effective_learning_rate, state)
        for variable, value in zip(self._state_variables(), values):
            variable.assign(value)
        for accumulator in accumulators:
            accumulator.value.zero_()

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

    def _statistics_step(self, sums, statistic_sum, trainable_variables, setting, micro_step, counted=None):
        """The update that completes at `micro_step`, up to its rule (pure). `statistic_sum` is the block
        number `(mantissa, exponent)` of the micro-batches' sums of squares, `counted` the count accumulator
        with them (None without accumulation).

        Returns:
            `(state, finite, clipped mean gradients, the new values of the state variables)`.
        """
        dtype = self._statistics_dtype
        micro_batches = setting_lib.accumulated(setting, micro_step)
        grads = [s / ops.cast(micro_batches, s.dtype) for s in sums]
        mean_sqr_norm = self._sqr_norm_sum(self._statistic_gradients(grads, trainable_variables))
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
