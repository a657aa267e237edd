"""AdaScaleModel(groups=n): each device's part of a batch split into n contiguous groups of equal rows, each group's
gradient one of AdaScale's samples, in one train step (issue 43). N = replicas x n x k. Against the NumPy reference:
sample i of an update is the i-th block of BATCH rows of its N x BATCH, as with replicas and accumulation.

This first version takes each group's gradient in a `jax.vmap` over the groups (exact for every layer, n gradients
in memory); the cost is measured in benchmarks, not asserted here.
"""

import inspect

import keras
import numpy as np
import pytest

import keras_adascale
from conftest import BACKEND, Recorder, assert_same_history
from problems import BATCH, LeastSquares, UpdateRecorder, reference_history, replay_reference
from reference import AdaScaleAdamReference, AdaScaleReference

jax_only = pytest.mark.skipif(BACKEND != "jax", reason="groups: Keras's JAX backend only for now")
UPDATES = 5


@pytest.fixture
def problem():
    """test_model.py's problem: 64 batches of BATCH rows."""
    return LeastSquares(num_examples=64 * BATCH, seed=3)


@pytest.fixture
def data_parallel():
    """All 4 host devices on the batch axis (conftest.py's XLA_FLAGS); yields their count."""
    devices = keras.distribution.list_devices("cpu")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    yield len(devices)
    keras.distribution.set_distribution(None)


def model_of(problem, groups, cls=keras_adascale.AdaScaleModel, **options):
    inputs = keras.Input((problem.dim,))
    dense = keras.layers.Dense(1)
    if cls is keras_adascale.AdaScaleSequential:
        model = cls([inputs, dense], groups=groups, **options)
    else:
        model = cls(inputs, dense(inputs), groups=groups, **options)
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


METHODS = pytest.mark.parametrize("method", ["one_pass", "vmap"])


@jax_only
@METHODS
@pytest.mark.parametrize("groups, steps", [(4, 1), (2, 2)])
def test_groups_on_one_device_match_the_reference_with_n_times_k_samples(problem, groups, steps, method):
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=steps if steps > 1 else None)
    model = model_of(problem, groups, group_norms=method)
    history = fit(model, problem, optimizer, groups * BATCH, steps, UPDATES)
    assert optimizer.samples_per_update == groups * steps and optimizer.scale == groups * steps
    _, expected = reference_history(problem, groups * steps, UPDATES, learning_rate=0.05, momentum=0.9)
    assert_same_history(history, expected)
    assert 1.0 < history[-1][1] < groups * steps


@jax_only
@METHODS
def test_groups_equal_gradient_accumulation_on_the_same_rows(problem, method):
    """groups=4 with batches of 4 x BATCH, and Keras's own step with gradient_accumulation_steps=4 of BATCH rows."""
    grouped = fit(model_of(problem, 4, group_norms=method), problem, keras_adascale.AdaScaleSGD(0.05, momentum=0.9), 4 * BATCH, 1, UPDATES)
    accumulated = fit(problem.model(), problem,
                      keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=4), BATCH, 4, UPDATES)
    assert len(grouped) == len(accumulated) == UPDATES
    for (w1, g1, t1), (w2, g2, t2) in zip(grouped, accumulated, strict=True):
        np.testing.assert_allclose(w1, w2, rtol=2e-5, atol=1e-6)
        assert g1 == pytest.approx(g2, rel=2e-5) and t1 == pytest.approx(t2, rel=2e-5)


@jax_only
@METHODS
def test_groups_under_data_parallel_match_the_reference_with_replicas_times_n(problem, data_parallel, method):
    replicas = data_parallel
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9)
    history = fit(model_of(problem, 2, keras_adascale.AdaScaleSequential, group_norms=method), problem, optimizer, replicas * 2 * BATCH, 1,
                  UPDATES)
    assert optimizer.samples_per_update == replicas * 2
    _, expected = reference_history(problem, replicas * 2, UPDATES, learning_rate=0.05, momentum=0.9)
    assert_same_history(history, expected)


@jax_only
@METHODS
def test_adam_with_groups_matches_the_reference(problem, method):
    options = {"learning_rate": 0.05, "beta_1": 0.9, "beta_2": 0.99}
    history = fit(model_of(problem, 4, group_norms=method), problem, keras_adascale.AdaScaleAdam(**options), 4 * BATCH, 1, UPDATES)
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


