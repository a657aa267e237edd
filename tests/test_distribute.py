"""AdaScaleSGD under a real MirroredStrategy (logical CPU devices) against the NumPy reference."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adascale
from conftest import BATCH, Recorder, assert_same_history, flat_weights, mirrored, mse_replica_step, reference_history

def fit_mirrored(problem, replicas, updates, first=0, model=None, **kwargs):
    strategy = mirrored(replicas)
    with strategy.scope():
        if model is None:
            model = problem.model()
            model.compile(optimizer=keras_adascale.AdaScaleSGD(**kwargs), loss="mse")
    start, stop = first * replicas * BATCH, (first + updates) * replicas * BATCH
    dataset = tf.data.Dataset.from_tensor_slices((problem.x[start:stop], problem.y[start:stop])).batch(
        replicas * BATCH
    )
    recorder = Recorder()
    model.fit(dataset, callbacks=[recorder], verbose=0)
    return model, recorder.history


def test_mirrored_fit_matches_reference_update_by_update(least_squares):
    _, expected = reference_history(least_squares, 4, 5, learning_rate=0.05, momentum=0.9)
    model, actual = fit_mirrored(least_squares, 4, 5, learning_rate=0.05, momentum=0.9)
    assert model.optimizer.scale == 4
    assert_same_history(actual, expected)
    assert 1.0 < expected[-1][1] < 4.0


def test_mirrored_fit_with_scale_above_the_replicas_matches_reference(least_squares):
    # Each replica's batch holds two baseline batches: N = 4 samples, S = 8.
    _, expected = reference_history(least_squares, 4, 5, scale=8, learning_rate=0.05, momentum=0.9)
    model, actual = fit_mirrored(least_squares, 4, 5, learning_rate=0.05, momentum=0.9, scale=8)
    assert model.optimizer.scale == 8 and model.optimizer.samples_per_update == 4
    assert_same_history(actual, expected)
    _, same_scale = reference_history(least_squares, 4, 1, learning_rate=0.05, momentum=0.9)
    assert expected[0][1] > 1.2 * same_scale[0][1]  # S, not N, sets the gain


def mirrored_custom_loop(problem, replicas, updates, **kwargs):
    strategy = mirrored(replicas)
    with strategy.scope():
        model = problem.model()
        optimizer = keras_adascale.AdaScaleSGD(**kwargs)
        optimizer.build(model.trainable_variables)
    x, y = tf.constant(problem.x), tf.constant(problem.y)

    @tf.function
    def train_step(update):
        replica_fn = mse_replica_step(model, optimizer, replicas * BATCH)

        def slice_for(context):  # replica i gets the i-th BATCH rows of this update's block
            start = (update * replicas + context.replica_id_in_sync_group) * BATCH
            return x[start : start + BATCH], y[start : start + BATCH]

        x_local, y_local = (
            strategy.experimental_distribute_values_from_function(lambda ctx: slice_for(ctx)[i]) for i in (0, 1)
        )
        strategy.run(replica_fn, args=(x_local, y_local))

    actual = []
    for update in range(updates):
        train_step(tf.constant(update))
        actual.append((flat_weights(model), float(optimizer.gain), float(optimizer.scale_invariant_iterations)))
    return actual


def test_mirrored_custom_loop_matches_reference(least_squares):
    options = {"learning_rate": 0.05, "momentum": 0.5, "nesterov": True}
    _, expected = reference_history(least_squares, 4, 4, **options)
    assert_same_history(mirrored_custom_loop(least_squares, 4, 4, **options), expected)


def test_mirrored_custom_loop_with_scale_above_the_replicas_matches_reference(least_squares):
    options = {"learning_rate": 0.05, "momentum": 0.9}
    _, expected = reference_history(least_squares, 4, 4, scale=8, **options)
    assert_same_history(mirrored_custom_loop(least_squares, 4, 4, scale=8, **options), expected)


def test_four_replicas_match_four_accumulation_steps_on_one_device(least_squares):
    updates = 5
    _, mirrored_history = fit_mirrored(least_squares, 4, updates, learning_rate=0.05, momentum=0.9)
    model = least_squares.model()
    model.compile(
        optimizer=keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=4), loss="mse"
    )
    recorder = Recorder()
    count = updates * 4 * BATCH
    model.fit(least_squares.x[:count], least_squares.y[:count], batch_size=BATCH, shuffle=False,
              callbacks=[recorder], verbose=0)
    accumulated_history = recorder.history[3::4]  # the micro-steps that updated
    assert_same_history(mirrored_history, accumulated_history)


@pytest.mark.parametrize("new_replicas", [2, 8])
def test_elastic_resume_keeps_tau_and_averages_and_uses_the_new_scale(least_squares, tmp_path, new_replicas):
    options = {"learning_rate": 0.03, "momentum": 0.9, "smoothing": 0.9}
    model, _ = fit_mirrored(least_squares, 4, 2, **options)
    saved_tau = float(model.optimizer.scale_invariant_iterations)
    path = tmp_path / "s4.keras"
    model.save(path)

    reference, _ = reference_history(least_squares, 4, 2, **options)
    # The reference continues with S = new_replicas samples, from where S = 4 stopped.
    reference.scale = new_replicas
    rows_done = 2 * 4 * BATCH
    assert rows_done % (new_replicas * BATCH) == 0
    first = rows_done // (new_replicas * BATCH)
    _, expected = reference_history(least_squares, new_replicas, 2, reference=reference, first=first)

    with mirrored(new_replicas).scope():
        resumed = keras.models.load_model(path)
    assert resumed.optimizer.scale == new_replicas
    assert float(resumed.optimizer.scale_invariant_iterations) == pytest.approx(saved_tau)
    _, actual = fit_mirrored(least_squares, new_replicas, 2, first=first, model=resumed)
    assert_same_history(actual, expected)


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
    recorder = Recorder()
    model.fit(dataset, callbacks=[recorder], verbose=0)
    assert model.optimizer.scale == (scale or 4) and model.optimizer.samples_per_update == 4
    assert_same_history(recorder.history[steps - 1 :: steps], expected)


@pytest.mark.parametrize("replicas", [1, 2])
def test_loss_scaled_step_with_inf_gradient_changes_nothing(least_squares, replicas):
    strategy = mirrored(replicas) if replicas > 1 else tf.distribute.get_strategy()
    with strategy.scope():
        model = least_squares.model()
        inner = keras_adascale.AdaScaleSGD(0.05, momentum=0.9)
        model.compile(optimizer=keras.optimizers.LossScaleOptimizer(inner), loss="mse")
    x, y = least_squares.x[: 2 * replicas * BATCH], least_squares.y[: 2 * replicas * BATCH]
    fit = lambda features: model.fit(features, y, batch_size=replicas * BATCH, shuffle=False, verbose=0)

    def snapshot():
        return flat_weights(model), [float(inner.scale_invariant_iterations), float(inner.gradient_variance),
                                     float(inner.gradient_sqr_norm), int(inner.iterations.numpy())]

    fit(x)
    weights, state = snapshot()
    assert state[0] > 0
    poisoned = x.copy()
    poisoned[:, 0] = np.inf
    fit(poisoned)
    poisoned_weights, poisoned_state = snapshot()
    np.testing.assert_array_equal(poisoned_weights, weights)
    assert poisoned_state == state
    fit(x)
    final_weights, final_state = snapshot()
    assert final_state[0] > state[0] and final_state[3] == state[3] + 2
    assert np.all(np.isfinite(final_weights)) and not np.array_equal(final_weights, weights)


def test_optimizer_created_outside_the_strategy_scope_is_refused(least_squares):
    strategy = mirrored(2)
    optimizer = keras_adascale.AdaScaleSGD(0.1)
    with strategy.scope():
        model = least_squares.model()
        model.compile(optimizer=optimizer, loss="mse")
    with pytest.raises(ValueError, match="outside the `strategy.scope"):
        model.fit(least_squares.x[:16], least_squares.y[:16], batch_size=16, verbose=0)


@pytest.mark.parametrize("built_outside", [True, False])
def test_optimizer_created_outside_the_strategy_scope_is_refused_in_a_custom_loop(least_squares, built_outside):
    strategy = mirrored(2)
    optimizer = keras_adascale.AdaScaleSGD(0.1)
    with strategy.scope():
        model = least_squares.model()
    if built_outside:  # the README's custom loop builds the optimizer before the first step
        optimizer.build(model.trainable_variables)
    step = mse_replica_step(model, optimizer, global_batch_size=16)
    dataset = tf.data.Dataset.from_tensor_slices((least_squares.x[:16], least_squares.y[:16])).batch(16)
    batch = next(iter(strategy.experimental_distribute_dataset(dataset)))
    with pytest.raises(ValueError, match="created outside the `strategy.scope"):
        tf.function(lambda x, y: strategy.run(step, args=(x, y)))(*batch)


def test_one_device_strategy_with_accumulation_matches_the_reference(least_squares):
    scale, updates = 3, 4
    _, expected = reference_history(least_squares, scale, updates, learning_rate=0.05, momentum=0.9)
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        model = least_squares.model()
        model.compile(optimizer=keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=scale),
                      loss="mse")
    recorder = Recorder()
    count = updates * scale * BATCH
    model.fit(least_squares.x[:count], least_squares.y[:count], batch_size=BATCH, shuffle=False,
              callbacks=[recorder], verbose=0)
    assert model.optimizer.scale == scale
    assert_same_history(recorder.history[scale - 1 :: scale], expected)


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
