"""PyTorch: AdaScale's update in PyTorch's multi-tensor kernels, with no read of the device from the host.

Keras's own PyTorch optimizers (SGD, Adam...) replace the generic per-variable update by `torch._foreach_*`
kernels, one call over all the variables. This mechanics does the same for AdaScaleSGD and AdaScaleAdam, and
keeps the device's queue full: on CUDA a read of a tensor from the host (`bool(t)`, `float(t)`, `.item()`)
waits until every kernel queued before it has run, so one per micro-batch stalls the GPU once per micro-batch.

What the host must know, it knows without asking the device:
- whether a micro-batch completes an update, and how many micro-batches the update holds: from a copy of
  the scale setting and of Keras's micro-step count kept on the host (`_HostSetting`). It is read from the
  variables once, and again only where a variable's value changed other than by this class and by Keras's
  count of the micro-step (`set_accumulation_steps`, `set_scale`, a restore, a write by the user): each
  PyTorch tensor counts its own in-place writes (`Tensor._version`), without a read;
- whether the update's gradients are finite: it need not. A skipped update is computed as one whose
  coefficients leave every variable as it was (a learning rate of 0, a momentum factor of 1), over
  gradients whose NaNs and Infs were replaced by zeros, so that the same kernels run either way;
- the sums of squares: float64 scalars on the device. On an accelerator each tensor's norm is taken with
  float64 accumulation (`torch._foreach_norm(..., dtype=torch.float64)`, one kernel), exact for any
  finite float32 gradient. On a CPU that costs ~20x a float32 dot product, and a read costs nothing (no
  queue): there the float32 dot products are taken, and only where their sum lies outside [1e-20, 1e20]
  (one read, free on a CPU) the float64 norms.
The statistics then run through `gain.step` in float64 over PyTorch's own operations (`TORCH_OPS`: a
`keras.ops` call on a scalar costs several times the kernel). The stored layout is the one of the JAX and
PyTorch mechanics (`functional`): float32 mantissas of one power-of-two exponent.

The accumulators are not zeroed after an update: the first micro-batch of the next one overwrites them
(a copy instead of an addition, and one pass less); a saved file holds zeros for them between updates, as
every other backend's does.

Elsewhere, the generic mechanics of `functional` (one host read per micro-batch and one per update):
Apple's MPS (no float64), gradient clipping, AdaScaleAdam's preconditioned statistics, an update rule of
a subclass (`update_step` or `_apply_update` overridden), variables of several dtypes, and a step traced
by `torch.compile`.
"""

import keras
import numpy as np
import torch

from keras_adascale import functional
from keras_adascale import gain as gain_lib
from keras_adascale import setting as setting_lib
from keras_adascale.numerics import NUMBERS

_FLOAT64 = torch.float64


class _TorchOps:
    """What `gain.step` asks of a namespace of tensors, on PyTorch's own scalars (one device, no `keras.ops`)."""

    @staticmethod
    def where(condition, x, y):
        return torch.where(condition, x, y)

    @staticmethod
    def all_equal(xs, ys):
        return torch.all(torch.eq(xs, ys))

    @staticmethod
    def like(value, reference):
        if isinstance(value, torch.Tensor):
            return value.to(reference.dtype)
        return torch.full((), value, dtype=reference.dtype, device=reference.device)  # a fill: no copy

    @staticmethod
    def logical_and(x, y):
        return torch.logical_and(x, y)

    @classmethod
    def maximum(cls, x, y):
        return torch.maximum(*cls._tensors(x, y))

    @classmethod
    def minimum(cls, x, y):
        return torch.minimum(*cls._tensors(x, y))

    @classmethod
    def _tensors(cls, x, y):
        return (x if isinstance(x, torch.Tensor) else cls.like(x, y)), (y if isinstance(y, torch.Tensor) else cls.like(y, x))

    @staticmethod
    def divide_no_nan(x, y):
        nonzero = y != 0
        return torch.where(nonzero, x / torch.where(nonzero, y, torch.ones_like(y)), torch.zeros_like(x))

    @staticmethod
    def cast(x, dtype):
        return x.to(getattr(torch, keras.backend.standardize_dtype(dtype)))

    zeros_like = staticmethod(torch.zeros_like)
    ones_like = staticmethod(torch.ones_like)
    isfinite = staticmethod(torch.isfinite)
    floor = staticmethod(torch.floor)


