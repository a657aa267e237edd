"""Replica and accumulation mechanics: the statistic inside the all-reduce, per-replica accumulation, replicas
as samples, against the NumPy reference."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adascale
from conftest import (BATCH, Recorder, assert_same_history, fit_accumulated, fit_mirrored, mirrored,
                      reference_history)
from keras_adascale.backend.tensorflow import statistics as distribute
from reference import AdaScaleReference


@pytest.mark.parametrize("values", [[1e-60, 3e-60], [1e-30, 2.0], [1.0, 1.0], [1e30, 5e29], [1e70, 2e70]],
                         ids=lambda values: f"{values[0]:g}")
def test_a_float64_statistic_summed_as_float32_words_keeps_float32_precision(values):
    # float32 alone spans ~1e-38..3e38; the words carry a float64 sum of squares beyond both ends.
    words = [distribute.encode_statistic(tf.constant(value, tf.float64), tf.float32) for value in values]
    assert all(word[0].dtype == tf.float32 for word in words)
    summed = [tf.add_n([word[0] for word in words])]  # what the all-reduce does to them
    assert float(distribute.decode_statistic(summed, tf.float64)) == pytest.approx(sum(values), rel=1e-6)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_a_non_finite_statistic_stays_non_finite_through_its_words(bad):
    words = distribute.encode_statistic(tf.constant(bad, tf.float64), tf.float32)
    summed = [words[0] + distribute.encode_statistic(tf.constant(1.0, tf.float64), tf.float32)[0]]
    assert not math.isfinite(float(distribute.decode_statistic(summed, tf.float64)))


def test_a_statistic_of_the_gradients_dtype_travels_as_itself():
    statistic = tf.constant(2.5, tf.float32)
    (word,) = distribute.encode_statistic(statistic, tf.float32)
    assert word is statistic


def test_a_statistic_beside_half_precision_gradients_gets_an_all_reduce_of_its_own():
    assert distribute.encode_statistic(tf.constant(2.5, tf.float64), tf.float16) is None


def mirrored_gain(strategy, factor, accumulation, updates=3):
    """The gain after `updates` updates where replica i's gradient of micro-step k is factor x a fixed sample."""
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        variable = keras.Variable(np.zeros(4, np.float32))
        optimizer = keras_adascale.AdaScaleSGD(0.1, gradient_accumulation_steps=accumulation)
        optimizer.build([variable])

    @tf.function
    def apply(table):
        def replica_fn():
            context = tf.distribute.get_replica_context()
            optimizer.apply_gradients([(table[context.replica_id_in_sync_group], variable)])

        strategy.run(replica_fn)

    micro_steps = accumulation or 1
    sample_lists = []
    for update in range(updates):
        rng = np.random.RandomState(update)
        sample_lists.append([rng.randn(micro_steps, 4) + 0.5 for _ in range(replicas)])
        for step in range(micro_steps):
            apply(tf.constant(factor * np.stack([s[step] for s in sample_lists[-1]]), tf.float32))
    return float(optimizer.gain), sample_lists


@pytest.mark.parametrize("accumulation", [None, 2], ids=["replicas", "replicas_x_accumulation"])
@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_the_statistic_inside_the_all_reduce_keeps_extreme_gradient_scales(magnitude, accumulation):
    strategy = mirrored(2)
    gain_at_one, sample_lists = mirrored_gain(strategy, 1.0, accumulation)
    reference = AdaScaleReference(np.zeros(4), 0.1, scale=2 * (accumulation or 1))
    for per_replica in sample_lists:  # a replica's gradient g_i / R is the sample g_i over R
        reference.step([2 * s for micro in per_replica for s in micro])
    assert gain_at_one == pytest.approx(reference.gain, rel=1e-5)
    assert 1.0 < gain_at_one
    gain_at_magnitude, _ = mirrored_gain(strategy, magnitude, accumulation)
    assert gain_at_magnitude == pytest.approx(gain_at_one, rel=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_gradient_tensor_passed_to_every_replica_is_reduced_like_its_statistic(dtype):
    # Keras's optimizer_distribute_test.test_ema passes one tensor object to both replicas;
    # TF's all-reduce hands such a tensor back unsummed, unlike per-replica tensors.
    strategy = mirrored(2)
    with strategy.scope():
        variable = keras.Variable(np.array([3.0, 4.0, 5.0]), dtype=dtype)
        gradient = tf.constant([1.0, -2.0, 0.5], dtype=dtype)
        optimizer = keras_adascale.AdaScaleSGD(0.1, smoothing=0.0)
        optimizer.build([variable])
        strategy.run(lambda: optimizer.apply_gradients([(gradient, variable)]))
    # Two identical samples: no variance, gain 1; the replicas' shares sum as for
    # per-replica tensors (keras's test_single_step), so the step is 0.1 x (g + g).
    assert float(optimizer.gradient_variance) == 0.0
    assert float(optimizer.gain) == 1.0
    np.testing.assert_allclose(variable.numpy(), [3.0, 4.0, 5.0] - 0.1 * 2 * np.array([1.0, -2.0, 0.5]), rtol=1e-6)


def test_four_replicas_match_four_accumulation_steps_on_one_device(least_squares):
    updates = 5
    _, mirrored_history = fit_mirrored(least_squares, 4, updates, learning_rate=0.05, momentum=0.9)
    model = least_squares.model()
    model.compile(
        optimizer=keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=4), loss="mse"
    )
    assert_same_history(mirrored_history, fit_accumulated(model, least_squares, 4, updates))


@pytest.mark.parametrize("scale", [None, 12])
def test_two_replicas_by_two_accumulation_steps_match_the_reference(least_squares, scale):
    # Keras's own gradient accumulation fails here (merge_call inside a cond,
    # keras-team/keras#20582); AdaScaleSGD accumulates per replica instead.
    replicas, steps, updates = 2, 2, 4
    _, expected = reference_history(least_squares, replicas * steps, updates, scale=scale, learning_rate=0.05,
                                    momentum=0.9)
    strategy = mirrored(replicas)
    with strategy.scope():
        model = least_squares.model()
        model.compile(
            optimizer=keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=steps,
                                                 scale=scale),
            loss="mse",
        )
    count = updates * replicas * steps * BATCH
    # Global batch i feeds replica 0 rows [i*16, i*16+8) and replica 1 the next 8; the
    # reference's update u takes its 4 samples from rows [u*32, u*32+32) in the same order.
    dataset = tf.data.Dataset.from_tensor_slices((least_squares.x[:count], least_squares.y[:count])).batch(
        replicas * BATCH
    )
    recorder = Recorder(every=steps)
    model.fit(dataset, callbacks=[recorder], verbose=0)
    assert model.optimizer.scale == (scale or 4) and model.optimizer.samples_per_update == 4
    assert_same_history(recorder.history, expected)


def test_one_device_strategy_with_accumulation_matches_the_reference(least_squares):
    scale, updates = 3, 4
    _, expected = reference_history(least_squares, scale, updates, learning_rate=0.05, momentum=0.9)
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        model = least_squares.model()
        model.compile(optimizer=keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=scale),
                      loss="mse")
    actual = fit_accumulated(model, least_squares, scale, updates)
    assert model.optimizer.scale == scale
    assert_same_history(actual, expected)
