"""Restores into another configuration on TensorFlow (issue 38, items 1 and 5).

A `.keras` saved in the middle of an update under a 4-replica MirroredStrategy and loaded under 2 replicas
or on one device: the update in progress holds micro-batches of two replica counts; it is applied and its
statistics are kept out of the averages. The JAX side is tests_backends/test_restores.py.
"""

import keras
import pytest
import tensorflow as tf

import keras_adascale
from conftest import BATCH, mirrored
from problems import IDENTICAL_DIM, GainRecorder, assert_no_variance_seen, identical_examples


def _strategy(replicas):
    return mirrored(replicas) if replicas > 1 else tf.distribute.get_strategy()


def _fit(model, x, y, replicas, callbacks=()):
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(replicas * BATCH)
    model.fit(dataset, callbacks=list(callbacks), verbose=0)


@pytest.mark.parametrize("saved,into", [(4, 2), (4, 1), (2, 4), (1, 4)])
def test_identical_examples_keep_gain_one_and_variance_zero_through_a_restore_mid_update(tmp_path, saved, into):
    # Every example identical: every gradient sample is the same, the true variance exactly 0. k = 2, saved after
    # 5 micro-batches (in the middle of the third update). The old statistics read a variance below 0 (clipped,
    # unseen) into fewer replicas and above 0 into more.
    x, y = identical_examples(64 * BATCH)
    with _strategy(saved).scope():
        model = keras.Sequential([keras.Input((IDENTICAL_DIM,)), keras.layers.Dense(1, kernel_initializer="zeros")])
        model.compile(optimizer=keras_adascale.AdaScaleSGD(0.01, gradient_accumulation_steps=2), loss="mse")
    _fit(model, x[:5 * saved * BATCH], y[:5 * saved * BATCH], saved)
    model.save(tmp_path / "mid_update.keras")
    with _strategy(into).scope():
        loaded = keras.models.load_model(tmp_path / "mid_update.keras")
    assert loaded.optimizer.samples_per_update == 2 * into
    recorder = GainRecorder()
    _fit(loaded, x[:5 * into * BATCH], y[:5 * into * BATCH], into, [recorder])
    assert_no_variance_seen(loaded.optimizer, recorder, 5)  # the mixed update, then two whole ones


def test_a_checkpoint_of_an_accumulating_run_restored_without_accumulation_counts_updates(least_squares, tmp_path):
    x, y = least_squares.x[:8 * BATCH], least_squares.y[:8 * BATCH]
    model = least_squares.model()
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.05, gradient_accumulation_steps=2), loss="mse")
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)  # 8 micro-batches: 4 updates
    assert int(model.optimizer.iterations.numpy()) == 4
    path = tf.train.Checkpoint(optimizer=model.optimizer).save(str(tmp_path / "ckpt"))

    restored = least_squares.model()
    restored.compile(optimizer=keras_adascale.AdaScaleSGD(0.05, scale=1), loss="mse")
    restored.optimizer.build(restored.trainable_variables)
    tf.train.Checkpoint(optimizer=restored.optimizer).restore(path)
    assert int(restored.optimizer.iterations.numpy()) == 4  # not the 8 micro-steps
    restored.fit(x[:2 * BATCH], y[:2 * BATCH], batch_size=BATCH, shuffle=False, verbose=0)
    assert int(restored.optimizer.iterations.numpy()) == 6
