"""The statistics at gradient scales from 1e-30 to 1e30.

On JAX and PyTorch they are float32 (see `keras_adascale/backend/common/block_float.py`), where a square of a float32 gradient overflows
above ~1.8e19 and is flushed to zero below ~1e-19: the sums of squares and the moving averages carry a
power-of-two exponent of their own. The NumPy reference works in float64 on the same samples.
"""

import math
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_adascale
from conftest import BACKEND
from reference import AdaScaleReference

SHAPES = [(3,), (2, 2)]
STEPS = 2


def micro_batches(updates, magnitudes, seed=0):
    """`updates` x STEPS gradient samples, each a list of float32 arrays of SHAPES, update i at magnitudes[i]."""
    rng = np.random.default_rng(seed)
    direction = [rng.normal(size=shape) for shape in SHAPES]  # a signal, so that mu2 > 0
    return [[[(magnitudes[i] * (d + 0.7 * rng.normal(size=d.shape))).astype(np.float32) for d in direction]
             for _ in range(STEPS)] for i in range(updates)]


def run(samples, **options):
    """AdaScaleSGD (learning rate 0: the weights stay) over the samples; its snapshot after each update."""
    optimizer = keras_adascale.AdaScaleSGD(0.0, gradient_accumulation_steps=STEPS, **options)
    variables = [keras.Variable(np.zeros(shape, np.float32)) for shape in SHAPES]
    optimizer.build(variables)
    if BACKEND == "jax":  # the backend's own loop: `stateless_apply` in `jax.jit` (eager JAX compiles each cond)
        import jax

        step = jax.jit(optimizer.stateless_apply)
        values = [v.value for v in optimizer.variables]
    snapshots = []
    for update in samples:
        for grads in update:
            if BACKEND == "jax":
                _, values = step(values, grads, [v.value for v in variables])
            else:
                optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
        if BACKEND == "jax":
            for variable, value in zip(optimizer.variables, values):
                variable.assign(value)
        snapshots.append(optimizer.snapshot())
    return optimizer, snapshots


def reference_snapshots(samples):
    reference = AdaScaleReference(np.zeros(sum(math.prod(s) for s in SHAPES)), 0.0, scale=STEPS)
    rows = []
    for update in samples:
        flat = [np.concatenate([np.asarray(g, np.float64).ravel() for g in grads]) for grads in update]
        gain = reference.update_gain(flat)
        rows.append((gain, *reference.moments()))
    return rows


@pytest.mark.parametrize("magnitude", [1e-30, 1e-20, 1e20, 1e30])
def test_the_statistics_are_the_same_at_extreme_gradient_scales(magnitude):
    # As the TensorFlow test of the same name: the gain is scale-free, the moments scale with the square.
    _, plain = run(micro_batches(3, [1.0] * 3))
    optimizer, scaled = run(micro_batches(3, [magnitude] * 3))
    assert 1.0 < plain[-1]["gain"] < STEPS and scaled[-1]["gradient_sqr_norm"] > 0  # (mu2 is clipped to 0 at first)
    for unscaled, row in zip(plain, scaled, strict=True):
        assert row["gain"] == pytest.approx(unscaled["gain"], rel=1e-5)
        assert row["skipped_updates"] == 0
        for name in ("gradient_variance", "gradient_sqr_norm"):
            assert math.isfinite(row[name])
            assert row[name] == pytest.approx(unscaled[name] * magnitude**2, rel=1e-5)
    # The tensor views: the gain and the noise scale are ratios; the variance is a number of the
    # statistics dtype, infinite where float32 cannot hold it.
    assert float(optimizer.gain) == pytest.approx(scaled[-1]["gain"], rel=1e-6)
    assert float(optimizer.gradient_noise_scale) == pytest.approx(scaled[-1]["gradient_noise_scale"], rel=1e-5)
    variance, tensor = scaled[-1]["gradient_variance"], float(optimizer.gradient_variance)
    if variance > 3.4e38:
        assert tensor == math.inf
    elif variance < 1.2e-38:  # flushed to zero (XLA) or a subnormal of lost precision (PyTorch)
        assert 0.0 <= tensor < 1.2e-38
    else:
        assert tensor == pytest.approx(variance, rel=1e-5)


def test_the_statistics_follow_the_reference_as_the_gradients_shrink_and_grow_by_1e40():
    # The moving averages' exponent moves with the gradients, both ways: from 1e20 to 1e-20 and back.
    magnitudes = [10.0 ** e for e in (20, 12, 4, -4, -12, -20, -20, -8, 4, 16, 20)]
    samples = micro_batches(len(magnitudes), magnitudes, seed=1)
    _, rows = run(samples, smoothing=0.5)  # a short memory: every update's magnitude shows
    reference = AdaScaleReference(np.zeros(sum(math.prod(s) for s in SHAPES)), 0.0, scale=STEPS, smoothing=0.5)
    for update, row in zip(samples, rows, strict=True):
        flat = [np.concatenate([np.asarray(g, np.float64).ravel() for g in grads]) for grads in update]
        gain = reference.update_gain(flat)
        variance, sqr_norm = reference.moments()
        assert row["gain"] == pytest.approx(gain, rel=1e-5)
        assert row["gradient_variance"] == pytest.approx(variance, rel=1e-4)
        assert row["gradient_sqr_norm"] == pytest.approx(sqr_norm, rel=1e-4)


def test_a_non_finite_micro_batch_skips_the_update_and_keeps_tiny_averages():
    # A NaN's sum of squares has no exponent: it must not move the averages' (here near 2^-130) and flush them.
    samples = micro_batches(3, [1e-20] * 3)
    samples[1][0][0][0] = np.nan
    _, rows = run(samples)
    _, clean = run([samples[0], samples[2]])
    assert rows[1]["skipped_updates"] == 1
    assert rows[1]["gradient_variance"] == rows[0]["gradient_variance"] > 0
    assert rows[2]["gain"] == pytest.approx(clean[1]["gain"], rel=1e-6)
    assert rows[2]["gradient_sqr_norm"] == pytest.approx(clean[1]["gradient_sqr_norm"], rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(exponents=st.lists(st.integers(-30, 30), min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_a_float32_sum_of_squares_is_the_float64_one(exponents, seed):
    # Tensors of magnitudes 1e-30 to 1e30 side by side: the block number is the float64 sum to float32's precision.
    rng = np.random.default_rng(seed)
    tensors = [(10.0 ** e * rng.normal(size=rng.integers(1, 6))).astype(np.float32) for e in exponents]
    optimizer = keras_adascale.AdaScaleSGD(gradient_accumulation_steps=2)
    mantissa, exponent = optimizer._sqr_norm_sum([keras.ops.convert_to_tensor(t) for t in tensors])
    value = np.ldexp(np.float64(keras.ops.convert_to_numpy(mantissa)), int(keras.ops.convert_to_numpy(exponent)))
    expected = sum(float(np.sum(np.asarray(t, np.float64) ** 2)) for t in tensors)
    assert value == pytest.approx(expected, rel=1e-5)


@pytest.mark.skipif(BACKEND != "jax" or os.environ.get("JAX_ENABLE_X64"), reason="JAX's x64, from a process without it")
def test_with_jax_x64_these_and_the_reference_tests_pass():
    # x64 gives JAX float64 weights and int64 counts (Keras's `iterations`); the statistics stay float32.
    here = pathlib.Path(__file__).resolve().parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "test_statistics_range.py"),
         str(here / "test_optimizers.py"), "-k", "(statistic or matches_the_reference or resume) and not x64"],
        env={**os.environ, "JAX_ENABLE_X64": "1"}, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]
