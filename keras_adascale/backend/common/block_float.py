"""Block floating-point sums of squares, shared by the JAX and PyTorch mechanics.

A sum of squares of float32 gradients is a block number `(mantissa, exponent)`, the value
`mantissa * 2**exponent` (see the comment at `LARGEST_FAST_SUM`). Pure `keras.ops`, for any backend.
"""

import numpy as np
from keras import ops


def _squared_norm(tensor):
    """`||t||^2` in float32: one dot product of the flattened tensor with itself (no tensor of squares)."""
    flat = ops.reshape(ops.cast(tensor, "float32"), [-1])
    return ops.vdot(flat, flat)

# The statistics are float32 here, whatever the backend has. JAX has no float64 without x64, and Keras's
# PyTorch backend computes many 64-bit operations in 32 bits (Keras 3.15.1's type promotion maps float64
# to float32 and int64 to int32 on every backend but TensorFlow: `ops.maximum`, `ops.minimum`,
# `ops.floor`, `ops.divide_no_nan` and `ops.vdot` of two float64 tensors give float32 on PyTorch,
# and `ops.maximum` of two int64 ones int32), so a float64 state would be float32 at every update anyway.
#
# A square of a float32 gradient overflows above ~1.8e19 and is flushed to zero below ~1e-19 (XLA on a
# CPU flushes subnormals). So every sum of squares is a block floating-point number `(mantissa, exponent)`,
# the value `mantissa * 2**exponent`, with a float32 mantissa and an int32 exponent: taken in float32
# (exponent 0) where it lies in [1e-20, 1e20] and, only where it does not, over the gradients scaled by a
# power of two. The moving averages keep one shared exponent, renormalized after every update. The gain and
# the noise scale are ratios of numbers of one exponent, read from the mantissas; the variance and the
# squared norm are the mantissas times 2**exponent.
LARGEST_FAST_SUM = 1e20
_NO_EXPONENT = -(2**30)  # below any exponent: where a term is 0 (and its exponent arbitrary)


def _floor_log2(magnitude):
    """floor(log2 m) as int32 where m is finite and positive (off by one at most, next to a power of two), else 0."""
    usable = ops.logical_and(ops.isfinite(magnitude), magnitude > 0.0)
    logarithm = ops.floor(ops.log2(ops.where(usable, magnitude, ops.ones_like(magnitude))))
    return ops.where(usable, ops.cast(logarithm, "int32"), ops.zeros((), "int32"))


def _largest_magnitude(tensor):
    """max |t| as two reductions of `tensor` itself (no tensor of magnitudes for a compiler to keep)."""
    return ops.maximum(ops.max(tensor), -ops.min(tensor))


def _times_power_of_two(tensor, exponent):
    """`tensor * 2**exponent` for an int32 scalar `exponent` in [-252, 252], as two multiplications by scalar
    powers of two, each a normal float32: `ldexp` to the last bit wherever the result is a normal number (a
    product below 2^-126 is below it at the first factor already where both scale down, and its square is 0 in
    float32 either way), and an elementwise product that fuses into what reads it (an elementwise `ldexp`
    of a tensor is a chain of bit operations a compiler keeps as a buffer)."""
    half = exponent // 2
    one = ops.ones((), "float32")
    return tensor * ops.ldexp(one, half) * ops.ldexp(one, exponent - half)


def _largest_of(tensors):
    """max |t| over all the tensors (float32)."""
    return ops.max(ops.stack([_largest_magnitude(ops.cast(t, "float32")) for t in tensors]))


def _scaled_sqr_norm_sum(tensors, largest=None):
    """`sum_k ||t_k||^2` as `(float32 mantissa, exponent)` for any finite float32 tensors: each scaled by
    2^-e, e = floor(log2 max|t|) over all of them, before squaring (NaN or Inf stay in the mantissa).

    `largest`, where given, stands for max|t| (a float32 scalar): any number within a factor of 2 of it
    gives the same value `mantissa * 2**exponent` (a scaling by a power of two is exact; a shift off by one
    moves only terms below 2^-126 of the largest square across float32's smallest normal, far below the
    sum's last bit), which lets a caller take it from tensors it holds already rather than from `tensors`,
    for a compiler to read them once."""
    tensors = [ops.cast(t, "float32") for t in tensors]
    if largest is None:
        largest = _largest_of(tensors)
    shift = _floor_log2(largest)
    mantissa = sum(_squared_norm(_times_power_of_two(t, -shift)) for t in tensors)
    return mantissa, 2 * shift


def _present(mantissa):
    """Whether a block number's exponent counts: a finite mantissa that is not 0."""
    return ops.logical_and(mantissa != 0.0, ops.isfinite(mantissa))


def _counted_exponent(present, exponent):
    """`exponent` where its term is present, else below every exponent (for a maximum over terms)."""
    return ops.where(present, exponent, ops.full((), _NO_EXPONENT, "int32"))


def _or_zero(common):
    """A maximum of `_counted_exponent`s, 0 where no term was present."""
    return ops.where(common == _NO_EXPONENT, ops.zeros((), "int32"), common)


def _common_exponent(terms):
    """The largest exponent among the terms `(present, exponent)` that are present; 0 where none is."""
    counted = [_counted_exponent(present, exponent) for present, exponent in terms]
    common = counted[0]
    for exponent in counted[1:]:
        common = ops.maximum(common, exponent)
    return _or_zero(common)


def _in_exponent(mantissa, exponent, common):
    """`mantissa * 2**exponent` as a mantissa of `common` (>= exponent where the mantissa is not 0)."""
    return ops.ldexp(mantissa, ops.where(mantissa != 0.0, exponent - common, ops.zeros((), "int32")))


def _block_add(first, second):
    """The sum of two block numbers, in the larger exponent of the two that are not 0."""
    (m1, e1), (m2, e2) = first, second
    common = _common_exponent([(_present(m1), e1), (_present(m2), e2)])
    return _in_exponent(m1, e1, common) + _in_exponent(m2, e2, common), common


def _exponent_of(magnitude):
    """floor(log2 m) for a finite m > 0 (a Python float), else 0: the exponent that puts m's mantissa in [1, 2)."""
    return int(np.floor(np.log2(magnitude))) if np.isfinite(magnitude) and magnitude > 0 else 0
