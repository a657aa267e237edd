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
layer); a layer called twice in one step (its weight's groups' norms would lose the cross terms); activity
regularizers and `add_loss` losses (their gradients do not pass through the layer's output); LoRA and quantized
Dense layers; an AdaScaleAdam whose statistics are preconditioned (`statistics="raw"` is covered).

A weight's regularizer (kernel, bias, embeddings, gamma, beta) is covered: its gradient is every group's alike and
is added back in closed form (`regularization_terms`). Under a LossScaleOptimizer (Keras's "mixed_float16") the
norms are of the scaled gradients and the train step divides them by the scale squared.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_adascale.backend.jax.group_rules import _grouped, _dense, _convolution, _bias, _offset, _scale, _embedding, _einsum_rows, _einsum_as_matmul, convolution_geometry  # noqa: F401 (tests read them here)

_CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
# The layers whose rules follow `_grouped_call`'s Dense and Conv ones (`_more_call`).
_MORE = (keras.layers.EinsumDense, keras.layers.Embedding, keras.layers.LayerNormalization,
         keras.layers.BatchNormalization)


def _covered(layer):
    """Why `layer`'s weights are not covered (a reason), or None where they are; for layers with weights."""
    if type(layer) not in (keras.layers.Dense, *_CONVOLUTIONS, *_MORE):
        return "no rule covers its layer type"
    if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding)) and (
            layer.lora_enabled or layer.quantization_mode is not None):
        return f"LoRA and quantized {type(layer).__name__} layers are not covered"
    if isinstance(layer, keras.layers.EinsumDense) and _einsum_rows(layer.equation) is None:
        return (f"its equation {layer.equation!r} does not keep its input's first (batch) axis as its output's "
                "first, outside the kernel")
    if isinstance(layer, keras.layers.BatchNormalization) and getattr(layer, "renorm", False):  # Keras >= 3.14
        return "batch renormalization (renorm=True) is not covered"
    if getattr(layer, "activity_regularizer", None) is not None:
        return "its activity_regularizer adds a loss of the whole batch's outputs, which the groups' norms do not split"
    return None


def covered_layers(model):
    """The layers whose `call` is replaced: the covered ones that have trainable weights."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if (layer.trainable_weights or _batch_normalizing(layer)) and _covered(layer) is None]


def _batch_normalizing(layer):
    """A trainable BatchNormalization without trainable weights (center=False, scale=False): its `call` is
    replaced too, so that it normalizes each group by the group's own statistics (see `_batch_normalization`)."""
    return type(layer) is keras.layers.BatchNormalization and layer.trainable


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
            "pass for Dense, EinsumDense, Conv1D/2D/3D, Embedding, LayerNormalization and BatchNormalization "
            f"weights, and cannot measure: {'; '.join(problems)}. Build the model "
            "with group_norms='vmap' (each group's gradient in a jax.vmap: exact for every layer, n gradients in "
            "memory), or use gradient accumulation."
        )


def _regularized(model):
    """`(index, regularizer)` of every trainable variable of `model` with a regularizer (Keras adds its loss,
    `regularizer(value)`, to the model's loss: see `regularization_terms`)."""
    return [(index, variable.regularizer) for index, variable in enumerate(model.trainable_variables)
            if getattr(variable, "regularizer", None) is not None]


def regularization_terms(model, trainable, grads, groups, scale):
    """What the weights' regularizers add to the sum over the groups of |g_g|^2 (a float32 scalar; 0.0 without).

    A regularizer's loss depends on the weight only, so its gradient r (times `scale`, the loss scale) is in every
    group's gradient alike and passes through no layer's output: g_g = d_g + s r, d_g the part the rules measure.
    With `grads` = G = mean of d_g + s r (the replica's gradient, scaled as the loss is):
    sum over g of |d_g + s r|^2 = sum |d_g|^2 + 2 n s r.G - n s^2 |r|^2."""
    found = _regularized(model)
    if not found:
        return 0.0

    def total(values):  # as Keras adds the regularization losses to the loss (`_aggregate_additional_loss`)
        return sum(keras.ops.sum(keras.ops.cast(regularizer(value), "float32"))
                   for value, (_, regularizer) in zip(values, found, strict=True))

    penalties = jax.grad(total)([trainable[index] for index, _ in found])
    scale = keras.ops.cast(scale, "float32")
    cross = sum(jnp.vdot(r.astype(jnp.float32), grads[index].astype(jnp.float32))
                for r, (index, _) in zip(penalties, found, strict=True))
    square = sum(jnp.vdot(r.astype(jnp.float32), r.astype(jnp.float32)) for r in penalties)
    return float(groups) * scale * (2.0 * cross - scale * square)


def _value(variable):
    return keras.ops.convert_to_tensor(variable)  # the train step's value of it (Keras's stateless scope)


def _grouped_call(layer, probes, groups, calls):
    """`layer.call` with the groups' norms of its kernel and bias into `probes` (two zero (groups,) arrays)."""
    kernel_probe, bias_probe = probes

    def call(inputs, *args, **kwargs):
        calls[id(layer)] = calls.get(id(layer), 0) + 1
        if calls[id(layer)] > 1 and layer.trainable_weights:
            raise ValueError(
                f"{type(layer).__name__} '{layer.name}' is called twice in one step: its weights' gradient sums "
                "both calls, and the groups' norms of each call alone would miss their cross terms. Build the model "
                "with group_norms='vmap' (see keras_adascale.backend.jax.group_norms)."
            )
        if isinstance(layer, _MORE):
            return _more_call(layer, probes, groups, inputs, *args, **kwargs)
        if isinstance(layer, keras.layers.Dense):
            outputs = _dense(inputs, _value(layer.kernel), kernel_probe, groups)
            channels_last = True
        else:
            outputs = _convolution(inputs, _value(layer.kernel), kernel_probe, groups, layer.convolution_op,
                                   convolution_geometry(layer))
            channels_last = layer.data_format == "channels_last"
        if layer.bias is not None:
            outputs = _bias(outputs, _value(layer.bias), bias_probe, groups, channels_last)
        return layer.activation(outputs) if layer.activation is not None else outputs

    return call


