"""AdaScaleModel: per-replica statistics under keras.distribution.DataParallel on JAX, 4 CPU devices.

conftest.py gives the JAX process 4 host devices (XLA_FLAGS). N = 4 replicas x k micro-batches: sample
i of an update is the i-th block of BATCH rows of its 4k x BATCH, as the reference takes them.
"""

import keras
import numpy as np
import pytest

import keras_adascale
from conftest import BACKEND, Recorder, assert_same_history
from problems import BATCH, LeastSquares, UpdateRecorder, reference_history, replay_reference
from reference import AdaScaleAdamReference, AdaScaleReference

REPLICAS = 4
UPDATES = 5


@pytest.fixture
def problem():
    return LeastSquares(num_examples=64 * BATCH, seed=3)


@pytest.fixture
def data_parallel():
    if BACKEND != "jax":
        pytest.skip("keras.distribution on JAX")
    import jax

    assert len(jax.devices("cpu")) == REPLICAS, "conftest.py sets XLA_FLAGS for 4 host devices"
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices("cpu")))
    yield
    keras.distribution.set_distribution(None)


def adascale_model(problem, cls=None):
    """The least-squares model as an AdaScaleModel (functional), or `cls` of the same layers."""
    inputs = keras.Input((problem.dim,))
    dense = keras.layers.Dense(1)
    if cls is keras_adascale.AdaScaleSequential:
        model = cls([inputs, dense])
    else:
        model = (cls or keras_adascale.AdaScaleModel)(inputs, dense(inputs))
    model.set_weights([problem.initial[:-1].reshape(-1, 1), problem.initial[-1:]])
    return model


def fit(model, problem, optimizer, steps, updates, first=0):
    model.compile(optimizer=optimizer, loss="mse")
    rows = REPLICAS * BATCH
    start, stop = first * steps * rows, (first + updates) * steps * rows
    recorder = Recorder(every=steps)
    model.fit(problem.x[start:stop], problem.y[start:stop], batch_size=rows, shuffle=False, callbacks=[recorder],
              verbose=0)
    return recorder.history


@pytest.mark.parametrize("steps", [1, 2])
def test_sgd_under_data_parallel_matches_the_reference_with_n_replicas_times_k(problem, data_parallel, steps):
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=steps if steps > 1 else None)
    assert optimizer.samples_per_update == REPLICAS * steps and optimizer.scale == REPLICAS * steps
    history = fit(adascale_model(problem), problem, optimizer, steps, UPDATES)
    _, expected = reference_history(problem, REPLICAS * steps, UPDATES, learning_rate=0.05, momentum=0.9)
    assert_same_history(history, expected)
    assert 1.0 < history[-1][1] < REPLICAS * steps


def test_adam_and_a_sequential_model_match_the_reference(problem, data_parallel):
    options = {"learning_rate": 0.05, "beta_1": 0.9, "beta_2": 0.99}
    optimizer = keras_adascale.AdaScaleAdam(**options)
    history = fit(adascale_model(problem, keras_adascale.AdaScaleSequential), problem, optimizer, 1, UPDATES)
    reference = AdaScaleAdamReference(problem.initial, scale=REPLICAS, **options)
    _, expected = reference_history(problem, REPLICAS, UPDATES, reference=reference)
    assert_same_history(history, expected)


def test_keras_own_model_under_data_parallel_is_refused_naming_adascale_model(problem, data_parallel):
    model = problem.model()
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.05), loss="mse")
    with pytest.raises(ValueError, match="sees only the replicas' mean gradient.*AdaScaleModel"):
        model.fit(problem.x[:64], problem.y[:64], batch_size=REPLICAS * BATCH, verbose=0)


def test_an_optimizer_made_before_the_distribution_is_refused(problem):
    if BACKEND != "jax":
        pytest.skip("keras.distribution on JAX")
    optimizer = keras_adascale.AdaScaleSGD(0.05, gradient_accumulation_steps=2)  # one device: N = k
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices("cpu")))
    try:
        model = adascale_model(problem)
        model.compile(optimizer=optimizer, loss="mse")
        with pytest.raises(ValueError, match="made for 1 device on the batch axis, but the distribution's batch axis has 4 devices"):
            model.fit(problem.x[:64], problem.y[:64], batch_size=REPLICAS * BATCH, verbose=0)
    finally:
        keras.distribution.set_distribution(None)


