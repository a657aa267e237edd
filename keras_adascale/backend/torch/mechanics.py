"""AdaScale's mechanics on PyTorch: AdaScale's update in PyTorch's multi-tensor kernels, with no read of the device from the host.

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
The statistics then run through `gain.step` in float64 over PyTorch's own operations (`fused.TORCH_OPS`: a
`keras.ops` call on a scalar costs several times the kernel), the rules in `fused`. The stored layout is the
one of the JAX mechanics (`backend.common`): float32 mantissas of one power-of-two exponent.

The accumulators are not zeroed after an update: the first micro-batch of the next one overwrites them
(a copy instead of an addition, and one pass less); a saved file holds zeros for them between updates, as
every other backend's does.

Elsewhere, the generic mechanics of `eager` (one host read per micro-batch and one per update):
Apple's MPS (no float64), gradient clipping, AdaScaleAdam's preconditioned statistics, an update rule of
a subclass (`update_step` or `_apply_update` overridden), variables of several dtypes, and a step traced
by `torch.compile`.
"""

import numpy as np
import torch

from keras_adascale import gain as gain_lib
from keras_adascale import setting as setting_lib
from keras_adascale.backend.common.block_float import LARGEST_FAST_SUM
from keras_adascale.backend.torch import fused
from keras_adascale.backend.torch.eager import EagerMechanics
from keras_adascale.numerics import NUMBERS

_FLOAT64 = torch.float64


class _HostSetting:
    """The scale setting and Keras's micro-step count as the host knows them, and the tensors' write counts
    (`Tensor._version`) they were known at."""

    def __init__(self, setting, micro_step, versions):
        self.setting, self.micro_step, self.versions = setting, micro_step, versions


class AdaScaleMechanics(EagerMechanics):
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
                rule = fused.rule_of(self) or False
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
            return fused.float64_sqr_norm(tensors)
        fast = torch.stack([torch.dot(t.reshape(-1), t.reshape(-1)) for t in tensors]).sum()
        if bool((fast >= gain_lib.SMALLEST_FAST_SUM) & (fast <= LARGEST_FAST_SUM)):  # a CPU: no queue
            return fast.to(_FLOAT64)
        return fused.float64_sqr_norm(tensors)

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
            count = self._sample_count_accumulator.value  # what one micro-batch of the R replicas adds (made once)
            replicas = float(self._configuration.replicas)
            step = self.__dict__["_count_step_tensor"] = torch.stack([
                torch.full((), replicas * increment, dtype=count.dtype, device=count.device)
                for increment in self._count_increment()])
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
        # One micro-batch (no accumulation, or k = 1): the mean is that micro-batch, whose sum was just taken.
        mean_sqr_norm = local if first else self._sqr_norm64(sums) / float(micro_batches) ** 2
        state, finite = self._fused_state_step(statistic, mean_sqr_norm, setting, micro_batches, counted)
        rule = self.__dict__["_fused"]
        if rule == "sgd":
            fused.sgd_rule(self, sums, trainable_variables, micro_batches, finite, state.effective_learning_rate)
        else:
            fused.adam_rule(self, sums, trainable_variables, micro_batches, finite, state)
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
            state, statistic, mean_sqr_norm, fused.value_of(self.learning_rate, device),
            number(micro_batches * self._configuration.replicas), number(scale), number(smoothing),
            measured=measured, ops=fused.TORCH_OPS)
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