TORCH_OPS = _TorchOps()


class _HostSetting:
    """The scale setting and Keras's micro-step count as the host knows them, and the tensors' write counts
    (`Tensor._version`) they were known at."""

    def __init__(self, setting, micro_step, versions):
        self.setting, self.micro_step, self.versions = setting, micro_step, versions


def _value(variable_or_tensor, device):
    """A learning rate (Keras variable, tensor or number) as a float32 tensor on `device`, without a read."""
    if isinstance(variable_or_tensor, keras.Variable):
        variable_or_tensor = variable_or_tensor.value
    if isinstance(variable_or_tensor, torch.Tensor):
        return variable_or_tensor.to(torch.float32)
    return torch.full((), float(variable_or_tensor), dtype=torch.float32, device=device)


def _float64_sqr_norm(tensors):
    """`sum_k ||t_k||^2` in float64 on the device: each norm accumulated in float64 (exact for finite float32)."""
    norms = torch._foreach_norm(tensors, 2, dtype=_FLOAT64)
    return torch.stack(norms).square().sum()


def _sanitized(tensors, finite):
    """The tensors with every entry replaced by 0 where `finite` is False (a skipped update), in place."""
    zero = torch.zeros((), dtype=tensors[0].dtype, device=tensors[0].device)
    for tensor in tensors:
        torch.where(finite, tensor, zero, out=tensor)
    return tensors


def _sgd_rule(optimizer, sums, variables, micro_batches, finite, learning_rate):
    """Keras's SGD (`keras.optimizers.SGD.update_step`, with AdaScaleSGD's decoupled weight decay) over all the
    variables at once, for the mean gradient `sums / micro_batches`; every variable kept where not finite."""
    dtype = sums[0].dtype
    params = [v.value for v in variables]
    lr = learning_rate.to(dtype)
    keep = finite.to(dtype)  # 1 where the update applies
    if optimizer.weight_decay is not None:
        decayed = [p for p, v in zip(params, variables) if optimizer._use_weight_decay(v)]
        if decayed:
            torch._foreach_sub_(decayed, torch._foreach_mul(decayed, keep * lr * optimizer.weight_decay))
    # g x lr, in the accumulators (they are spent): 0 where not finite.
    torch._foreach_mul_(_sanitized(sums, finite), keep * lr / micro_batches)
    if not optimizer.momentum:
        torch._foreach_sub_(params, sums)
        return
    momentum = float(optimizer.momentum)
    velocities = [optimizer.momentums[optimizer._get_variable_index(v)].value for v in variables]
    # m = m x momentum - g x lr (m as it was where not finite)
    torch._foreach_mul_(velocities, torch.where(finite, momentum, 1.0).to(dtype))
    torch._foreach_sub_(velocities, sums)
    if optimizer.nesterov:
        step = torch._foreach_mul(velocities, keep * momentum)
        torch._foreach_sub_(step, sums)
        torch._foreach_add_(params, step)
    else:
        torch._foreach_addcmul_(params, velocities, [keep] * len(params))


