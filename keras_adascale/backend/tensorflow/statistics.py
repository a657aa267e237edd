"""TensorFlow's gradient statistic: sums of squares in float64, carried inside the gradients' all-reduce.

`sqr_norm_sum` measures a replica's gradient; `all_reduce` sums the replicas' gradients and their
statistics in one all-reduce, the statistic encoded as words of the gradients' dtype (`encode_statistic`,
`decode_statistic`).
"""

import tensorflow as tf

from keras_adascale import gain as gain_lib
from keras_adascale import numerics

# A float64 sum of squares travels inside the float32 gradients' all-reduce as two float32
# words scaled by powers of two (float32 alone spans 1e-38..3e38), so a sum of squares of gradients
# from 1e-30 to 1e30 arrives to float32 precision.
_SMALL_WORD_SCALE = numerics.SMALL_WORD_SCALE
_LARGE_WORD_SCALE = numerics.LARGE_WORD_SCALE


def _dense(tensor, dtype):
    if isinstance(tensor, tf.IndexedSlices):  # repeated rows add up before squaring
        tensor = tf.IndexedSlices(tf.cast(tensor.values, dtype), tensor.indices, tensor.dense_shape)
    return tf.cast(tf.convert_to_tensor(tensor), dtype)


def _sum_of_squares(tensors, dtype):
    # l2_loss is one fused kernel (sum(t^2) / 2), faster than square + reduce_sum.
    return tf.add_n([2.0 * tf.cast(tf.nn.l2_loss(t), dtype) for t in tensors])


def sqr_norm_sum(tensors, dtype="float64"):
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
    if tf.as_dtype(dtype) == tf.float32:
        return _sum_of_squares([_dense(t, tf.float32) for t in tensors], tf.float32)
    fast = _sum_of_squares(
        [_dense(t, tf.float64 if t.dtype == tf.float64 else tf.float32) for t in tensors], tf.float64
    )
    return tf.cond(
        tf.logical_and(tf.math.is_finite(fast), fast >= gain_lib.SMALLEST_FAST_SUM),
        lambda: fast,
        lambda: _sum_of_squares([_dense(t, tf.float64) for t in tensors], tf.float64),
    )


def encode_statistic(statistic, dtype):
    """The statistic as the `dtype` tensors that travel beside gradients of that dtype.

    Args:
        statistic: scalar sum of squares in the statistics dtype (float64, or float32 on TPU).
        dtype: the gradients' dtype.

    Returns:
        A list of tensors of `dtype`, to be summed over replicas and read by `decode_statistic`,
        or None where the statistic cannot share the gradients' all-reduce (float16 or bfloat16
        gradients, which are rare: Keras keeps float32 variables under mixed precision).
    """
    if dtype == statistic.dtype:
        return [statistic]
    if dtype == tf.float32 and statistic.dtype == tf.float64:
        # Casting to float32 overflows to inf or underflows to 0 where a word is out of range.
        return [tf.cast(tf.stack([statistic * _SMALL_WORD_SCALE, statistic * _LARGE_WORD_SCALE]), tf.float32)]
    return None


def decode_statistic(words, dtype):
    """The summed statistic from its summed words (see `encode_statistic`), in `dtype`."""
    (words,) = words
    if words.shape.rank == 0:
        return tf.cast(words, dtype)
    words = tf.cast(words, dtype)
    # An inf or NaN in the sum makes both words non-finite, and the large word carries it.
    return tf.where(tf.math.is_finite(words[0]), words[0] / _SMALL_WORD_SCALE, words[1] / _LARGE_WORD_SCALE)


def _distinct(tensor):
    # MirroredStrategy's all-reduce hands back unsummed a tensor object that every replica
    # passed (keras's optimizer_distribute_test passes one gradient tensor to all replicas),
    # while it sums per-replica tensors: identity makes every input per-replica, so the
    # gradients and the statistic computed from them are reduced alike.
    if isinstance(tensor, tf.IndexedSlices):
        return tf.IndexedSlices(tf.identity(tensor.values), tensor.indices, tensor.dense_shape)
    return tf.identity(tensor)


def all_reduce(gradients, local_sqr_norm_sum):
    """Sums the replicas' gradients and their sums of squared norms, in one all-reduce.

    Must run in replica context (inside `strategy.run`, `model.fit`, or with no
    strategy at all). Keras scales each replica's loss by 1/replicas, so each
    replica holds `g_i / R`; the sum over replicas is then the mean gradient.
    With one replica nothing is reduced.

    Args:
        gradients: list of the replica's local gradients (one dtype, as Keras requires).
        local_sqr_norm_sum: scalar, the replica's sum of squared norms (statistics dtype).

    Returns:
        `(reduced_gradients, reduced_sqr_norm_sum, num_replicas)`.

    Raises:
        RuntimeError: if called in cross-replica context with several replicas,
            where the per-replica samples are no longer visible.
    """
    replica_context = tf.distribute.get_replica_context()
    if replica_context is None:
        if tf.distribute.get_strategy().num_replicas_in_sync > 1:
            raise RuntimeError(
                "An AdaScale optimizer's apply_gradients must be called in replica context "
                "(inside `strategy.run`), where each replica's gradient is a "
                "sample: it was called in cross-replica context."
            )
        return list(gradients), local_sqr_norm_sum, 1
    replicas = replica_context.num_replicas_in_sync
    if replicas == 1:
        return list(gradients), local_sqr_norm_sum, 1
    gradients = [_distinct(g) for g in gradients]
    words = encode_statistic(local_sqr_norm_sum, gradients[0].dtype)
    if words is None:
        reduced = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
        sqr_norm_sum = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, local_sqr_norm_sum)
        return reduced, sqr_norm_sum, replicas
    reduced = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, gradients + words)
    count = len(gradients)
    return reduced[:count], decode_statistic(reduced[count:], local_sqr_norm_sum.dtype), replicas