def cnn(groups, method, data_format="channels_last"):
    """Conv2D, Conv1D (on a reshaped map) and Dense layers, with biases: every layer the one-pass norms cover."""
    keras.utils.set_random_seed(1)
    shape = (8, 8, 2) if data_format == "channels_last" else (2, 8, 8)
    inputs = keras.Input(shape)
    hidden = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", data_format=data_format)(inputs)
    hidden = keras.layers.Reshape((16, 4))(hidden)
    hidden = keras.layers.Conv1D(3, 2, dilation_rate=2, activation="tanh")(hidden)
    hidden = keras.layers.Flatten()(hidden)
    outputs = keras.layers.Dense(5)(keras.layers.Dense(6, activation="relu")(hidden))
    return keras_adascale.AdaScaleModel(inputs, outputs, groups=groups, group_norms=method)


def cnn_history(groups, method, data_format="channels_last", updates=4, rows=8):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(updates * groups * rows, 8, 8, 2)).astype("float32")
    if data_format == "channels_first":
        x = np.moveaxis(x, -1, 1)
    y = rng.integers(0, 5, size=(len(x),))
    model = cnn(groups, method, data_format)
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    recorder = AllWeights()
    model.fit(x, y, batch_size=groups * rows, shuffle=False, callbacks=[recorder], verbose=0)
    return recorder.history


class AllWeights(keras.callbacks.Callback):
    """(every weight, flat; gain; tau) after each update."""

    def on_train_begin(self, logs=None):
        self.history = []

    def on_train_batch_end(self, batch, logs=None):
        optimizer = self.model.optimizer
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's
        self.history.append((np.concatenate([w.ravel() for w in self.model.get_weights()]), float(optimizer.gain),
                             float(optimizer.scale_invariant_iterations)))


@jax_only
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_one_pass_norms_of_conv_and_dense_layers_equal_each_group_s_own_gradient(data_format):
    """The one-pass rules (Dense's Gram matrices or per-group kernels, Conv's transposed convolutions, biases)
    against each group's gradient taken by jax.vmap: the same gain, tau and weights, update by update."""
    one_pass, vmapped = cnn_history(4, "one_pass", data_format), cnn_history(4, "vmap", data_format)
    assert len(one_pass) == len(vmapped) == 4
    for (w1, g1, t1), (w2, g2, t2) in zip(one_pass, vmapped, strict=True):
        np.testing.assert_allclose(w1, w2, rtol=1e-4, atol=1e-6)
        assert g1 == pytest.approx(g2, rel=1e-4) and t1 == pytest.approx(t2, rel=1e-4)
    assert one_pass[0][1] > 1.0


@jax_only
@pytest.mark.parametrize("layer, named", [
    # named: Keras's default names count the layers made before in the process (test order)
    (lambda: keras.layers.Dense(3, activity_regularizer="l2", name="dense_activity"),
     "dense_activity/kernel (Dense 'dense_activity': its activity_regularizer adds a loss"),
    (lambda: keras.layers.BatchNormalization(renorm=True, name="batch_normalization"),
     "batch_normalization/gamma (BatchNormalization"),
    (lambda: keras.layers.GroupNormalization(1, name="group_normalization"), "group_normalization/gamma (GroupNormalization"),
], ids=["activity_regularizer", "batch_norm", "group_norm"])
def test_one_pass_norms_refuse_what_they_cannot_measure_naming_it(problem, layer, named):
    if "BatchNormalization" in named and "renorm" not in inspect.signature(keras.layers.BatchNormalization).parameters:
        pytest.skip(f"Keras {keras.__version__}'s BatchNormalization has no renorm")
    inputs = keras.Input((problem.dim,))
    outputs = keras.layers.Dense(1)(layer()(inputs))
    model = keras_adascale.AdaScaleModel(inputs, outputs, groups=4)
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.05), loss="mse")
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=r"groups=4\) measures the groups' gradient norms in the one backward pass") \
            as raised:
        model.fit(problem.x[:64], problem.y[:64], batch_size=32, verbose=0)
    assert named in str(raised.value) and "group_norms='vmap'" in str(raised.value)
    for old, new in zip(before, model.get_weights(), strict=True):  # refused before any update
        np.testing.assert_array_equal(old, new)
    vmapped = keras_adascale.AdaScaleModel(inputs, outputs, groups=4, group_norms="vmap")
    vmapped.compile(optimizer=keras_adascale.AdaScaleSGD(0.05), loss="mse")
    vmapped.fit(problem.x[:64], problem.y[:64], batch_size=32, verbose=0)  # exact for every layer


