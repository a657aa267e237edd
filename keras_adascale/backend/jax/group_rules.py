"""The one-pass rules of `group_norms`: each covered layer's op as a `jax.custom_vjp` whose backward returns, as the
cotangent of a zero "probe" of shape (n,), the n groups' squared norms of its weight's gradient (see `group_norms`
for the math and what is covered). Pure JAX, but for `convolution_geometry`, which reads a Keras convolution
layer's settings.

A convolution's n per-group kernel gradients are taken one of two ways (`_convolution`), both exact:
- transposed convolutions: the layer's own convolution transposed (`jax.linear_transpose`) for each group's rows,
  one group after another (unrolled in the trace, up to `UNROLLED_GROUPS`; above, one `jax.vmap` over the groups,
  which XLA runs as one grouped convolution), their sum the kernel's gradient. The default: measured on 2 CPU
  cores, XLA ran the n kernel gradients over b / n rows each in 0.45-0.91x the time of its own one kernel gradient
  over the b rows (3 x 3 convolutions of ResNet-20's three stages and of the small CNN, b = 64 and 256, n = 4 and
  8), where the vmap took 1.5-3.0x and the patches below 1.1-3.2x. Also for EinsumDense's general equations
  (`convolve` is then the einsum), and for any convolution other than a plain Keras one (causal padding,
  grouped, or a subclass's own `convolution_op`).
- patches (im2col): the layer's input as patches U (`jax.lax.conv_general_dilated_patches`, one row per output
  position, cin x the kernel's window wide) and the n kernel gradients U_g^T D_g as one batched matrix product, in
  float32. Where the patches hold at most `PATCHES_RATIO` (1) times the elements of the layer's input and output
  gradient together, and the layer is a plain Keras Conv1D/2D/3D (padding "valid" or "same", `groups=1`, its own
  `convolution_op`): a first layer over one channel (the small CNN's 3 x 3 over 1 into 32: 0.27x), where the
  patches took 0.61x the kernel gradient's time against the transposed form's 0.84x.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _grouped(array, groups):
    """(rows, ..., d) -> (groups, rows / groups x ..., d), in float32."""
    return array.reshape((groups, -1, array.shape[-1])).astype(jnp.float32)


# The most groups whose kernel gradients `_kernel_norms` takes one by one (unrolled in the trace); above, in one
# `jax.vmap` (one grouped convolution), for the trace and the compile to stay short.
UNROLLED_GROUPS = 32


def _kernel_norms(transpose, x, dy, groups):
    """Each group's kernel gradient (`transpose(x_g, dy_g)`, the kernel's cotangent), squared and summed; and
    the kernel's whole gradient (their sum).

    One transposed op per group, unrolled in the trace (up to `UNROLLED_GROUPS`): on 2 CPU cores XLA ran the n
    kernel gradients of a 3 x 3 convolution over b / n rows each in 0.45-0.91x the time of its own kernel
    gradient over the b rows (b = 64 and 256, n = 4 and 8, ResNet-20's three stages), where `jax.vmap` over the
    groups (one grouped convolution) took 1.5-3.0x and `lax.scan` 3-20x."""
    xs, dys = x.reshape((groups, -1) + x.shape[1:]), dy.reshape((groups, -1) + dy.shape[1:])
    if groups > UNROLLED_GROUPS:
        per_group = jax.vmap(transpose)(xs, dys)
        squares = jnp.sum(jnp.square(per_group.astype(jnp.float32)).reshape(groups, -1), axis=1)
        return squares, jnp.sum(per_group, axis=0)
    squares, total = [], None
    for group in range(groups):
        gradient = transpose(xs[group], dys[group])
        squares.append(jnp.sum(jnp.square(gradient.astype(jnp.float32))))
        total = gradient if total is None else total + gradient
    return jnp.stack(squares), total


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


# The most elements the patches of a convolution's input may hold, as a multiple of its input's and its output
# gradient's together, for its groups' kernel gradients to be taken from them (see the module's documentation).
PATCHES_RATIO = 1.0


def convolution_geometry(layer):
    """`(strides, padding, dilation, channels_last)` of a Keras Conv1D/2D/3D `layer` whose kernel gradients may be
    taken from patches (padding "valid" or "same", one feature group, the base class's own `convolution_op`);
    else None (the transposed form: causal padding, grouped, a subclass's own `convolution_op`)."""
    import keras

    own = keras.layers.Conv2D.convolution_op  # the three's, from their base class
    if type(layer).convolution_op is not own:
        return None
    if getattr(layer, "groups", 1) != 1 or str(layer.padding).lower() not in ("valid", "same"):
        return None
    return (tuple(layer.strides), str(layer.padding).upper(), tuple(layer.dilation_rate),
            layer.data_format == "channels_last")


def _convolution_form(x_shape, dy_shape, kernel_shape, geometry):
    """"patches" or "transposed": how `_convolution`'s backward takes the groups' kernel gradients."""
    if geometry is None:
        return "transposed"
    window = int(np.prod(kernel_shape[:-1]))  # the window's positions x the input channels
    positions = int(np.prod(dy_shape)) // kernel_shape[-1]  # the rows x the output positions
    held = int(np.prod(x_shape)) + int(np.prod(dy_shape))
    return "patches" if positions * window <= PATCHES_RATIO * held else "transposed"


def _patch_kernel_norms(x, dy, kernel, groups, geometry):
    """The groups' squared kernel-gradient norms and the kernel's gradient from the input's patches: U_g^T D_g
    per group, one batched matrix product in float32."""
    strides, padding, dilation, channels_last = geometry
    if not channels_last:
        x, dy = jnp.moveaxis(x, 1, -1), jnp.moveaxis(dy, 1, -1)
    rank = x.ndim - 2
    spatial = "DHW"[-rank:]
    patches = jax.lax.conv_general_dilated_patches(
        x, kernel.shape[:rank], strides, padding, rhs_dilation=dilation,
        dimension_numbers=("N" + spatial + "C", spatial + "IO", "N" + spatial + "C"),
        precision=jax.lax.Precision.HIGHEST)  # a copy of the inputs (no TF32 on a GPU)
    per_group = jnp.einsum("gtk,gto->gko", _grouped(patches, groups), _grouped(dy, groups),
                           precision=jax.lax.Precision.HIGHEST)
    squares = jnp.sum(jnp.square(per_group), axis=(1, 2))
    # The patches' features are ordered (input channel, window position); the kernel's (window..., in, out).
    dkernel = jnp.sum(per_group, axis=0).reshape((kernel.shape[-2],) + kernel.shape[:rank] + (kernel.shape[-1],))
    return squares, jnp.moveaxis(dkernel, 0, rank)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _convolution(x, kernel, probe, groups, convolve, geometry):
    """`convolve(x, kernel)`; `geometry` (`convolution_geometry` of the layer, or None) lets the backward take
    the patches form."""
    del probe
    return convolve(x, kernel)


def _convolution_forward(x, kernel, probe, groups, convolve, geometry):
    return _convolution(x, kernel, probe, groups, convolve, geometry), (x, kernel)


def _convolution_backward(groups, convolve, geometry, residuals, dy):
    x, kernel = residuals
    (dx,) = jax.linear_transpose(lambda inputs: convolve(inputs, kernel), x)(dy)
    if _convolution_form(x.shape, dy.shape, kernel.shape, geometry) == "patches":
        squares, dkernel = _patch_kernel_norms(x, dy, kernel, groups, geometry)
        return dx, dkernel.astype(kernel.dtype), squares

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