def _adam_rule(optimizer, sums, variables, micro_batches, finite, state):
    """AdaScaleAdam's update (`adam.AdaScaleAdam._apply_update` and `update_step`) over all the variables at
    once, for the mean gradient `sums / micro_batches`; every variable, moment and age kept where not finite."""
    dtype = sums[0].dtype
    params = [v.value for v in variables]
    keep = finite.to(dtype)
    grads = _sanitized(sums, finite)
    torch._foreach_div_(grads, float(micro_batches))
    gain = state.gain.to(_FLOAT64)
    number = lambda value: torch.full((), value, dtype=_FLOAT64, device=gain.device)  # noqa: E731 (a fill)
    one_minus_betas = torch.stack([number(1.0 - optimizer.beta_1), number(1.0 - optimizer.beta_2)])
    scaled = torch.minimum(torch.ones_like(one_minus_betas), gain * one_minus_betas)
    ages = optimizer._moment_ages.value.to(_FLOAT64) + torch.where(
        one_minus_betas < 1.0, torch.log1p(-scaled) / torch.log1p(-one_minus_betas), torch.ones_like(scaled))
    learning_rate = state.effective_learning_rate.to(_FLOAT64)
    if optimizer.weight_decay is not None:
        decayed = [p for p, v in zip(params, variables) if optimizer._use_weight_decay(v)]
        if decayed:
            rate = (torch.sqrt(gain) * learning_rate * optimizer.weight_decay).to(dtype) * keep
            torch._foreach_sub_(decayed, torch._foreach_mul(decayed, rate))
    beta_1_power = float(optimizer.beta_1) ** ages[0]
    beta_2_power = float(optimizer.beta_2) ** ages[1]
    alpha = (learning_rate * torch.sqrt(1 - beta_2_power) / (1 - beta_1_power)).to(dtype) * keep
    weights = (scaled.to(dtype) * keep)
    indices = [optimizer._get_variable_index(v) for v in variables]
    m = [optimizer._momentums[i].value for i in indices]
    v = [optimizer._velocities[i].value for i in indices]
    torch._foreach_lerp_(m, grads, weights[0])
    torch._foreach_lerp_(v, torch._foreach_mul(grads, grads), weights[1])
    if optimizer.amsgrad:
        v_hat = [optimizer._velocity_hats[i].value for i in indices]
        torch._foreach_maximum_(v_hat, v)
        v = v_hat
    denominators = torch._foreach_sqrt(v)
    torch._foreach_add_(denominators, (optimizer.epsilon / torch.sqrt(gain)).to(dtype))
    steps = torch._foreach_div(m, denominators)
    torch._foreach_mul_(steps, alpha)
    torch._foreach_sub_(params, steps)
    ages_value = optimizer._moment_ages.value
    ages_value.copy_(torch.where(finite, ages.to(ages_value.dtype), ages_value))


def _rule_of(optimizer):
    """The fused rule of this optimizer's update, or None where the generic mechanics must run it."""
    cls = type(optimizer)
    names = (cls.update_step.__qualname__, cls._apply_update.__qualname__)
    if names == ("AdaScaleSGD.update_step", "AdaScaleMechanics._apply_update"):
        return "sgd"
    if names == ("AdaScaleAdam.update_step", "AdaScaleAdam._apply_update") and optimizer.statistics == "raw":
        return "adam"
    return None