@jax_only
def test_one_pass_norms_refuse_a_layer_called_twice(problem):
    inputs = keras.Input((problem.dim,))
    shared = keras.layers.Dense(problem.dim)
    model = keras_adascale.AdaScaleModel(inputs, keras.layers.Dense(1)(shared(shared(inputs))), groups=2)
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.05), loss="mse")
    with pytest.raises(ValueError, match=r"Dense 'dense(_\d+)?' is called twice in one step"):
        model.fit(problem.x[:64], problem.y[:64], batch_size=32, verbose=0)


def test_group_norms_must_be_a_known_method(problem):
    with pytest.raises(ValueError, match=r"Argument `group_norms` must be one of \('one_pass', 'vmap'\). "
                                         r"Received: group_norms='ghost'"):
        model_of(problem, 2, group_norms="ghost")


@jax_only
def test_one_pass_norms_refuse_losses_added_in_the_forward_pass(problem):
    class Penalized(keras_adascale.AdaScaleModel):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(1)

        def call(self, inputs):
            outputs = self.dense(inputs)
            self.add_loss(10.0 * keras.ops.sum(keras.ops.square(self.dense.kernel)))
            return outputs

    model = Penalized(groups=2)
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.05), loss="mse")
    with pytest.raises(ValueError, match=r"Penalized\(groups=2\) measures the groups' gradient norms through the "
                                         r"layers' outputs, and the model adds 1 loss in its forward pass"):
        model.fit(problem.x[:64], problem.y[:64], batch_size=32, verbose=0)
    vmapped = Penalized(groups=2, group_norms="vmap")
    vmapped.compile(optimizer=keras_adascale.AdaScaleSGD(0.05), loss="mse")
    vmapped.fit(problem.x[:64], problem.y[:64], batch_size=32, verbose=0)


@jax_only
def test_a_generator_s_batch_the_groups_cannot_split_is_refused_at_that_batch(problem):
    def batches():
        yield problem.x[:30], problem.y[:30]

    model = model_of(problem, 4)
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.05), loss="mse")
    with pytest.raises(ValueError, match=r"AdaScaleModel\(groups=4\) splits each device's part of every batch into 4 "
                                         r"gradient samples of equal rows, and a batch gives a device 30 rows"):
        model.fit(batches(), steps_per_epoch=1, verbose=0)


# The rules for EinsumDense, Embedding, LayerNormalization and BatchNormalization.

def _sequence_model(body, groups=4, method="one_pass", ids=False):
    """Inputs of 6 steps (token ids under 11, or 4 features), `body` on them, then a Dense of 3 outputs."""
    inputs = keras.Input((6,), dtype="int32") if ids else keras.Input((6, 4))
    hidden = body(inputs)
    if len(hidden.shape) > 3:
        hidden = keras.layers.Reshape((6, -1))(hidden)
    if len(hidden.shape) > 2:
        hidden = keras.layers.GlobalAveragePooling1D()(hidden)  # takes Embedding(mask_zero=True)'s mask
    return keras_adascale.AdaScaleModel(inputs, keras.layers.Dense(3)(hidden), groups=groups, group_norms=method)


LAYERS = {
    "embedding_scatter": (lambda i: keras.layers.Embedding(11, 5)(i), True),  # groups x 11 <= the rows
    "embedding_sorted_masked": (lambda i: keras.layers.Embedding(60, 5, mask_zero=True)(i), True),  # 4 x 60 > rows
    "einsum_matmul": (lambda i: keras.layers.EinsumDense("abc,cde->abde", (6, 2, 3), bias_axes="de",
                                                         activation="tanh")(i), False),
    "einsum_general": (lambda i: keras.layers.EinsumDense("abc,bcd->abd", (6, 3), bias_axes="d",
                                                          activation="relu")(i), False),
    "layer_norm": (lambda i: keras.layers.LayerNormalization()(keras.layers.Dense(5)(i)), False),
    "layer_norm_two_axes": (lambda i: keras.layers.LayerNormalization(axis=(1, 2), center=False)(
        keras.layers.Dense(5)(i)), False),
    "batch_norm": (lambda i: keras.layers.BatchNormalization()(keras.layers.Dense(5)(i)), False),
    "batch_norm_axis_1": (lambda i: keras.layers.BatchNormalization(axis=1, center=False)(
        keras.layers.Dense(5)(i)), False),
    "batch_norm_no_weights": (lambda i: keras.layers.BatchNormalization(center=False, scale=False)(
        keras.layers.Dense(5)(i)), False),
    "conv1d": (lambda i: keras.layers.Conv1D(3, 2, dilation_rate=2, padding="same", activation="tanh")(i), False),
    "conv2d": (lambda i: keras.layers.Reshape((-1, 3))(keras.layers.Conv2D(3, (3, 2), strides=(2, 1))(
        keras.layers.Reshape((6, 4, 1))(i))), False),
    "conv2d_channels_first": (lambda i: keras.layers.Reshape((-1, 2))(keras.layers.Conv2D(
        2, 2, padding="same", data_format="channels_first")(keras.layers.Reshape((1, 6, 4))(i))), False),
}


