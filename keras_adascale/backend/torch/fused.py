"""PyTorch's fused update: AdaScaleSGD's and AdaScaleAdam's rules over all the variables at once, in PyTorch's
multi-tensor kernels (`torch._foreach_*`, as Keras's own PyTorch optimizers), and `gain.step`'s operations on
PyTorch's own scalars (`TORCH_OPS`). Nothing here reads a tensor from the host: a skipped update is one whose
coefficients leave every variable as it was (see `mechanics`).
"""

import keras
import torch

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


def value_of(variable_or_tensor, device):
    """A learning rate (Keras variable, tensor or number) as a float32 tensor on `device`, without a read."""
    if isinstance(variable_or_tensor, keras.Variable):
        variable_or_tensor = variable_or_tensor.value
    if isinstance(variable_or_tensor, torch.Tensor):
        return variable_or_tensor.to(torch.float32)
    return torch.full((), float(variable_or_tensor), dtype=torch.float32, device=device)


def float64_sqr_norm(tensors):
    """`sum_k ||t_k||^2` in float64 on the device: each norm accumulated in float64 (exact for finite float32)."""
    norms = torch._foreach_norm(tensors, 2, dtype=_FLOAT64)
    return torch.stack(norms).square().sum()


def _sanitized(tensors, finite):
    """The tensors with every entry replaced by 0 where `finite` is False (a skipped update), in place."""
    zero = torch.zeros((), dtype=tensors[0].dtype, device=tensors[0].device)
    for tensor in tensors:
        torch.where(finite, tensor, zero, out=tensor)
    return tensors


def sgd_rule(optimizer, sums, variables, micro_batches, finite, learning_rate):
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
    # - g x lr enters each sum below as one multiply-add (`addcmul` by the one scalar -lr / k): no pass of its own
    # over the gradients; 0 where not finite (the NaNs zeroed first).
    grads = _sanitized(sums, finite)
    rate = [-(keep * lr / micro_batches)] * len(params)
    if not optimizer.momentum:
        torch._foreach_addcmul_(params, grads, rate)
        return
    momentum = float(optimizer.momentum)
    velocities = [optimizer.momentums[optimizer._get_variable_index(v)].value for v in variables]
    # m = m x momentum - g x lr (m as it was where not finite)
    torch._foreach_mul_(velocities, torch.where(finite, momentum, 1.0).to(dtype))
    torch._foreach_addcmul_(velocities, grads, rate)
    if optimizer.nesterov:
        step = torch._foreach_mul(velocities, keep * momentum)
        torch._foreach_addcmul_(step, grads, rate)
        torch._foreach_add_(params, step)
    else:
        torch._foreach_addcmul_(params, velocities, [keep] * len(params))


def adam_rule(optimizer, sums, variables, micro_batches, finite, state):
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


# The methods whose rule a fused rule replaces, by (module, qualified name): a subclass that overrides one of them
# runs its own rule through the generic mechanics.
_RULES = {
    "sgd": (("keras_adascale.optimizer", "AdaScaleSGD.update_step"),
            ("keras_adascale.backend.common.mechanics", "AccumulationMechanics._apply_update")),
    "adam": (("keras_adascale.adam", "AdaScaleAdam.update_step"), ("keras_adascale.adam", "AdaScaleAdam._apply_update")),
}


def rule_of(optimizer):
    """The fused rule of this optimizer's update ("sgd" or "adam"), or None where the generic mechanics must run it."""
    cls = type(optimizer)
    methods = tuple((method.__module__, method.__qualname__) for method in (cls.update_step, cls._apply_update))
    for rule, expected in _RULES.items():
        if methods == expected and getattr(optimizer, "statistics", "raw") == "raw":
            return rule
    return None
