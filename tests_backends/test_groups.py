"""AdaScaleModel(groups=n): each device's part of a batch split into n contiguous groups of equal rows, each group's
gradient one of AdaScale's samples, in one train step (issue 43). N = replicas x n x k. Against the NumPy reference:
sample i of an update is the i-th block of BATCH rows of its N x BATCH, as with replicas and accumulation.

This first version takes each group's gradient in a `jax.vmap` over the groups (exact for every layer, n gradients
in memory); the cost is measured in benchmarks, not asserted here.
"""

import keras
import numpy as np
import pytest

import keras_adascale
from conftest import BACKEND, Recorder, assert_same_history
from problems import BATCH, LeastSquares, reference_history
from reference import AdaScaleAdamReference

jax_only = pytest.mark.skipif(BACKEND != "jax", reason="groups: Keras's JAX backend only for now")
UPDATES = 5


@pytest.fixture
def problem():
    return LeastSquares(num_examples=64 * BATCH, seed=3)


@pytest.fixture
def data_parallel():
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices("cpu")))
    yield 4
    keras.distribution.set_distribution(None)


def model_of(problem, groups, cls=keras_adascale.AdaScaleModel):
    inputs = keras.Input((problem.dim,))
    dense = keras.layers.Dense(1)
    if cls is keras_adascale.AdaScaleSequential:
        model = cls([inputs, dense], groups=groups)
    else:
        model = cls(inputs, dense(inputs), groups=groups)
    model.set_weights([problem.initial[:-1].reshape(-1, 1), problem.initial[-1:]])
    return model


def fit(model, problem, optimizer, rows_per_micro_batch, steps, updates, first=0):
    model.compile(optimizer=optimizer, loss="mse")
    start = first * steps * rows_per_micro_batch
    stop = (first + updates) * steps * rows_per_micro_batch
    recorder = Recorder(every=steps)
    model.fit(problem.x[start:stop], problem.y[start:stop], batch_size=rows_per_micro_batch, shuffle=False,
              callbacks=[recorder], verbose=0)
    return recorder.history


@jax_only
@pytest.mark.parametrize("groups, steps", [(4, 1), (2, 2)])
def test_groups_on_one_device_match_the_reference_with_n_times_k_samples(problem, groups, steps):
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=steps if steps > 1 else None)
    model = model_of(problem, groups)
    history = fit(model, problem, optimizer, groups * BATCH, steps, UPDATES)
    assert optimizer.samples_per_update == groups * steps and optimizer.scale == groups * steps
    _, expected = reference_history(problem, groups * steps, UPDATES, learning_rate=0.05, momentum=0.9)
    assert_same_history(history, expected)
    assert 1.0 < history[-1][1] < groups * steps


@jax_only
def test_groups_equal_gradient_accumulation_on_the_same_rows(problem):
    """groups=4 with batches of 4 x BATCH, and Keras's own step with gradient_accumulation_steps=4 of BATCH rows."""
    grouped = fit(model_of(problem, 4), problem, keras_adascale.AdaScaleSGD(0.05, momentum=0.9), 4 * BATCH, 1, UPDATES)
    accumulated = fit(problem.model(), problem,
                      keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=4), BATCH, 4, UPDATES)
    assert len(grouped) == len(accumulated) == UPDATES
    for (w1, g1, t1), (w2, g2, t2) in zip(grouped, accumulated, strict=True):
        np.testing.assert_allclose(w1, w2, rtol=2e-5, atol=1e-6)
        assert g1 == pytest.approx(g2, rel=2e-5) and t1 == pytest.approx(t2, rel=2e-5)


@jax_only
def test_groups_under_data_parallel_match_the_reference_with_replicas_times_n(problem, data_parallel):
    replicas = data_parallel
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9)
    history = fit(model_of(problem, 2, keras_adascale.AdaScaleSequential), problem, optimizer, replicas * 2 * BATCH, 1,
                  UPDATES)
    assert optimizer.samples_per_update == replicas * 2
    _, expected = reference_history(problem, replicas * 2, UPDATES, learning_rate=0.05, momentum=0.9)
    assert_same_history(history, expected)


