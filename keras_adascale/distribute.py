"""Replica-context mechanics: local sums of squared norms and one fused all-reduce."""

import tensorflow as tf


# Below this, float32 squares may have lost precision (squares under ~1e-38 are
# subnormal or zero): the sum is redone in float64.
_SMALLEST_FAST_SUM = 1e-20


def _dense(tensor, dtype):
    if isinstance(tensor, tf.IndexedSlices):  # repeated rows add up before squaring
        tensor = tf.IndexedSlices(tf.cast(tensor.values, dtype), tensor.indices, tensor.dense_shape)
    return tf.cast(tf.convert_to_tensor(tensor), dtype)


def _sum_of_squares(tensors, dtype):
    # l2_loss is one fused kernel (sum(t^2) / 2), faster than square + reduce_sum.
    return tf.add_n([2.0 * tf.cast(tf.nn.l2_loss(t), dtype) for t in tensors])


def sqr_norm_sum(tensors, dtype=tf.float64):
    """`sum_k ||t_k||^2` over a list of tensors, accurate in `dtype`.

    With `dtype=tf.float64` the squares are first summed in float32 (fast, one
    fused kernel per tensor) and the total kept in float64; only when that
    total overflows (or is NaN) or is below 1e-20, where float32 squares may
    have underflowed, is the sum redone with every element cast to float64. So
    any float16, bfloat16 or float32 gradient from 1e-150 to 1e150 gives its
    squared norm to float32 precision at float32 cost, and a NaN or Inf
    anywhere gives a non-finite sum. `IndexedSlices` are densified first,
    since rows may repeat and the norm is that of the dense gradient.

    Args:
        tensors: list of `tf.Tensor` or `tf.IndexedSlices`.
        dtype: `tf.float64`, or `tf.float32` (TPUs): a plain float32 sum.

    Returns:
        A scalar of dtype `dtype`.
    """
    if dtype == tf.float32:
        return _sum_of_squares([_dense(t, tf.float32) for t in tensors], tf.float32)
    fast = _sum_of_squares(
        [_dense(t, tf.float64 if t.dtype == tf.float64 else tf.float32) for t in tensors], tf.float64
    )
    return tf.cond(
        tf.logical_and(tf.math.is_finite(fast), fast >= _SMALLEST_FAST_SUM),
        lambda: fast,
        lambda: _sum_of_squares([_dense(t, tf.float64) for t in tensors], tf.float64),
    )


def all_reduce_gradients(gradients, local_sqr_norm_sum):
    """Sums gradients and one scalar statistic over replicas.

    One all-reduce carries both when they share a dtype; a float64 statistic
    with float32 gradients goes in a second, scalar all-reduce beside it.

    Must run in replica context (inside `strategy.run`, `model.fit`, or with no
    strategy at all). Keras scales each replica's loss by 1/replicas, so each
    replica holds `g_i / R`; the sum over replicas is then the mean gradient.

    Args:
        gradients: list of the replica's local gradients.
        local_sqr_norm_sum: scalar, the replica's sum of squared norms.

    Returns:
        `(reduced_gradients, reduced_sqr_norm_sum, num_replicas)`.

    Raises:
        RuntimeError: if called in cross-replica context with several replicas,
            where the per-replica samples are no longer visible.
    """
    replica_context = tf.distribute.get_replica_context()
    if replica_context is None:
        strategy = tf.distribute.get_strategy()
        if strategy.num_replicas_in_sync > 1:
            raise RuntimeError(
                "AdaScaleSGD.apply_gradients must be called in replica context "
                "(inside `strategy.run`), where each replica's gradient is a "
                "sample: it was called in cross-replica context."
            )
        return list(gradients), local_sqr_norm_sum, 1
    gradients = list(gradients)
    if all(tf.as_dtype(g.dtype) == local_sqr_norm_sum.dtype for g in gradients):
        reduced = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, gradients + [local_sqr_norm_sum])
        return reduced[:-1], reduced[-1], replica_context.num_replicas_in_sync
    # One all-reduce packs its tensors into one buffer, so a float64 statistic
    # travels beside the float32 gradients, in a second (scalar) all-reduce.
    reduced = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
    sqr_norm_sum = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, local_sqr_norm_sum)
    return reduced, sqr_norm_sum, replica_context.num_replicas_in_sync