def _rows(ids, count, seed=5):
    rng = np.random.default_rng(seed)
    if ids:
        return rng.integers(0, 11, size=(count, 6)).astype("int32")
    return rng.normal(size=(count, 6, 4)).astype("float32")


@jax_only
@pytest.mark.parametrize("name", list(LAYERS))
def test_one_pass_norms_of_each_new_layer_equal_each_group_s_own_gradient_by_brute_force(name):
    """Per weight and per group: n^2 x a probe's cotangent (the rules' |part of the batch's mean gradient from the
    group's rows|^2) against |gradient of the group's own mean loss|^2 from `jax.grad` of the model called on
    that group's rows alone (a Python loop over the groups: no vmap, no rule); and the one-pass mean gradient
    against the mean of those groups' gradients. For BatchNormalization the group's gradient is defined by that
    call: the group normalized by its own rows' statistics."""
    import jax
    import jax.numpy as jnp

    from keras_adascale.backend.jax import group_norms

    body, ids = LAYERS[name]
    groups, rows = 4, 8
    model = _sequence_model(body, groups, ids=ids)
    x = _rows(ids, groups * rows)
    if name == "embedding_sorted_masked":
        x[::3, 2:] = 0  # padded rows (the mask), and ids repeated within and across the groups
    y = np.random.default_rng(6).normal(size=(len(x), 3)).astype("float32")
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(values, x, y):
        predictions, _ = model.stateless_call(values, non_trainable, x, training=True)
        return jnp.mean(jnp.square(predictions - y))

    def one_pass(values, probes, x, y):
        with group_norms.measuring(model, probes, groups):
            return loss(values, x, y)

    layers = group_norms.covered_layers(model)
    assert {type(layer) for layer in layers} >= {type(layer) for layer in model.layers if type(layer) in
                                                 group_norms._MORE}
    grads, measured = jax.jit(jax.grad(one_pass, argnums=(0, 1)))(trainable, group_norms.probes(model, groups), x, y)
    brute = [jax.jit(jax.grad(loss))(trainable, x[g * rows:(g + 1) * rows], y[g * rows:(g + 1) * rows])
             for g in range(groups)]
    index = {id(v): i for i, v in enumerate(model.trainable_variables)}
    checked = 0
    for layer, pair in zip(layers, measured, strict=True):
        if isinstance(layer, keras.layers.Embedding):
            weights = (layer.embeddings, None)
        elif isinstance(layer, (keras.layers.LayerNormalization, keras.layers.BatchNormalization)):
            weights = (layer.gamma, layer.beta)
        else:
            weights = (layer.kernel, layer.bias)
        for weight, cotangent in zip(weights, pair, strict=True):
            cotangent = np.asarray(cotangent)
            if weight is None:
                np.testing.assert_array_equal(cotangent, 0.0)
                continue
            expected = [float(np.sum(np.square(np.asarray(b[index[id(weight)]], np.float64)))) for b in brute]
            np.testing.assert_allclose(groups * groups * cotangent, expected, rtol=2e-5, atol=1e-9,
                                       err_msg=weight.path)
            assert min(expected) > 0.0
            checked += 1
    assert checked == len(model.trainable_variables)
    for got, *each in zip(grads, *brute, strict=True):
        np.testing.assert_allclose(got, np.mean(each, axis=0), rtol=2e-5, atol=1e-7)


def _mixed_body(inputs):
    """Every layer the one-pass rules cover but Conv, in one model."""
    hidden = keras.layers.Embedding(11, 8)(inputs)
    hidden = keras.layers.EinsumDense("abc,cd->abd", (6, 8), bias_axes="d", activation="relu")(hidden)
    hidden = keras.layers.LayerNormalization()(hidden)
    hidden = keras.layers.EinsumDense("abc,bcd->abd", (6, 4), bias_axes="d")(hidden)
    return keras.layers.BatchNormalization()(hidden)


