"""The groups' squared gradient norms in the one backward pass of the whole batch (JAX): `AdaScaleModel(groups=n)`'s
default way (`group_norms="one_pass"`).

A replica's batch of b rows is n contiguous groups of b / n rows; AdaScale wants, besides the batch's mean gradient,
the sum over the groups of |g_g|^2, g_g the gradient of group g's mean loss. For a layer whose output is linear in
its weight W and computed row by row (Dense, Conv1D/2D/3D), the gradient of the batch's mean loss with respect to
W is the sum over the rows of terms that need only the layer's input X and the loss's gradient D at its output;
group g's part of it is the sum over its rows, and g_g is n times that part (the groups' mean losses average to
the batch's). So the layer's backward, which has X and D anyway, can return the groups' squared norms beside the
ordinary gradients:
- Dense: |X_g^T D_g|^2 = trace((X_g X_g^T)(D_g D_g^T)) from the groups' Gram matrices ("ghost norm", where the rows
  per group are few against the kernel's size), else from the n per-group kernel gradients X_g^T D_g;
- Conv: the n per-group kernel gradients (the layer's own convolution transposed for each group's rows);
- a bias: the per-group sums of D.
Each covered layer's `call` is replaced while the train step is traced (and restored after) by one that applies
a `jax.custom_vjp` op taking a zero "probe" of shape (n,): the probe's cotangent is the layer's per-group squared
norms, so `jax.grad` with respect to the weights and the probes gives the mean gradient and every group's norm in
one backward pass. The norms are summed in float32 (the inputs' and the gradients' dtype may be lower).

What it refuses, before anything trains (`group_norms="vmap"` takes each group's gradient in a `jax.vmap`
instead: exact for every layer, n gradients in memory): a trainable variable no rule covers (named, with its
layer); a layer called twice in one step (its weight's groups' norms would lose the cross terms); kernel, bias
or activity regularizers and `add_loss` losses (their gradients do not pass through the layer's output); LoRA
and quantized Dense layers; an AdaScaleAdam whose statistics are preconditioned (`statistics="raw"` is covered).
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import keras

_CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


def _covered(layer):
    """Why `layer`'s weights are not covered (a reason), or None where they are; for layers with weights."""
    if type(layer) not in (keras.layers.Dense, *_CONVOLUTIONS):
        return "no rule covers its layer type"
    if isinstance(layer, keras.layers.Dense) and (layer.lora_enabled or layer.quantization_mode is not None):
        return "LoRA and quantized Dense layers are not covered"
    regularized = [name for name in ("kernel_regularizer", "bias_regularizer", "activity_regularizer")
                   if getattr(layer, name, None) is not None]
    if regularized:
        return f"its {' and '.join(regularized)}'s gradient does not pass through the layer's output"
    return None


