"""Two namespaces of the few operations that AdaScale's small scalar functions need.

`NUMBERS` works on Python and NumPy numbers, eagerly and at the cost of Python arithmetic; `TENSORS`
on the Keras backend's tensors (TensorFlow, JAX or PyTorch; traced or eager), through `keras.ops`. A function written once over an `ops` argument (the scale
setting's transitions in `setting`, the statistics read from the moving averages in `gain`) then
gives the compiled step and the eager view the same numbers: callbacks read them after every batch,
where a dozen eager backend ops would cost more than a small model's step.
"""

import keras
import numpy as np
from keras import ops

# A float64 sum of squares travels inside TensorFlow's float32 gradients' all-reduce as two float32 words
# scaled by these powers of two (`backend/tensorflow/statistics.py`): the first keeps its precision down to
# ~1e-68, the second up to ~1e77. A saved file holds the sum itself, decoded on any backend with NumPy.
SMALL_WORD_SCALE = 2.0**100
LARGE_WORD_SCALE = 2.0**-128


def decoded_words(words):
    """The float64 sum that TensorFlow's words `words` (a NumPy scalar, or two float32 words) hold."""
    words = np.asarray(words, np.float64)
    if words.shape == ():
        return float(words)
    return float(words[0] / SMALL_WORD_SCALE if np.isfinite(words[0]) else words[1] / LARGE_WORD_SCALE)


def encoded_words(number, like):
    """`number` as TensorFlow's words shaped and typed as the NumPy array `like` (see `decoded_words`)."""
    like = np.asarray(like)
    if like.shape == ():
        return np.asarray(number, like.dtype)
    with np.errstate(over="ignore"):
        return np.asarray([number * SMALL_WORD_SCALE, number * LARGE_WORD_SCALE], np.float64).astype(like.dtype)


class _Numbers:
    """The operations on Python and NumPy scalars (and, for `all_equal`, arrays).

    A Python number mixed into NumPy scalar arithmetic may promote float32 to float64 (NumPy 1.x's
    value-based casting): constants go through `like`.
    """

    @staticmethod
    def where(condition, x, y):
        return x if condition else y

    @staticmethod
    def all_equal(xs, ys):
        return bool(np.all(np.asarray(xs) == np.asarray(ys)))

    @staticmethod
    def like(value, reference):
        """`value` in the dtype of `reference` (a stored NumPy scalar or array)."""
        return np.asarray(value, dtype=np.asarray(reference).dtype)[()]

    @staticmethod
    def logical_and(x, y):
        return bool(x) and bool(y)

    @staticmethod
    def maximum(x, y):
        return np.maximum(x, y)

    @staticmethod
    def minimum(x, y):
        return np.minimum(x, y)

    @staticmethod
    def divide_no_nan(x, y):
        """x / y, and 0 where y is 0 (as `tf.math.divide_no_nan`), in x's dtype."""
        return x / y if y != 0 else np.zeros_like(x)


class _Tensors:
    """The same operations on the backend's tensors, through `keras.ops` (traced or eager, any backend)."""

    @staticmethod
    def where(condition, x, y):
        return ops.where(condition, x, y)

    @staticmethod
    def all_equal(xs, ys):
        return ops.all(ops.equal(xs, ys))

    @staticmethod
    def like(value, reference):
        dtype = keras.backend.standardize_dtype(reference.dtype)
        if ops.is_tensor(value):
            return ops.cast(value, dtype)
        # Through NumPy: a Python float cast straight to float64 may go through float32 first
        # (TensorFlow's tf.cast(1.1, float64) is 1.100000023841858).
        return ops.convert_to_tensor(np.asarray(value, dtype), dtype)

    @staticmethod
    def logical_and(x, y):
        return ops.logical_and(x, y)

    @staticmethod
    def maximum(x, y):
        return ops.maximum(x, y)

    @staticmethod
    def minimum(x, y):
        return ops.minimum(x, y)

    @staticmethod
    def divide_no_nan(x, y):
        return ops.divide_no_nan(x, y)

    # The rest of what `gain.step` asks of a namespace of tensors.
    zeros_like = staticmethod(ops.zeros_like)
    ones_like = staticmethod(ops.ones_like)
    isfinite = staticmethod(ops.isfinite)
    cast = staticmethod(ops.cast)
    floor = staticmethod(ops.floor)


NUMBERS = _Numbers()
TENSORS = _Tensors()