def _mixed_history(model, x, y, batch_size, optimizer):
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    recorder = AllWeights()
    model.fit(x, y, batch_size=batch_size, shuffle=False, callbacks=[recorder], verbose=0)
    return recorder.history, model


@jax_only
def test_one_pass_norms_of_embedding_einsum_and_normalizations_equal_vmap_and_accumulation():
    """A model of Embedding, EinsumDense (a matmul and a general einsum), LayerNormalization and
    BatchNormalization: one_pass equals vmap (every weight, BatchNormalization's moving statistics too, gain and
    tau) update by update; and both equal gradient accumulation over the same rows (trainable weights, gain and
    tau: accumulation moves the moving statistics at every micro-batch)."""
    groups, rows, updates = 4, 8, 4
    x = _rows(True, updates * groups * rows)
    y = x[:, 0] % 3  # learnable: the gain is below its cap S (random labels give S, which would test no norm)
    histories = {}
    for method in ("one_pass", "vmap"):
        keras.utils.set_random_seed(2)
        histories[method], model = _mixed_history(_sequence_model(_mixed_body, groups, method, ids=True), x, y,
                                                  groups * rows, keras_adascale.AdaScaleSGD(0.1, momentum=0.9))
    assert len(histories["one_pass"]) == len(histories["vmap"]) == updates
    for (w1, g1, t1), (w2, g2, t2) in zip(histories["one_pass"], histories["vmap"], strict=True):
        np.testing.assert_allclose(w1, w2, rtol=1e-4, atol=1e-6)
        assert g1 == pytest.approx(g2, rel=1e-4) and t1 == pytest.approx(t2, rel=1e-4)
    assert 1.0 < histories["one_pass"][0][1] < groups - 0.1
    keras.utils.set_random_seed(2)
    plain = _sequence_model(_mixed_body, 1, ids=True)
    trainable = np.concatenate([np.ravel(w) for w in plain.get_weights()]).size
    accumulated, _ = _mixed_history(keras.Model(plain.inputs, plain.outputs), x, y, rows,
                                    keras_adascale.AdaScaleSGD(0.1, momentum=0.9, gradient_accumulation_steps=groups))
    accumulated = accumulated[groups - 1::groups]  # after each update
    is_trainable = np.concatenate([np.full(np.size(v), v.trainable) for v in model.weights])
    assert trainable == is_trainable.size and 0 < is_trainable.sum() < is_trainable.size
    for (w1, g1, t1), (w2, g2, t2) in zip(histories["one_pass"], accumulated, strict=True):
        np.testing.assert_allclose(w1[is_trainable], w2[is_trainable], rtol=1e-4, atol=1e-6)
        assert g1 == pytest.approx(g2, rel=1e-4) and t1 == pytest.approx(t2, rel=1e-4)


@jax_only
def test_one_pass_norms_under_mixed_bfloat16_match_vmap_and_float32():
    """Under keras.mixed_precision "mixed_bfloat16" (float32 weights, bfloat16 layers' computations): the rules
    sum the groups' norms in float32; the gain of one_pass is vmap's (which squares bfloat16 per-group gradients)
    and float32's within 1%. ("mixed_float16" wraps the optimizer in Keras's LossScaleOptimizer at compile,
    which groups refuse for now.)"""
    groups, rows, updates = 4, 8, 2
    x = _rows(True, updates * groups * rows)
    y = x[:, 0] % 3
    gains = {}
    for policy, method in (("float32", "one_pass"), ("mixed_bfloat16", "one_pass"), ("mixed_bfloat16", "vmap")):
        keras.mixed_precision.set_dtype_policy(policy)
        try:
            keras.utils.set_random_seed(2)
            history, model = _mixed_history(_sequence_model(_mixed_body, groups, method, ids=True), x, y,
                                            groups * rows, keras_adascale.AdaScaleSGD(0.1, momentum=0.9))
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
        assert model.layers[2].compute_dtype == ("bfloat16" if policy != "float32" else "float32")
        gains[policy, method] = [gain for _, gain, _ in history]
    assert 1.0 < gains["float32", "one_pass"][0] < groups - 0.1
    np.testing.assert_allclose(gains["mixed_bfloat16", "one_pass"], gains["mixed_bfloat16", "vmap"], rtol=1e-2)
    np.testing.assert_allclose(gains["mixed_bfloat16", "one_pass"], gains["float32", "one_pass"], rtol=1e-2)


# (group_rules.PATCHES_RATIO, group_rules.UNROLLED_GROUPS) that make the rule pick the form: patches, the
# transposed convolution group by group (unrolled), or in one vmap over the groups (above UNROLLED_GROUPS).
CONV_FORMS = {"patches": (1e9, 32), "transposed": (0.0, 32), "transposed_in_one_vmap": (0.0, 1)}