def covered_layers(model):
    """The layers whose `call` is replaced: the covered ones that have trainable weights."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if layer.trainable_weights and _covered(layer) is None]


def check(model, optimizer):
    """Raises ValueError naming what the one-pass norms cannot measure (see the module's documentation)."""
    covered = {id(weight) for layer in covered_layers(model) for weight in layer.trainable_weights}
    problems, seen = [], set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for weight in layer._trainable_variables:  # its own, not its sublayers'
            seen.add(id(weight))
            if id(weight) not in covered:
                problems.append(f"{weight.path} ({type(layer).__name__} '{layer.name}': "
                                f"{_covered(layer) or 'no rule covers its layer type'})")
    problems += [f"{v.path} (the model's own weight)" for v in model.trainable_variables
                 if id(v) not in covered and id(v) not in seen]
    if getattr(optimizer, "statistics", "raw") != "raw":
        problems.append(f"{type(optimizer).__name__}(statistics={optimizer.statistics!r}): its statistics are "
                        "preconditioned by Adam's moments, which the groups' norms do not see (statistics='raw' is "
                        "covered)")
    if problems:
        raise ValueError(
            f"{type(model).__name__}(groups={model.groups}) measures the groups' gradient norms in the one backward "
            f"pass for Dense and Conv1D/2D/3D weights, and cannot measure: {'; '.join(problems)}. Build the model "
            "with group_norms='vmap' (each group's gradient in a jax.vmap: exact for every layer, n gradients in "
            "memory), or use gradient accumulation."
        )


def _grouped(array, groups):
    """(rows, ..., d) -> (groups, rows / groups x ..., d), in float32."""
    return array.reshape((groups, -1, array.shape[-1])).astype(jnp.float32)


def _kernel_norms(transpose, x, dy, groups):
    """Each group's kernel gradient (`transpose(x_g, dy_g)`, the kernel's cotangent), squared and summed; and
    the kernel's whole gradient (their sum)."""
    per_group = jax.vmap(transpose)(x.reshape((groups, -1) + x.shape[1:]), dy.reshape((groups, -1) + dy.shape[1:]))
    squares = jnp.sum(jnp.square(per_group.astype(jnp.float32)).reshape(groups, -1), axis=1)
    return squares, jnp.sum(per_group, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dense(x, kernel, probe, groups):
    del probe
    return jnp.matmul(x, kernel)


def _dense_forward(x, kernel, probe, groups):
    return _dense(x, kernel, probe, groups), (x, kernel)


def _dense_backward(groups, residuals, dy):
    x, kernel = residuals
    dx = jnp.matmul(dy, kernel.T)
    rows = x.size // x.shape[-1] // groups
    flat_x, flat_dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dkernel = jnp.matmul(flat_x.T, flat_dy)
    if rows * rows <= kernel.size:  # the Gram matrices are the smaller
        gx, gd = _grouped(x, groups), _grouped(dy, groups)
        squares = jnp.sum(jnp.einsum("gid,gjd->gij", gx, gx) * jnp.einsum("gio,gjo->gij", gd, gd), axis=(1, 2))
    else:
        squares = jnp.sum(jnp.square(jnp.einsum("gid,gio->gdo", _grouped(x, groups), _grouped(dy, groups))),
                          axis=(1, 2))
    return dx, dkernel.astype(kernel.dtype), squares


_dense.defvjp(_dense_forward, _dense_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _convolution(x, kernel, probe, groups, convolve):
    del probe
    return convolve(x, kernel)


def _convolution_forward(x, kernel, probe, groups, convolve):
    return _convolution(x, kernel, probe, groups, convolve), (x, kernel)


def _convolution_backward(groups, convolve, residuals, dy):
    x, kernel = residuals
    (dx,) = jax.linear_transpose(lambda inputs: convolve(inputs, kernel), x)(dy)

    def transpose(x_group, dy_group):
        (cotangent,) = jax.linear_transpose(lambda weights: convolve(x_group, weights), kernel)(dy_group)
        return cotangent

    squares, dkernel = _kernel_norms(transpose, x, dy, groups)
    return dx, dkernel.astype(kernel.dtype), squares


_convolution.defvjp(_convolution_forward, _convolution_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bias(outputs, bias, probe, groups, channels_last):
    del probe
    shape = (bias.shape[0],) + (1,) * (outputs.ndim - 2) if not channels_last else bias.shape
    return outputs + bias.reshape(shape)


def _bias_forward(outputs, bias, probe, groups, channels_last):
    return _bias(outputs, bias, probe, groups, channels_last), bias


def _bias_backward(groups, channels_last, bias, dy):
    moved = dy if channels_last else jnp.moveaxis(dy, 1, -1)
    per_group = jnp.sum(_grouped(moved, groups), axis=1)  # (groups, units)
    return dy, jnp.sum(per_group, axis=0).astype(bias.dtype), jnp.sum(jnp.square(per_group), axis=1)


_bias.defvjp(_bias_forward, _bias_backward)


def _value(variable):
    return keras.ops.convert_to_tensor(variable)  # the train step's value of it (Keras's stateless scope)


def _grouped_call(layer, probes, groups, calls):
    """`layer.call` with the groups' norms of its kernel and bias into `probes` (two zero (groups,) arrays)."""
    kernel_probe, bias_probe = probes

    def call(inputs, *args, **kwargs):
        calls[id(layer)] = calls.get(id(layer), 0) + 1
        if calls[id(layer)] > 1:
            raise ValueError(
                f"{type(layer).__name__} '{layer.name}' is called twice in one step: its weights' gradient sums "
                "both calls, and the groups' norms of each call alone would miss their cross terms. Build the model "
                "with group_norms='vmap' (see keras_adascale.group_norms)."
            )
        if isinstance(layer, keras.layers.Dense):
            outputs = _dense(inputs, _value(layer.kernel), kernel_probe, groups)
            channels_last = True
        else:
            outputs = _convolution(inputs, _value(layer.kernel), kernel_probe, groups, layer.convolution_op)
            channels_last = layer.data_format == "channels_last"
        if layer.bias is not None:
            outputs = _bias(outputs, _value(layer.bias), bias_probe, groups, channels_last)
        return layer.activation(outputs) if layer.activation is not None else outputs

    return call


@contextlib.contextmanager
def measuring(model, probes, groups):
    """While the train step is traced: every covered layer's `call` measures its groups' norms into its two
    probes (`probes`: one pair per layer of `covered_layers(model)`, in order)."""
    layers = covered_layers(model)
    calls = {}
    stateless_call = model.stateless_call

    def without_added_losses(*args, **kwargs):
        result = stateless_call(*args, **kwargs)
        if kwargs.get("return_losses") and result[-1]:
            raise ValueError(
                f"{type(model).__name__}(groups={groups}) measures the groups' gradient norms through the layers' "
                f"outputs, and the model adds {len(result[-1])} loss{'es' if len(result[-1]) != 1 else ''} in its "
                "forward pass (`add_loss`, a regularizer): their gradient does not pass through the outputs. Build "
                "the model with group_norms='vmap' (see keras_adascale.group_norms)."
            )
        return result

    try:
        for layer, pair in zip(layers, probes, strict=True):
            object.__setattr__(layer, "call", _grouped_call(layer, pair, groups, calls))
        object.__setattr__(model, "stateless_call", without_added_losses)
        yield
    finally:
        for layer in layers:
            if "call" in layer.__dict__:
                object.__delattr__(layer, "call")
        if "stateless_call" in model.__dict__:
            object.__delattr__(model, "stateless_call")


def probes(model, groups):
    """The zero probes `measuring` takes: a (kernel, bias) pair of (groups,) float32 arrays per covered layer."""
    return [(jnp.zeros((groups,), jnp.float32), jnp.zeros((groups,), jnp.float32)) for _ in covered_layers(model)]
