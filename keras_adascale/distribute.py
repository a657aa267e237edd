"""Replica-context mechanics: local sums of squared norms and one fused all-reduce."""

import tensorflow as tf


def sqr_norm_sum(tensors, dtype=tf.float64):
    """`sum_k ||t_k||^2` over a list of tensors, computed in `dtype`.

    Each tensor is cast to `dtype` before squaring: in float64, gradients from
    1e-150 to 1e150 (any float16, bfloat16 or float32 value) square without
    underflow or overflow. `IndexedSlices` are densified first, since rows may
    repeat and the norm is that of the dense gradient.

    Args:
        tensors: list of `tf.Tensor` or `tf.IndexedSlices`.
        dtype: float dtype of the computation and the result.

    Returns:
        A scalar of dtype `dtype`.
    """
    total = tf.constant(0.0, dtype)
    for tensor in tensors:
        if isinstance(tensor, tf.IndexedSlices):  # repeated rows add up before squaring
            tensor = tf.IndexedSlices(tf.cast(tensor.values, dtype), tensor.indices, tensor.dense_shape)
        total += tf.reduce_sum(tf.square(tf.cast(tf.convert_to_tensor(tensor), dtype)))
    return total


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