def test_save_and_load_resume_exactly(problem, data_parallel, tmp_path):
    _, expected = reference_history(problem, REPLICAS * 2, 4, learning_rate=0.05, momentum=0.9)
    model = adascale_model(problem)
    first = fit(model, problem, keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=2),
                2, 2)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert isinstance(loaded, keras_adascale.AdaScaleModel)
    recorder = Recorder(every=2)
    rows = 2 * REPLICAS * BATCH
    loaded.fit(problem.x[2 * rows:4 * rows], problem.y[2 * rows:4 * rows], batch_size=REPLICAS * BATCH,
               shuffle=False, callbacks=[recorder], verbose=0)
    assert_same_history(first + recorder.history, expected)


def test_the_loss_and_metrics_are_the_global_batch_s_as_in_keras_own_step(problem, data_parallel):
    # Learning rate 0: both models keep their weights, so each batch's logs are comparable.
    logs = {}
    for name, model in (("keras", problem.model()), ("adascale", adascale_model(problem))):
        optimizer = keras_adascale.AdaScaleSGD(0.0) if name == "adascale" else keras.optimizers.SGD(0.0)
        model.compile(optimizer=optimizer, loss="mse", metrics=["mae"])
        history = model.fit(problem.x[:256], problem.y[:256], batch_size=REPLICAS * BATCH, shuffle=False,
                            epochs=2, verbose=0)
        logs[name] = history.history
    for key in ("loss", "mae"):
        np.testing.assert_allclose(logs["adascale"][key], logs["keras"][key], rtol=1e-6)


def test_each_replica_draws_its_own_dropout_mask(data_parallel):
    # Every replica gets the same rows: with one mask for all, the replicas' gradients would be equal and
    # the variance 0 (Keras's seed generators give each shard of a shard_map the same state).
    inputs = keras.Input((16,))
    outputs = keras.layers.Dense(1, kernel_initializer="ones")(keras.layers.Dropout(0.5)(inputs))
    model = keras_adascale.AdaScaleModel(inputs, outputs)
    optimizer = keras_adascale.AdaScaleSGD(0.0)
    model.compile(optimizer=optimizer, loss="mse")
    x = np.tile(np.linspace(1.0, 2.0, 16, dtype=np.float32), (REPLICAS * BATCH, 1))
    model.fit(x, np.zeros((REPLICAS * BATCH, 1), np.float32), batch_size=REPLICAS * BATCH, verbose=0)
    assert optimizer.snapshot()["gradient_variance"] > 0
    # and the next step draws new masks: the seed state advanced as in Keras's own step
    states = [v for v in model.non_trainable_variables if v.path.endswith("seed_generator_state")]
    assert states and all(int(np.asarray(keras.ops.convert_to_numpy(s))[1]) > 0 for s in states)


def test_without_a_distribution_it_is_keras_own_step(problem):
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=4)
    model = adascale_model(problem)
    model.compile(optimizer=optimizer, loss="mse")
    recorder = Recorder(every=4)
    model.fit(problem.x[:4 * 4 * BATCH], problem.y[:4 * 4 * BATCH], batch_size=BATCH, shuffle=False,
              callbacks=[recorder], verbose=0)
    _, expected = reference_history(problem, 4, 4, learning_rate=0.05, momentum=0.9)
    assert_same_history(recorder.history, expected)


