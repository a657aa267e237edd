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
import numpy as np

_CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
# The layers whose rules follow `_grouped_call`'s Dense and Conv ones (`_more_call`).
_MORE = (keras.layers.EinsumDense, keras.layers.Embedding, keras.layers.LayerNormalization,
         keras.layers.BatchNormalization)
_REGULARIZERS = ("kernel_regularizer", "bias_regularizer", "embeddings_regularizer", "gamma_regularizer",
                 "beta_regularizer", "activity_regularizer")


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
    if isinstance(layer, keras.layers.BatchNormalization) and layer.renorm:
        return "batch renormalization (renorm=True) is not covered"
    regularized = [name for name in _REGULARIZERS if getattr(layer, name, None) is not None]
    if regularized:
        return f"its {' and '.join(regularized)}'s gradient does not pass through the layer's output"
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


def _group_sums(values, shape, groups):
    """Each group's sum of `values` (rows first) over its rows and over the axes that a weight of `shape`
    broadcasts along (right-aligned, as NumPy broadcasts): (groups, *shape), in float32."""
    grouped = values.reshape((groups, -1) + values.shape[1:]).astype(jnp.float32)
    padded = (1,) * (values.ndim - len(shape)) + tuple(shape)
    axes = (1,) + tuple(1 + axis for axis in range(1, values.ndim) if padded[axis] == 1)
    return jnp.sum(grouped, axis=axes, keepdims=True).reshape((groups,) + tuple(shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _offset(outputs, offset, probe, groups):
    del probe
    return outputs + offset


def _offset_forward(outputs, offset, probe, groups):
    return _offset(outputs, offset, probe, groups), offset


def _offset_backward(groups, offset, dy):
    """A broadcast offset (EinsumDense's bias, a normalization's beta): its gradient per group is the group's
    sum of dy over its rows and the broadcast axes."""
    per_group = _group_sums(dy, offset.shape, groups)
    return dy, jnp.sum(per_group, axis=0).astype(offset.dtype), jnp.sum(jnp.square(per_group.reshape(groups, -1)),
                                                                        axis=1)


_offset.defvjp(_offset_forward, _offset_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _scale(normalized, scale, probe, groups):
    del probe
    return normalized * scale


def _scale_forward(normalized, scale, probe, groups):
    return _scale(normalized, scale, probe, groups), (normalized, scale)


def _scale_backward(groups, residuals, dy):
    """A normalization's gamma (`scale`, broadcast): its gradient per group is the group's sum of x_hat dy."""
    normalized, scale = residuals
    per_group = _group_sums(normalized.astype(jnp.float32) * dy.astype(jnp.float32), scale.shape, groups)
    return ((dy * scale).astype(normalized.dtype), jnp.sum(per_group, axis=0).astype(scale.dtype),
            jnp.sum(jnp.square(per_group.reshape(groups, -1)), axis=1))


_scale.defvjp(_scale_forward, _scale_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _embedding(ids, table, probe, groups):
    del probe
    return jnp.take(table, ids, axis=0)


def _embedding_forward(ids, table, probe, groups):
    return _embedding(ids, table, probe, groups), (ids, table)


def _embedding_backward(groups, residuals, dy):
    """The table's gradient scatters each row's dy into the row of the table its id picks: a group's gradient
    has, in each row of the table, the sum of the group's dy with that id. Summed per (group, id) into a
    (groups x vocabulary, width) array where that is no larger than the rows, else after sorting the rows by
    (group, id): either way exact, with the ids `jnp.take` drops (out of range) dropped."""
    ids, table = residuals
    (dtable,) = jax.vjp(lambda weights: jnp.take(weights, ids, axis=0), table)[1](dy)
    vocabulary, width = table.shape[0], table.shape[-1]
    flat_ids = ids.reshape(-1)
    flat_ids = jnp.where(flat_ids < 0, flat_ids + vocabulary, flat_ids)  # jnp.take's negative ids
    valid = (flat_ids >= 0) & (flat_ids < vocabulary)
    flat_dy = jnp.where(valid[:, None], dy.reshape(-1, width).astype(jnp.float32), 0.0)
    rows = flat_ids.shape[0]
    group = jnp.arange(rows) // (rows // groups)
    keys = group * vocabulary + jnp.where(valid, flat_ids, 0)
    if groups * vocabulary <= rows:
        sums = jax.ops.segment_sum(flat_dy, keys, num_segments=groups * vocabulary)
        squares = jnp.sum(jnp.square(sums).reshape(groups, -1), axis=1)
    else:
        order = jnp.argsort(keys)
        sorted_keys = keys[order]
        segments = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                                    jnp.cumsum(sorted_keys[1:] != sorted_keys[:-1]).astype(jnp.int32)])
        sums = jax.ops.segment_sum(flat_dy[order], segments, num_segments=rows)  # per (group, id) present
        owners = jax.ops.segment_max(sorted_keys // vocabulary, segments, num_segments=rows)
        squares = jax.ops.segment_sum(jnp.sum(jnp.square(sums), axis=1), jnp.clip(owners, 0, groups - 1),
                                      num_segments=groups)
    return np.zeros(ids.shape, jax.dtypes.float0), dtable.astype(table.dtype), squares


_embedding.defvjp(_embedding_forward, _embedding_backward)


def _einsum_rows(equation):
    """An EinsumDense equation's parts `(inputs, kernel, output)` ("..." as "*") where its output's rows are its
    input's (the first axis of both, not the kernel's), else None."""
    inputs, _, rest = equation.replace("...", "*").partition(",")
    kernel, _, output = rest.partition("->")
    if not inputs or not output or inputs[0] != output[0] or inputs[0] in kernel:
        return None
    return inputs, kernel, output


def _einsum_as_matmul(equation):
    """c, where the equation is a matmul: the input's last c axes contracted with the kernel's first c, the
    input's other axes then the kernel's others the output's, in order; None where it is not."""
    inputs, kernel, output = _einsum_rows(equation)
    contracted = "".join(axis for axis in inputs if axis in kernel and axis not in output)
    kept = "".join(axis for axis in inputs if axis not in kernel)
    new = "".join(axis for axis in kernel if axis not in inputs)
    if contracted and inputs == kept + contracted and kernel == contracted + new and output == kept + new:
        return len(contracted)
    return None


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
                "with group_norms='vmap' (see keras_adascale.group_norms)."
            )
        if isinstance(layer, _MORE):
            return _more_call(layer, probes, groups, inputs, *args, **kwargs)
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
            outputs = _convolution(inputs, kernel, first, groups, functools.partial(jnp.einsum, layer.equation))
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