def _more_call(layer, probes, groups, inputs, *args, **kwargs):
    """EinsumDense's, Embedding's, LayerNormalization's and BatchNormalization's `call`, with the groups' norms
    of their two weights (kernel and bias, embeddings, gamma and beta) into `probes`."""
    first, second = probes
    if isinstance(layer, keras.layers.Embedding):
        ids = inputs if inputs.dtype in (jnp.int32, jnp.int64) else inputs.astype(jnp.int32)
        return keras.ops.cast(_embedding(ids, _value(layer.embeddings), first, groups), layer.compute_dtype)
    if isinstance(layer, keras.layers.EinsumDense):
        kernel = _value(layer.kernel)
        contracted = _einsum_as_matmul(layer.equation)
        if contracted is not None:  # Dense's rule on the flattened axes (Gram matrices or per-group kernels)
            kept = inputs.shape[: inputs.ndim - contracted]
            flat = _dense(inputs.reshape(kept + (-1,)),
                          kernel.reshape((int(np.prod(kernel.shape[:contracted])), -1)), first, groups)
            outputs = flat.reshape(kept + kernel.shape[contracted:])
        else:  # the per-group kernel gradients: the einsum transposed for each group's rows
            outputs = _convolution(inputs, kernel, first, groups, functools.partial(jnp.einsum, layer.equation), None)
        if layer.bias is not None:
            outputs = _offset(outputs, _value(layer.bias), second, groups)
        return layer.activation(outputs) if layer.activation is not None else outputs
    # LayerNormalization and BatchNormalization: x_hat as Keras computes it (in float32 at least), then gamma
    # and beta by the rules, which need x_hat and dy only.
    x = inputs.astype(jnp.result_type(inputs.dtype, jnp.float32))
    shape = [1] * x.ndim
    if isinstance(layer, keras.layers.LayerNormalization):
        normalized = keras.ops.layer_normalization(x, None, None, layer.axis, layer.epsilon,
                                                   rms_scaling=layer.rms_scaling)
        for axis in layer.axis:
            shape[axis] = x.shape[axis]
    else:
        normalized = _batch_normalization(layer, x, groups, *args, **kwargs)
        shape[layer.axis] = x.shape[layer.axis]
    if layer.gamma is not None:
        normalized = _scale(normalized, _value(layer.gamma).astype(x.dtype).reshape(shape), first, groups)
    if layer.beta is not None:
        normalized = _offset(normalized, _value(layer.beta).astype(x.dtype).reshape(shape), second, groups)
    return keras.ops.cast(normalized, layer.compute_dtype)


def _batch_normalization(layer, x, groups, training=None, mask=None):
    """BatchNormalization's x_hat with each group normalized by its own rows' mean and variance, in training (as
    `group_norms="vmap"` and gradient accumulation normalize each sample's rows alone): each group's loss then
    depends on its rows only, so the rules' per-group parts of the gradient are the groups' own gradients, for
    every layer. The moving statistics move towards the groups' mean of their means and variances, as vmap's do."""
    moving_mean, moving_variance = (_value(v).astype(x.dtype) for v in (layer.moving_mean, layer.moving_variance))
    if not (training and layer.trainable):
        return keras.ops.batch_normalization(x, moving_mean, moving_variance, layer.axis, epsilon=layer.epsilon)
    grouped = x.reshape((groups, -1) + x.shape[1:])
    if mask is None:
        mean, variance = jax.vmap(lambda rows: layer._moments(rows, None))(grouped)
    else:
        mean, variance = jax.vmap(layer._moments)(grouped, mask.reshape((groups, -1) + mask.shape[1:]))
    momentum = layer.momentum
    layer.moving_mean.assign(moving_mean * momentum + jnp.mean(mean, axis=0) * (1.0 - momentum))
    layer.moving_variance.assign(moving_variance * momentum + jnp.mean(variance, axis=0) * (1.0 - momentum))
    normalized = jax.vmap(lambda rows, m, v: keras.ops.batch_normalization(rows, m, v, layer.axis,
                                                                            epsilon=layer.epsilon))(
        grouped, mean, variance)
    return normalized.reshape(x.shape)


@contextlib.contextmanager
def measuring(model, probes, groups):
    """While the train step is traced: every covered layer's `call` measures its groups' norms into its two
    probes (`probes`: one pair per layer of `covered_layers(model)`, in order)."""
    layers = covered_layers(model)
    calls = {}
    stateless_call = model.stateless_call

    regularized = len(_regularized(model))

    def without_added_losses(*args, **kwargs):
        result = stateless_call(*args, **kwargs)
        added = len(result[-1]) - regularized if kwargs.get("return_losses") else 0
        if added:  # Keras lists the weights' regularization losses last, one per regularized weight
            raise ValueError(
                f"{type(model).__name__}(groups={groups}) measures the groups' gradient norms through the layers' "
                f"outputs, and the model adds {added} loss{'es' if added != 1 else ''} in its forward pass "
                "(`add_loss`, an activity regularizer): their gradient does not pass through the outputs. Build "
                "the model with group_norms='vmap' (see keras_adascale.backend.jax.group_norms)."
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
