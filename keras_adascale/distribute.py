"""Replica-context mechanics: local sums of squared norms and one fused all-reduce."""

import tensorflow as tf


def sqr_norm_sum(tensors):
    """`sum_k ||t_k||^2` over a list of tensors, in float32 (or wider).

    `IndexedSlices` are densified first, since rows may repeat and the norm is
    that of the dense gradient.

    Args:
        tensors: list of `tf.Tensor` or `tf.IndexedSlices`.

    Returns:
        A scalar of dtype float32, or float64 if a tensor is float64.
    """
    total = tf.constant(0.0, tf.float32)
    for tensor in tensors:
        if isinstance(tensor, tf.IndexedSlices):
            tensor = tf.convert_to_tensor(tensor)
        dtype = tf.float64 if tensor.dtype == tf.float64 else tf.float32
        total = tf.cast(total, dtype) + tf.reduce_sum(tf.square(tf.cast(tensor, dtype)))
    return tf.cast(total, tf.float32)


def all_reduce_gradients(gradients, local_sqr_norm_sum):
    """Sums gradients and one scalar statistic over replicas in one all-reduce.

    Must run in replica context (inside `strategy.run`, `model.fit`, or with no
    strategy at all). Keras scales each replica's loss by 1/replicas, so each
    replica holds `g_i / R`; the sum over replicas is then the mean gradient.

    Args:
        gradients: list of the replica's local gradients.
        local_sqr_norm_sum: float32 scalar, the replica's sum of squared norms.

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
    reduced = replica_context.all_reduce(
        tf.distribute.ReduceOp.SUM, list(gradients) + [local_sqr_norm_sum]
    )
    return reduced[:-1], reduced[-1], replica_context.num_replicas_in_sync
