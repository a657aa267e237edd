"""Restores into another configuration and onto another backend (issue 38, items 1 and 4).

A `.keras` saved in the middle of an update and loaded under another replica count: the update in progress
holds micro-batches from two replica counts, whose samples are neither equal nor counted in N. It is applied,
and its statistics are kept out of the averages (the NumPy reference's `measured=False`).
"""

import keras
import numpy as np
import pytest

import keras_adascale
from conftest import BACKEND, Recorder, assert_same_history
from problems import BATCH, GainRecorder, LeastSquares, assert_no_variance_seen, identical_examples
from reference import AdaScaleReference

DIM = 8


def _distribution(replicas):
    if replicas == 1:
        return None
    return keras.distribution.DataParallel(devices=keras.distribution.list_devices("cpu")[:replicas])


@pytest.fixture
def jax_devices():
    if BACKEND != "jax":
        pytest.skip("keras.distribution on JAX")
    yield
    keras.distribution.set_distribution(None)


def _model(initial):
    inputs = keras.Input((DIM,))
    model = keras_adascale.AdaScaleModel(inputs, keras.layers.Dense(1)(inputs))
    model.set_weights([initial[:-1].reshape(-1, 1), initial[-1:]])
    return model


@pytest.mark.parametrize("saved,into", [(4, 2), (4, 1), (2, 4), (1, 4)])
def test_identical_examples_keep_gain_one_and_variance_zero_through_a_restore_mid_update(jax_devices, tmp_path,
                                                                                          saved, into):
    # The review's reproduction: every example identical, so every gradient sample is the same and the true
    # variance is exactly 0; k = 2, saved after 5 micro-batches (in the middle of the third update).
    # With the saved replicas' squared norms counted as the new replicas', the gain read 1.07 (into 2) and 1.12
    # (into 1), variance / squared norm 0.10 and 0.26.
    x, y = identical_examples(64 * BATCH)
    keras.distribution.set_distribution(_distribution(saved))
    model = _model(np.zeros(DIM + 1))
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.01, gradient_accumulation_steps=2), loss="mse")
    model.fit(x[:5 * saved * BATCH], y[:5 * saved * BATCH], batch_size=saved * BATCH, shuffle=False, verbose=0)
    model.save(tmp_path / "mid_update.keras")

    keras.distribution.set_distribution(_distribution(into))
    loaded = keras.models.load_model(tmp_path / "mid_update.keras")
    assert loaded.optimizer.samples_per_update == 2 * into
    recorder = GainRecorder()
    loaded.fit(x[:5 * into * BATCH], y[:5 * into * BATCH], batch_size=into * BATCH, shuffle=False, verbose=0,
               callbacks=[recorder])
    assert_no_variance_seen(loaded.optimizer, recorder, 5)  # the mixed update, then two whole ones


@pytest.mark.parametrize("into", [2, 1])
def test_a_restore_mid_update_into_other_replicas_matches_the_reference(jax_devices, tmp_path, into):
    problem = LeastSquares(num_examples=64 * BATCH, dim=DIM, seed=5)
    options = {"learning_rate": 0.05, "momentum": 0.9}
    keras.distribution.set_distribution(_distribution(4))
    model = _model(problem.initial)
    model.compile(optimizer=keras_adascale.AdaScaleSGD(gradient_accumulation_steps=2, **options), loss="mse")
    recorder = Recorder(every=2)
    model.fit(problem.x[:5 * 4 * BATCH], problem.y[:5 * 4 * BATCH], batch_size=4 * BATCH, shuffle=False,
              verbose=0, callbacks=[recorder])
    model.save(tmp_path / "mid_update.keras")
    keras.distribution.set_distribution(_distribution(into))
    loaded = keras.models.load_model(tmp_path / "mid_update.keras")
    resumed = Recorder(every=1)  # the first batch completes the mixed update; then every second one
    start = 5 * 4 * BATCH
    rows = 5 * into * BATCH
    loaded.fit(problem.x[start:start + rows], problem.y[start:start + rows], batch_size=into * BATCH,
               shuffle=False, verbose=0, callbacks=[resumed])
    actual = recorder.history + [resumed.history[i] for i in (0, 2, 4)]

    reference = AdaScaleReference(problem.initial, scale=8, **options)
    expected = []

    def samples(first_row, replicas, micro_batches):
        return [problem.gradient(reference.params, first_row + i * BATCH, first_row + (i + 1) * BATCH)
                for i in range(replicas * micro_batches)]

    for update in range(2):
        reference.step(samples(update * 8 * BATCH, 4, 2))
        expected.append((reference.params.copy(), reference.gain, reference.tau))
    # The mixed update: one micro-batch of 4 replicas, one of `into`; its gradient the mean of the two
    # micro-batches' means, its statistics not averaged; S follows N = 2 x into from here.
    reference.scale = 2 * into
    first = np.mean(samples(2 * 8 * BATCH, 4, 1), axis=0)
    second = np.mean(samples(start, into, 1), axis=0)
    reference.step([first, second], measured=False)
    expected.append((reference.params.copy(), reference.gain, reference.tau))
    for update in range(2):
        reference.step(samples(start + (1 + 2 * update) * into * BATCH, into, 2))
        expected.append((reference.params.copy(), reference.gain, reference.tau))
    assert len(actual) == len(expected) == 5
    assert_same_history(actual, expected)