@jax_only
def test_adam_with_groups_matches_the_reference(problem):
    options = {"learning_rate": 0.05, "beta_1": 0.9, "beta_2": 0.99}
    history = fit(model_of(problem, 4), problem, keras_adascale.AdaScaleAdam(**options), 4 * BATCH, 1, UPDATES)
    reference = AdaScaleAdamReference(problem.initial, scale=4, **options)
    _, expected = reference_history(problem, 4, UPDATES, reference=reference)
    assert_same_history(history, expected)


@jax_only
@pytest.mark.parametrize("cls", [keras_adascale.AdaScaleModel, keras_adascale.AdaScaleSequential],
                         ids=["functional", "sequential"])
def test_a_saved_model_keeps_its_groups_and_resumes_exactly(problem, tmp_path, cls):
    first = fit(model_of(problem, 4, cls), problem, keras_adascale.AdaScaleSGD(0.05, momentum=0.9), 4 * BATCH, 1, 2)
    assert len(first) == 2
    model = model_of(problem, 4, cls)
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.05, momentum=0.9), loss="mse")
    model.fit(problem.x[: 2 * 4 * BATCH], problem.y[: 2 * 4 * BATCH], batch_size=4 * BATCH, shuffle=False, verbose=0)
    model.save(tmp_path / "grouped.keras")
    loaded = keras.models.load_model(tmp_path / "grouped.keras")
    assert loaded.groups == 4 and isinstance(loaded, keras_adascale.AdaScaleModel if cls is
                                             keras_adascale.AdaScaleModel else cls)
    assert loaded.optimizer.samples_per_update == 4
    recorder = Recorder()
    loaded.fit(problem.x[2 * 4 * BATCH: UPDATES * 4 * BATCH], problem.y[2 * 4 * BATCH: UPDATES * 4 * BATCH],
               batch_size=4 * BATCH, shuffle=False, callbacks=[recorder], verbose=0)
    _, expected = reference_history(problem, 4, UPDATES, learning_rate=0.05, momentum=0.9)
    assert_same_history(recorder.history, expected[2:])


@jax_only
def test_a_batch_the_groups_cannot_split_is_refused_before_training(problem):
    model = model_of(problem, 4)
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.05), loss="mse")
    with pytest.raises(ValueError, match=r"AdaScaleModel\(groups=4\) splits every batch into 4 gradient samples of "
                                         r"equal rows, and the batch size 30 does not divide by 4\. To train, use a "
                                         r"batch size that does \(28, say\)"):
        model.fit(problem.x[:60], problem.y[:60], batch_size=30, verbose=0)
    with pytest.raises(ValueError, match=r"the training data's 66 rows in batches of 32 leave a last batch of 2, "
                                         r"which does not divide by 4"):
        model.fit(problem.x[:66], problem.y[:66], batch_size=32, verbose=0)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0


@jax_only
def test_groups_need_an_adascale_optimizer(problem):
    with pytest.raises(ValueError, match=r"AdaScaleFunctional\(groups=2\) gives an AdaScale optimizer .* got SGD"):
        model_of(problem, 2).compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")


def test_groups_must_be_a_positive_int_and_are_jax_only(problem):
    with pytest.raises(ValueError, match=r"Argument `groups` must be an integer >= 1. Received: groups=0"):
        model_of(problem, 0)
    if BACKEND == "jax":
        assert model_of(problem, 3).groups == 3
    else:
        with pytest.raises(ValueError, match=r"Argument `groups` splits each device's batch .* on Keras's JAX backend "
                                             r"only for now; Keras runs on torch. .*gradient_accumulation_steps=3"):
            model_of(problem, 3)