def _force(form, monkeypatch):
    from keras_adascale.backend.jax import group_rules

    ratio, unrolled = CONV_FORMS[form]
    monkeypatch.setattr(group_rules, "PATCHES_RATIO", ratio)
    monkeypatch.setattr(group_rules, "UNROLLED_GROUPS", unrolled)


@jax_only
@pytest.mark.parametrize("form", list(CONV_FORMS))
@pytest.mark.parametrize("name", ["conv1d", "conv2d", "conv2d_channels_first"])
def test_both_forms_of_the_conv_rule_equal_each_group_s_own_gradient_by_brute_force(name, form, monkeypatch):
    """Conv's rule takes the groups' kernel gradients from the input's patches or by transposed convolutions
    (one by one, or in one vmap above `UNROLLED_GROUPS`), as the patches' size decides
    (`group_rules._convolution_form`): each form against `jax.grad` per group."""
    from keras_adascale.backend.jax import group_rules

    _force(form, monkeypatch)
    assert group_rules._convolution_form((8, 6, 4), (8, 6, 3), (2, 4, 3), ((1,), "SAME", (1,), True)) == \
        form.partition("_")[0]
    test_one_pass_norms_of_each_new_layer_equal_each_group_s_own_gradient_by_brute_force(name)


@jax_only
@pytest.mark.parametrize("form", list(CONV_FORMS))
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_both_forms_of_the_conv_rule_train_as_vmap_does(data_format, form, monkeypatch):
    """`cnn`'s Conv2D and Conv1D with the rule's form forced: the same gain, tau and weights as jax.vmap's."""
    _force(form, monkeypatch)
    one_pass, vmapped = cnn_history(4, "one_pass", data_format), cnn_history(4, "vmap", data_format)
    assert len(one_pass) == len(vmapped) == 4
    for (w1, g1, t1), (w2, g2, t2) in zip(one_pass, vmapped, strict=True):
        np.testing.assert_allclose(w1, w2, rtol=1e-4, atol=1e-6)
        assert g1 == pytest.approx(g2, rel=1e-4) and t1 == pytest.approx(t2, rel=1e-4)


@jax_only
def test_the_conv_rule_takes_patches_where_they_are_small_and_transposes_where_they_are_not():
    """The size rule (`group_rules.PATCHES_RATIO`, 1): the small CNN's first convolution (over 1 channel) takes
    patches; its second (32 into 64), ResNet-20's 3 x 3 of 16 channels into 16, its first layer (3 into 16), a
    7 x 7 first layer at stride 2, and 7 x 7 over 512 into 16 transpose; no geometry (EinsumDense, causal
    padding) transposes."""
    from keras_adascale.backend.jax import group_rules

    geometry = ((1, 1), "VALID", (1, 1), True)
    same = ((1, 1), "SAME", (1, 1), True)
    form = group_rules._convolution_form
    assert form((256, 28, 28, 1), (256, 26, 26, 32), (3, 3, 1, 32), geometry) == "patches"
    assert form((256, 13, 13, 32), (256, 11, 11, 64), (3, 3, 32, 64), geometry) == "transposed"
    assert form((32, 32, 32, 16), (32, 32, 32, 16), (3, 3, 16, 16), same) == "transposed"
    assert form((32, 32, 32, 3), (32, 32, 32, 16), (3, 3, 3, 16), same) == "transposed"
    assert form((8, 224, 224, 3), (8, 112, 112, 64), (7, 7, 3, 64), ((2, 2), "SAME", (1, 1), True)) == "transposed"
    assert form((8, 14, 14, 512), (8, 8, 8, 16), (7, 7, 512, 16), geometry) == "transposed"
    assert form((256, 28, 28, 1), (256, 26, 26, 32), (3, 3, 1, 32), None) == "transposed"

    class OwnConvolution(keras.layers.Conv2D):
        def convolution_op(self, inputs, kernel):
            return super().convolution_op(inputs, kernel)

    settings = group_rules.convolution_geometry  # a layer's geometry where patches may be taken, else None
    assert settings(keras.layers.Conv2D(4, 3)) == ((1, 1), "VALID", (1, 1), True)
    assert settings(keras.layers.Conv1D(4, 3, strides=2, padding="same", data_format="channels_first")) == (
        (2,), "SAME", (1,), False)
    assert settings(keras.layers.Conv1D(4, 3, padding="causal")) is None
    assert settings(keras.layers.Conv2D(4, 3, groups=2)) is None
    assert settings(OwnConvolution(4, 3)) is None