def test_batch_normalization_is_per_replica_and_its_moving_statistics_the_replicas_mean(data_parallel):
    # Each replica's rows have their own mean: per-replica normalization differs from the global batch's.
    rng = np.random.default_rng(0)
    rows = BATCH
    x = np.concatenate([10.0 * r + (r + 1) * rng.normal(size=(rows, 1)) for r in range(REPLICAS)]).astype(np.float32)
    inputs = keras.Input((1,))
    normalized = keras.layers.BatchNormalization(center=False, scale=False, momentum=0.99, epsilon=1e-3)(inputs)
    outputs = keras.layers.Dense(1, kernel_initializer="ones", use_bias=False)(normalized)
    model = keras_adascale.AdaScaleModel(inputs, outputs)
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.0), loss="mse")
    history = model.fit(x, x, batch_size=REPLICAS * rows, shuffle=False, verbose=0)
    parts = x.astype(np.float64).reshape(REPLICAS, rows)
    means, variances = parts.mean(axis=1), parts.var(axis=1)
    per_replica = np.mean([np.mean(((p - m) / np.sqrt(v + 1e-3) - p) ** 2) for p, m, v in zip(parts, means, variances)])
    whole = np.mean(((parts - parts.mean()) / np.sqrt(parts.var() + 1e-3) - parts) ** 2)
    assert history.history["loss"][0] == pytest.approx(per_replica, rel=1e-5)
    assert abs(per_replica - whole) > 1e-2 * whole  # the two normalizations are told apart
    layer = model.layers[1]
    assert float(np.asarray(layer.moving_mean)[0]) == pytest.approx(0.01 * means.mean(), rel=1e-5)
    assert float(np.asarray(layer.moving_variance)[0]) == pytest.approx(0.99 + 0.01 * variances.mean(), rel=1e-5)


def test_changing_the_accumulation_steps_between_fits_matches_the_reference(problem, data_parallel):
    # k 2 -> 1 with 4 replicas: N 8 -> 4, and S keeps its ratio to N (8 -> 4).
    reference, first = reference_history(problem, REPLICAS * 2, 3, learning_rate=0.05, momentum=0.9)
    reference.scale = REPLICAS
    _, second = reference_history(problem, REPLICAS, 4, reference=reference, first=6)
    model = adascale_model(problem)
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=2)
    history = fit(model, problem, optimizer, 2, 3)
    optimizer.set_accumulation_steps(1)
    assert optimizer.samples_per_update == REPLICAS and optimizer.scale == REPLICAS
    recorder = Recorder(every=1)
    start, rows = 3 * 2 * REPLICAS * BATCH, REPLICAS * BATCH
    model.fit(problem.x[start:start + 4 * rows], problem.y[start:start + 4 * rows], batch_size=rows, shuffle=False,
              callbacks=[recorder], verbose=0)
    assert_same_history(history + recorder.history, first + second)


def test_autoscale_changes_the_count_under_data_parallel(problem, data_parallel):
    optimizer = keras_adascale.AdaScaleSGD(0.01, momentum=0.9, gradient_accumulation_steps=2)
    model = adascale_model(problem)
    model.compile(optimizer=optimizer, loss="mse")
    # an update costing 4096 examples' compute: fewer, larger updates pay (S is a multiple of the 4 replicas)
    callback = keras_adascale.AutoScale(interval=0, warmup=0, update_cost=4096.0, max_steps=8)
    recorder = UpdateRecorder()  # after AutoScale: it reads the S that AutoScale set for the next update
    model.fit(problem.x, problem.y, batch_size=REPLICAS * BATCH, shuffle=False, epochs=2, verbose=0,
              callbacks=[callback, recorder])
    assert callback.changes and optimizer.accumulation_steps == callback.changes[-1]["steps"] != 2
    assert optimizer.samples_per_update == REPLICAS * optimizer.accumulation_steps
    assert callback.changes[-1]["scale"] == REPLICAS * callback.changes[-1]["steps"]
    # Each update: N = S = 4 replicas x its k micro-batches, k as AutoScale set it; the reference at the same
    # (N, S), update by update.
    assert [scale for _, _, scale in recorder.updates] == [REPLICAS * (stop - first)
                                                           for first, stop, _ in recorder.updates]
    assert len({scale for _, _, scale in recorder.updates}) > 1 and len(recorder.updates) >= 4  # one across epochs
    reference = AdaScaleReference(problem.initial, 0.01, scale=REPLICAS * 2, momentum=0.9)
    expected = replay_reference(problem, recorder.updates, reference, samples_per_batch=REPLICAS)
    assert_same_history(recorder.history, expected)


