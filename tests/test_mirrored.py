"""AdaScaleSGD under a real MirroredStrategy (logical CPU devices) against the NumPy reference."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adascale
from conftest import (BATCH, LeastSquares, assert_same_history, fit_mirrored, flat_weights, mirrored, mse_replica_step,
                      reference_history)


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


def loss_scaled_fits(problem, replicas):
    """Fits of 2 updates under `LossScaleOptimizer(AdaScaleSGD)`: finite, then every input inf, then finite again.

    Returns:
        `[(weights, [tau, sigma2, mu2, iterations]) after each fit]`.
    """
    strategy = mirrored(replicas) if replicas > 1 else tf.distribute.get_strategy()
    with strategy.scope():
        model = problem.model()
        inner = keras_adascale.AdaScaleSGD(0.05, momentum=0.9)
        model.compile(optimizer=keras.optimizers.LossScaleOptimizer(inner), loss="mse")
    x, y = problem.x[: 2 * replicas * BATCH], problem.y[: 2 * replicas * BATCH]
    poisoned = x.copy()
    poisoned[:, 0] = np.inf
    snapshots = []
    for features in (x, poisoned, x):
        model.fit(features, y, batch_size=replicas * BATCH, shuffle=False, verbose=0)
        snapshots.append((flat_weights(model), [float(inner.scale_invariant_iterations),
                                                float(inner.gradient_variance), float(inner.gradient_sqr_norm),
                                                int(inner.iterations.numpy())]))
    return snapshots


@pytest.mark.parametrize("replicas", [1, 2])
def test_loss_scaled_step_with_inf_gradient_changes_nothing(least_squares, replicas):
    (weights, state), (poisoned_weights, poisoned_state), _ = loss_scaled_fits(least_squares, replicas)
    assert state[0] > 0
    np.testing.assert_array_equal(poisoned_weights, weights)
    assert poisoned_state == state


@pytest.mark.parametrize("replicas", [1, 2])
def test_training_goes_on_after_a_loss_scaled_step_with_inf_gradient(least_squares, replicas):
    (weights, state), _, (final_weights, final_state) = loss_scaled_fits(least_squares, replicas)
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


def test_a_nan_on_one_replica_makes_every_replica_skip(least_squares):
    strategy = mirrored(2)
    with strategy.scope():
        model = least_squares.model()
        optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9)
        optimizer.build(model.trainable_variables)

    @tf.function
    def step(x, y):
        strategy.run(mse_replica_step(model, optimizer, 16), args=next(iter(strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensors((x, y))))))

    x, y = least_squares.x[:16].copy(), least_squares.y[:16]
    step(x, y)
    weights = model.get_weights()
    tau = float(optimizer.scale_invariant_iterations)
    x[12, 0] = np.nan  # in the second replica's half of the batch
    step(x, y)
    for before, after in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    assert float(optimizer.scale_invariant_iterations) == tau and int(optimizer.skipped_updates) == 1
    for variable in model.trainable_variables:  # the replicas did not drift apart
        components = [c.numpy() for c in strategy.experimental_local_results(variable.value)]
        np.testing.assert_array_equal(components[0], components[1])


def rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.fixture(scope="module")
def soaked():
    """2,000 updates of `model.fit` on 4 replicas: `(strategy, model, optimizer, RSS after 100, RSS after 2,000)`."""
    import resource

    problem = LeastSquares(num_examples=192)
    strategy = mirrored(4)
    with strategy.scope():
        model = problem.model()
        optimizer = keras_adascale.AdaScaleSGD(0.01, momentum=0.9)
        model.compile(optimizer=optimizer, loss="mse")
    dataset = tf.data.Dataset.from_tensor_slices((problem.x, problem.y)).repeat().batch(32)
    model.fit(dataset, steps_per_epoch=100, epochs=1, verbose=0)  # warm-up: tracing, allocator pools
    start = rss_mb()
    model.fit(dataset, steps_per_epoch=1900, epochs=1, verbose=0)
    end = rss_mb()
    print(f"soak: RSS {start:.1f} MB after 100 updates, {end:.1f} MB after 2000 "
          f"(peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MB)")
    return strategy, model, optimizer, start, end


@pytest.mark.slow
def test_soak_2000_updates_on_4_replicas_leave_the_replicas_identical(soaked):
    strategy, model, optimizer, _, _ = soaked
    assert int(optimizer.iterations.numpy()) == 2000
    for variable in model.trainable_variables + [v for v in optimizer.variables]:
        components = [np.asarray(c) for c in strategy.experimental_local_results(variable.value)]
        for component in components[1:]:
            np.testing.assert_array_equal(component, components[0], err_msg=variable.path)
    assert math.isfinite(float(optimizer.gain)) and 1.0 <= float(optimizer.gain) <= 4.0


@pytest.mark.slow
def test_soak_2000_updates_on_4_replicas_do_not_grow_the_memory(soaked):
    _, _, optimizer, start, end = soaked
    assert int(optimizer.iterations.numpy()) == 2000
    assert end - start < 50, f"RSS grew by {end - start:.1f} MB over 1900 updates"


@pytest.mark.parametrize("accumulation", [None, 2])
def test_the_documented_update_count_works_under_mirrored_strategy(accumulation):
    # `int(optimizer.iterations)` raises TypeError on a MirroredVariable (Keras's SGD too); the docs use .numpy().
    strategy = mirrored(2)
    with strategy.scope():
        variable = keras.Variable(np.zeros(3, np.float32))
        optimizer = keras_adascale.AdaScaleSGD(0.1, gradient_accumulation_steps=accumulation)
        optimizer.build([variable])
    for _ in range(accumulation or 1):
        strategy.run(lambda: optimizer.apply_gradients([(tf.ones(3), variable)]))
    assert int(optimizer.iterations.numpy()) == 1
    from keras_adascale import autoscale

    assert autoscale.updates_done(optimizer) == 1