@jax_only
def test_autoscale_changes_the_count_over_groups_and_matches_the_reference(problem, capsys):
    # AutoScale changes k; each update holds groups x k samples (N = 2k, S = N), the reference update by update.
    optimizer = keras_adascale.AdaScaleSGD(0.01, momentum=0.9, gradient_accumulation_steps=1)
    model = model_of(problem, 2)
    model.compile(optimizer=optimizer, loss="mse")
    callback = keras_adascale.AutoScale(interval=0, warmup=0, update_cost=64.0, max_steps=8)  # prints (the default)
    recorder = UpdateRecorder()  # after AutoScale: it reads the S that AutoScale set for the next update
    model.fit(problem.x, problem.y, batch_size=2 * BATCH, shuffle=False, epochs=1, verbose=0,
              callbacks=[callback, recorder])
    assert callback.changes and optimizer.accumulation_steps == callback.changes[-1]["steps"] != 1
    assert optimizer.samples_per_update == 2 * optimizer.accumulation_steps
    first = callback.changes[0]["steps"]
    assert f"k 1 -> {first}, S = {2 * first}." in capsys.readouterr().out  # S counts the groups
    assert [scale for _, _, scale in recorder.updates] == [2 * (stop - first) for first, stop, _ in recorder.updates]
    assert len({scale for _, _, scale in recorder.updates}) > 1 and len(recorder.updates) > 4
    reference = AdaScaleReference(problem.initial, 0.01, scale=2, momentum=0.9)
    assert_same_history(recorder.history, replay_reference(problem, recorder.updates, reference, samples_per_batch=2))


def _regularized_body(inputs):
    """Covered layers with weight regularizers (kernel, bias, embeddings, gamma, beta)."""
    hidden = keras.layers.Embedding(11, 8, embeddings_regularizer=keras.regularizers.L2(0.05))(inputs)
    hidden = keras.layers.Dense(8, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.2),
                                bias_regularizer=keras.regularizers.L1(0.05))(hidden)
    return keras.layers.LayerNormalization(gamma_regularizer=keras.regularizers.L2(0.1),
                                           beta_regularizer=keras.regularizers.L1L2(0.02, 0.02))(hidden)


@jax_only
def test_one_pass_norms_add_the_weights_regularizers_back(monkeypatch):
    """Weight regularizers (Embedding, Dense, LayerNormalization): their gradient is in every group's gradient and
    passes through no layer's output; one_pass adds it back in closed form and equals vmap (each group's whole
    gradient) and gradient accumulation over the same rows, update by update. Without the terms added back the
    gains would differ by more than 1% (the test can fail)."""
    from keras_adascale.backend.jax import group_norms

    groups, rows, updates = 4, 8, 3
    x = _rows(True, updates * groups * rows)
    y = x[:, 0] % 3
    histories = {}
    for method in ("one_pass", "vmap", "accumulation", "dropped"):
        keras.utils.set_random_seed(2)
        if method == "accumulation":
            inputs = keras.Input((6,), dtype="int32")
            hidden = keras.layers.GlobalAveragePooling1D()(_regularized_body(inputs))
            model, batch = keras.Model(inputs, keras.layers.Dense(3)(hidden)), rows
            optimizer = keras_adascale.AdaScaleSGD(0.1, momentum=0.9, gradient_accumulation_steps=groups)
        else:
            model, batch = _sequence_model(_regularized_body, groups, "vmap" if method == "vmap" else "one_pass",
                                           ids=True), groups * rows
            optimizer = keras_adascale.AdaScaleSGD(0.1, momentum=0.9)
        with monkeypatch.context() as patched:
            if method == "dropped":
                patched.setattr(group_norms, "regularization_terms", lambda *args: 0.0)
            history, _ = _mixed_history(model, x, y, batch, optimizer)
        histories[method] = history[groups - 1::groups] if method == "accumulation" else history
    assert len(model.losses) == 5  # five regularized weights, each a loss Keras adds
    for other in ("vmap", "accumulation"):
        assert len(histories["one_pass"]) == len(histories[other]) == updates
        for (w1, g1, t1), (w2, g2, t2) in zip(histories["one_pass"], histories[other], strict=True):
            np.testing.assert_allclose(w1, w2, rtol=1e-4, atol=1e-6)
            assert g1 == pytest.approx(g2, rel=1e-4) and t1 == pytest.approx(t2, rel=1e-4)
    assert 1.0 < histories["one_pass"][-1][1] < groups - 0.1
    dropped = [gain for _, gain, _ in histories["dropped"]]
    assert abs(dropped[-1] / histories["one_pass"][-1][1] - 1.0) > 0.01