def test_model_parallel_with_a_batch_axis_matches_the_reference_with_its_replicas():
    # A 2 x 2 mesh: the kernel's rows sharded on "model", the batch on "batch" (2 replicas).
    if BACKEND != "jax":
        pytest.skip("keras.distribution on JAX")
    problem = LeastSquares(num_examples=64 * BATCH, dim=4, seed=5)
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices=keras.distribution.list_devices("cpu"))
    layout = keras.distribution.LayoutMap(mesh)
    layout[".*dense.*kernel"] = ("model", None)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layout, batch_dim_name="batch"))
    try:
        model = adascale_model(problem)
        kernel = model.layers[-1].kernel
        assert "model" in str(kernel.value.sharding.spec)  # the layout took
        optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=2)
        assert optimizer.samples_per_update == 4
        model.compile(optimizer=optimizer, loss="mse")
        recorder = Recorder(every=2)
        rows = 2 * BATCH
        model.fit(problem.x[:5 * 2 * rows], problem.y[:5 * 2 * rows], batch_size=rows, shuffle=False,
                  callbacks=[recorder], verbose=0)
    finally:
        keras.distribution.set_distribution(None)
    _, expected = reference_history(problem, 4, 5, learning_rate=0.05, momentum=0.9)
    assert_same_history(recorder.history, expected)


def test_sample_weights_and_a_loss_scale_factor_give_keras_own_loss_and_the_reference(problem, data_parallel):
    weights = np.linspace(0.5, 1.5, 256).astype(np.float32)
    losses = {}
    for name, model in (("keras", problem.model()), ("adascale", adascale_model(problem))):
        optimizer = keras_adascale.AdaScaleSGD(0.0) if name == "adascale" else keras.optimizers.SGD(0.0)
        model.compile(optimizer=optimizer, loss="mse")
        losses[name] = model.fit(problem.x[:256], problem.y[:256], sample_weight=weights, batch_size=REPLICAS * BATCH,
                                 shuffle=False, verbose=0).history["loss"]
    np.testing.assert_allclose(losses["adascale"], losses["keras"], rtol=1e-6)
    # The loss scaled by 128 (and the gradients with it): the statistics are of the unscaled gradients.
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, loss_scale_factor=128.0)
    history = fit(adascale_model(problem), problem, optimizer, 1, UPDATES)
    _, expected = reference_history(problem, REPLICAS, UPDATES, learning_rate=0.05, momentum=0.9)
    assert_same_history(history, expected)


def test_a_loss_scale_optimizer_under_a_distribution_matches_the_reference(problem, data_parallel):
    """Keras's LossScaleOptimizer around AdaScaleSGD (what "mixed_float16" makes at compile), float32 model: each
    replica's loss and gradient are scaled by the dynamic scale (2^15: exact in float32), the statistics are of
    the unscaled gradients, so every update is the reference's."""
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9)
    wrapped = keras.optimizers.LossScaleOptimizer(optimizer)
    history = fit(adascale_model(problem), problem, wrapped, 1, UPDATES)
    assert float(wrapped.dynamic_scale) == 2.0 ** 15 and int(optimizer.iterations) == UPDATES
    _, expected = reference_history(problem, REPLICAS, UPDATES, learning_rate=0.05, momentum=0.9)
    assert_same_history(history, expected)


@keras.saving.register_keras_serializable(package="tests")
class Subclassed(keras_adascale.AdaScaleModel):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(1)

    def call(self, inputs):
        return self.dense(inputs)


def test_a_subclassed_model_matches_the_reference(problem, data_parallel):
    model = Subclassed()
    model(problem.x[:1])
    model.set_weights([problem.initial[:-1].reshape(-1, 1), problem.initial[-1:]])
    history = fit(model, problem, keras_adascale.AdaScaleSGD(0.05, momentum=0.9), 1, UPDATES)
    _, expected = reference_history(problem, REPLICAS, UPDATES, learning_rate=0.05, momentum=0.9)
    assert_same_history(history, expected)