class AdaScaleMechanics(functional.AdaScaleMechanics):
    """The Keras optimizer hooks of AdaScale on PyTorch: the fused update where it applies (see the module)."""

    # Forced by the tests to take the accelerator's sums of squares on a CPU (None: by the device).
    _float64_norms = None

    def _fused_rule(self, trainable_variables):
        """"sgd" or "adam" where this optimizer's updates take the fused path, else False (decided once)."""
        rule = self.__dict__.get("_fused")
        if rule is None:
            device = trainable_variables[0].value.device if trainable_variables else None
            dtypes = {v.value.dtype for v in trainable_variables}
            rule = False
            if (device is not None and device.type != "mps" and dtypes <= {torch.float32, torch.float64}
                    and len(dtypes) == 1 and not (self.clipnorm or self.clipvalue or self.global_clipnorm)):
                rule = _rule_of(self) or False
            self.__dict__["_fused"] = rule
        return rule

    def _backend_apply_gradients(self, grads, trainable_variables):
        if (self._incoming_statistic is not None or torch.compiler.is_compiling()
                or not self._fused_rule(trainable_variables)):
            return super()._backend_apply_gradients(grads, trainable_variables)
        host = self._host_setting()
        updates_before = host.setting.updates
        with torch.no_grad():  # in place on the variables, as Keras's own PyTorch optimizers
            self._fused_apply(grads, trainable_variables, host)
        if self.use_ema:
            self._moving_average_step(updates_before)

    # The host's copy of the setting.

    def _versions(self):
        return tuple((id(t), t._version) for t in (self._iterations.value, self._setting_counters.value,
                                                   self._setting_scales.value))

    def _host_setting(self):
        """The setting and micro-step as the host knows them; read from the variables where they were written
        other than by this class and Keras's count of the micro-step."""
        host = self.__dict__.get("_host")
        if host is None or host.versions != self._versions():
            host = _HostSetting(self._setting_numbers(), int(self._iterations.numpy()), None)
            self.__dict__["_host"] = host
        return host

    def _write_host_setting(self, host, setting, micro_step):
        """Writes `setting` into the two variables (fills: no copy from the host) and records what the host knows
        after Keras counts this micro-step."""
        counters, scales = setting_lib.values(setting, self._configuration, NUMBERS,
                                              np.zeros(len(setting_lib.COUNTERS), np.int64), np.zeros(3))
        for tensor, numbers in ((self._setting_counters.value, counters), (self._setting_scales.value, scales)):
            for index, number in enumerate(numbers):
                tensor[index].fill_(number.item())
        self._record(host, setting, micro_step)

    def _record(self, host, setting, micro_step):
        host.setting, host.micro_step = setting, micro_step + 1
        versions = list(self._versions())
        identity, version = versions[0]
        versions[0] = (identity, version + 1)  # Keras's `iterations.assign_add(1)` after this method: one copy_
        host.versions = tuple(versions)

    # The sums of squares.

    def _use_float64_norms(self, tensors):
        if self._float64_norms is not None:
            return self._float64_norms
        return tensors[0].device.type != "cpu"

    def _sqr_norm64(self, tensors):
        """`sum_k ||t_k||^2` as a float64 scalar on the device, exact for any finite float32 tensors."""
        tensors = [t if t.dtype in (torch.float32, _FLOAT64) else t.to(torch.float32) for t in tensors]
        if self._use_float64_norms(tensors):
            return _float64_sqr_norm(tensors)
        fast = torch.stack([torch.dot(t.reshape(-1), t.reshape(-1)) for t in tensors]).sum()
        if bool((fast >= gain_lib.SMALLEST_FAST_SUM) & (fast <= functional.LARGEST_FAST_SUM)):  # a CPU: no queue
            return fast.to(_FLOAT64)
        return _float64_sqr_norm(tensors)

    def _sqr_norm_sum(self, tensors):
        mantissa, exponent = torch.frexp(self._sqr_norm64(tensors))
        return mantissa.to(torch.float32), exponent.to(torch.int32)

    @staticmethod
    def _block_value(block):
        """A stored `[mantissa, exponent]` (float32) as a float64 number on the device."""
        return block[0].to(_FLOAT64) * torch.exp2(block[1].to(_FLOAT64))

    @staticmethod
    def _store_block(variable, number):
        mantissa, exponent = torch.frexp(number)
        variable.value.copy_(torch.stack([mantissa.to(torch.float32), exponent.to(torch.float32)]))

    # One micro-batch.

    def _count_step(self):
        step = self.__dict__.get("_count_step_tensor")
        if step is None:
            step = self.__dict__["_count_step_tensor"] = self._count_added()
        return step

    def _fused_apply(self, grads, trainable_variables, host):
        setting, micro_step = host.setting, host.micro_step
        micro_batches = setting_lib.accumulated(setting, micro_step)
        first, completes = micro_batches == 1, setting_lib.is_update_step(setting, micro_step)
        local = self._sqr_norm64(self._statistic_gradients(grads, trainable_variables))
        if self._configuration.steps:
            accumulators = [a.value for a in self._accumulators(trainable_variables)]
            grads = [g.to(a.dtype) for g, a in zip(grads, accumulators)]
            (torch._foreach_copy_ if first else torch._foreach_add_)(accumulators, grads)
            statistic = local if first else self._block_value(self._sample_sqr_norm_accumulator.value) + local
            count = self._sample_count_accumulator.value
            if first:
                count.copy_(self._count_step())
            else:
                count.add_(self._count_step())
            if not completes:
                self._store_block(self._sample_sqr_norm_accumulator, statistic)
                self._record(host, setting, micro_step)
                return
            sums, counted = accumulators, count
        else:
            sums, statistic, counted = [g.clone() for g in grads], local, None
        mean_sqr_norm = self._sqr_norm64(sums) / float(micro_batches) ** 2
        state, finite = self._fused_state_step(statistic, mean_sqr_norm, setting, micro_batches, counted)
        rule = self.__dict__["_fused"]
        if rule == "sgd":
            _sgd_rule(self, sums, trainable_variables, micro_batches, finite, state.effective_learning_rate)
        else:
            _adam_rule(self, sums, trainable_variables, micro_batches, finite, state)
        self._write_host_setting(host, setting_lib.complete(setting, micro_step, NUMBERS), micro_step)

    def _fused_state_step(self, statistic, mean_sqr_norm, setting, micro_batches, counted):
        """`gain.step` in float64 on the device; writes the state variables. Returns `(state, finite)`."""
        device = statistic.device
        exponent = self._statistics_exponent.value
        floats = self._state_floats.value
        counters = self._state_counters.value
        unit = torch.exp2(exponent.to(_FLOAT64))
        fields = {name: floats[i] for i, name in enumerate(gain_lib.FLOAT_FIELDS)}
        fields.update({name: counters[i] for i, name in enumerate(gain_lib.COUNTER_FIELDS)})
        fields["variance_average"] = fields["variance_average"].to(_FLOAT64) * unit
        fields["sqr_norm_average"] = fields["sqr_norm_average"].to(_FLOAT64) * unit
        fields["average_weight"] = fields["average_weight"].to(_FLOAT64)
        state = gain_lib.AdaScaleState(**fields)
        scale = float(setting_lib.update_scale(setting, micro_batches, NUMBERS))
        smoothing = (self._requested_smoothing if self._requested_smoothing is not None
                     else max(1.0 - scale / 1000.0, 0.0))
        number = lambda value: torch.full((), float(value), dtype=_FLOAT64, device=device)  # noqa: E731
        measured = None
        if counted is not None:
            replicas = float(self._configuration.replicas)
            measured = torch.logical_and(torch.abs(counted[0] - replicas * micro_batches) < 0.5,
                                         torch.abs(counted[1] - replicas * replicas * micro_batches) < 0.5)
        state, finite = self._state_step(
            state, statistic, mean_sqr_norm, _value(self.learning_rate, device),
            number(micro_batches * self._configuration.replicas), number(scale), number(smoothing),
            measured=measured, ops=TORCH_OPS)
        # The averages as float32 mantissas of one exponent (the larger one's in [0.5, 1)).
        _, shift = torch.frexp(torch.maximum(torch.abs(state.variance_average), torch.abs(state.sqr_norm_average)))
        shift = shift.to(torch.int32)
        scaled = {"variance_average": torch.ldexp(state.variance_average, -shift.to(_FLOAT64)),
                  "sqr_norm_average": torch.ldexp(state.sqr_norm_average, -shift.to(_FLOAT64))}
        floats.copy_(torch.stack([scaled.get(name, getattr(state, name)).to(floats.dtype)
                                  for name in gain_lib.FLOAT_FIELDS]))
        counters.copy_(torch.stack([getattr(state, name).to(counters.dtype) for name in gain_lib.COUNTER_FIELDS]))
        exponent.copy_(shift)
        return state, finite

    # A saved file holds zeros for the accumulators between updates (this class leaves the last update's there).

    def _spent_sums(self, variable):
        if not self.__dict__.get("_fused") or not self._configuration.steps:
            return False
        spent = [*self._accumulated_gradients, self._sample_sqr_norm_accumulator, self._sample_count_accumulator]
        if not any(variable is v for v in spent if v is not None):
            return False
        return not setting_lib.in_update(self._setting_numbers(), int(self._iterations.numpy()))