@jax_only
@METHODS
def test_groups_under_a_loss_scale_optimizer_match_the_reference(problem, method):
    """Keras's LossScaleOptimizer around AdaScaleSGD, a float32 model: the groups' norms are of gradients scaled by
    the dynamic scale (2^15, exact in float32) and divided by it squared, so every update is the reference's."""
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9)
    wrapped = keras.optimizers.LossScaleOptimizer(optimizer)
    history = fit(model_of(problem, 4, group_norms=method), problem, wrapped, 4 * BATCH, 1, UPDATES)
    assert float(wrapped.dynamic_scale) == 2.0 ** 15 and optimizer.samples_per_update == 4
    _, expected = reference_history(problem, 4, UPDATES, learning_rate=0.05, momentum=0.9)
    assert_same_history(history, expected)


@jax_only
def test_groups_under_mixed_float16_match_vmap_accumulation_and_float32():
    """The "mixed_float16" policy: Keras's compile wraps the optimizer in a LossScaleOptimizer (the loss scaled by
    2^15); a Conv1D, Dense and LayerNormalization model in float16. By default one_pass's gain and tau are
    float32's within 1% (and no step overflows: its scale stays 2^15). With a scale of 2^8 (at 2^15 a group's
    gradient, n times its part of the mean's, overflows float16 in vmap's and accumulation's first step, which
    the LossScaleOptimizer skips), one_pass's gain and tau are vmap's and gradient accumulation's (Keras's own
    step) within 1%, and its weights within float16's precision."""
    groups, rows, updates = 4, 8, 3
    x = _rows(False, updates * groups * rows)
    y = (x[:, 0, 0] > 0).astype("int32") + (x[:, 1, 1] > 0).astype("int32")

    def body(inputs):
        hidden = keras.layers.Conv1D(6, 3, activation="relu")(inputs)
        return keras.layers.LayerNormalization()(keras.layers.Dense(5, activation="tanh")(hidden))

    histories, scales = {}, {}
    for policy, method, scale in (("float32", "one_pass", None), ("mixed_float16", "one_pass", None),
                                  ("mixed_float16", "one_pass", 2 ** 8), ("mixed_float16", "vmap", 2 ** 8),
                                  ("mixed_float16", "accumulation", 2 ** 8)):
        keras.mixed_precision.set_dtype_policy(policy)
        try:
            keras.utils.set_random_seed(2)
            if method == "accumulation":
                inputs = keras.Input((6, 4))
                hidden = keras.layers.GlobalAveragePooling1D()(body(inputs))
                model, batch = keras.Model(inputs, keras.layers.Dense(3)(hidden)), rows
                optimizer = keras_adascale.AdaScaleSGD(0.1, momentum=0.9, gradient_accumulation_steps=groups)
            else:
                model, batch = _sequence_model(body, groups, method), groups * rows
                optimizer = keras_adascale.AdaScaleSGD(0.1, momentum=0.9)
            if scale is not None:
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=scale)
            history, model = _mixed_history(model, x, y, batch, optimizer)
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (policy == "mixed_float16")
        histories[policy, method, scale] = history[groups - 1::groups] if method == "accumulation" else history
        scales[policy, method, scale] = float(getattr(model.optimizer, "dynamic_scale", 1.0))
        assert len(histories[policy, method, scale]) == updates
    assert scales["mixed_float16", "one_pass", None] == 2.0 ** 15
    assert 1.0 < histories["float32", "one_pass", None][0][1] < groups - 0.1

    def assert_close(first, second, weights):
        for (w1, g1, t1), (w2, g2, t2) in zip(histories[first], histories[second], strict=True):
            assert g1 == pytest.approx(g2, rel=1e-2) and t1 == pytest.approx(t2, rel=1e-2)
            if weights:
                np.testing.assert_allclose(w1, w2, rtol=2e-2, atol=2e-3)

    assert_close(("mixed_float16", "one_pass", None), ("float32", "one_pass", None), weights=False)
    for other in ("vmap", "accumulation"):
        assert scales["mixed_float16", other, 2 ** 8] == 2.0 ** 8  # no step skipped
        assert_close(("mixed_float16", "one_pass", 2 ** 8), ("mixed_float16", other, 2 ** 8), weights=True)
