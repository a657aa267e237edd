"""S and the accumulation count changed during training (`set_accumulation_steps`, `set_scale`) against the
NumPy reference with a per-update (N, S): eager and compiled, `model.fit` (also XLA), a MirroredStrategy,
AdaScaleAdam; no retrace; the new count and S saved and restored with the optimizer."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adascale
from change_steps import ChangeSteps
from conftest import BATCH, Interrupt, LeastSquares, flat_weights, mirrored
from reference import AdaScaleAdamReference, AdaScaleReference

STEPS = [2, 4, 3, 8, 1, 5]  # k of each update: grows, shrinks, and 1 (N = 1 needs S = 1 or replicas)


def samples_of(update, count, dim=4):
    rng = np.random.RandomState(100 + update)
    return rng.normal(0.5, 1.0, size=(count, dim))


class TracedApplier:
    """One micro-step a call, through a `tf.function` (or eagerly) that counts its traces."""

    def __init__(self, optimizer, dim=4, compiled=True):
        self.variable = keras.Variable(np.zeros(dim, np.float32))
        optimizer.build([self.variable])
        self.traces = 0

        def apply(gradient):
            self.traces += 1
            optimizer.apply_gradients([(gradient, self.variable)])

        self.apply = tf.function(apply) if compiled else apply

    def update(self, sample_list):
        for sample in sample_list:
            self.apply(tf.constant(sample, tf.float32))


def run_changing(optimizer, reference, steps, scales=None, compiled=True):
    """Updates with k = steps[u] micro-batches each (and S = scales[u] via set_scale), beside the reference."""
    applier = TracedApplier(optimizer, compiled=compiled)
    for update, k in enumerate(steps):
        optimizer.set_accumulation_steps(k)
        if scales is not None:
            optimizer.set_scale(scales[update])
        reference.scale = optimizer.scale
        sample_list = samples_of(update, k)
        applier.update(sample_list)
        reference.step(sample_list)
        np.testing.assert_allclose(applier.variable.numpy(), reference.params, rtol=2e-5, atol=1e-6)
        assert float(optimizer.gain) == pytest.approx(reference.gain, rel=1e-5)
        assert float(optimizer.scale_invariant_iterations) == pytest.approx(reference.tau, rel=1e-5)
        assert int(optimizer.iterations) == update + 1
    return applier


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf_function"])
def test_accumulation_changed_between_updates_matches_the_reference(compiled):
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=2)
    reference = AdaScaleReference(np.zeros(4), 0.05, scale=2, momentum=0.9)
    steps = [2, 4, 3, 8, 2, 5]
    applier = run_changing(optimizer, reference, steps, compiled=compiled)
    assert optimizer.scale == 5 and optimizer.samples_per_update == 5 and optimizer.accumulation_steps == 5
    assert optimizer.smoothing == pytest.approx(1 - 5 / 1000)
    assert 1.0 < reference.gain < 5.0  # noisy enough to test the gain
    if compiled:
        assert applier.traces == 1


def test_with_scale_given_s_keeps_its_ratio_to_the_accumulation_steps():
    optimizer = keras_adascale.AdaScaleSGD(0.05, scale=3, gradient_accumulation_steps=2)
    reference = AdaScaleReference(np.zeros(4), 0.05, scale=3)
    run_changing(optimizer, reference, [2, 4, 3, 8])
    assert optimizer.scale == pytest.approx(3 * 8 / 2)


def test_set_scale_alone_changes_s_and_keeps_n():
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=4)
    reference = AdaScaleReference(np.zeros(4), 0.05, scale=4, momentum=0.9)
    run_changing(optimizer, reference, [4, 4, 4, 4], scales=[6, 2.5, 16, 1])
    assert optimizer.samples_per_update == 4 and optimizer.scale == 1


def test_set_scale_without_accumulation_keeps_the_replicas_as_samples():
    with mirrored(2).scope():
        optimizer = keras_adascale.AdaScaleSGD(0.05)
    optimizer.set_scale(5)
    assert optimizer.scale == 5 and optimizer.samples_per_update == 2 and optimizer.accumulation_steps == 1


def test_adam_with_changing_accumulation_matches_the_reference():
    optimizer = keras_adascale.AdaScaleAdam(0.05, weight_decay=0.1, gradient_accumulation_steps=2)
    reference = AdaScaleAdamReference(np.zeros(4), 0.05, scale=2, weight_decay=0.1)
    run_changing(optimizer, reference, [2, 6, 3, 8, 2])


def test_a_change_in_the_middle_of_an_update_waits_for_its_end():
    optimizer = keras_adascale.AdaScaleSGD(0.05, gradient_accumulation_steps=3)
    reference = AdaScaleReference(np.zeros(4), 0.05, scale=3)
    applier = TracedApplier(optimizer)
    first, second = samples_of(0, 3), samples_of(1, 5)
    applier.update(first[:1])
    optimizer.set_accumulation_steps(5)
    # S and k of the next update, one setting (the update in progress keeps k = 3, S = 3: the reference says so).
    assert optimizer.accumulation_steps == 5 and optimizer.scale == 5
    snapshot = optimizer.snapshot()
    assert (snapshot["accumulation_steps"], snapshot["scale"]) == (5, 5)
    applier.update(first[1:])
    reference.step(first)
    assert int(optimizer.iterations) == 1
    assert optimizer.accumulation_steps == 5 and optimizer.scale == 5
    reference.scale = 5
    applier.update(second)
    reference.step(second)
    assert int(optimizer.iterations) == 2
    np.testing.assert_allclose(applier.variable.numpy(), reference.params, rtol=2e-5, atol=1e-6)
    assert float(optimizer.gain) == pytest.approx(reference.gain, rel=1e-5)


def test_two_mirrored_replicas_with_changing_accumulation_match_the_reference():
    strategy = mirrored(2)
    with strategy.scope():
        variable = keras.Variable(np.zeros(4, np.float32))
        optimizer = keras_adascale.AdaScaleSGD(0.1, momentum=0.9, gradient_accumulation_steps=1)
        optimizer.build([variable])
    traces = []

    @tf.function
    def apply(table):
        traces.append(1)

        def replica_fn():
            context = tf.distribute.get_replica_context()
            optimizer.apply_gradients([(table[context.replica_id_in_sync_group], variable)])

        strategy.run(replica_fn)

    reference = AdaScaleReference(np.zeros(4), 0.1, scale=2, momentum=0.9)
    for update, k in enumerate([1, 3, 2, 4]):
        optimizer.set_accumulation_steps(k)
        assert optimizer.samples_per_update == 2 * k and optimizer.scale == 2 * k
        sample_list = samples_of(update, 2 * k)
        for step in range(k):  # replica i's micro-batch `step` is sample 2 * step + i, seen as g / R
            apply(tf.constant(sample_list[2 * step:2 * step + 2] / 2, tf.float32))
        reference.scale = 2 * k
        reference.step(sample_list)
        np.testing.assert_allclose(variable.numpy(), reference.params, rtol=2e-5, atol=1e-6)
        assert float(optimizer.gain) == pytest.approx(reference.gain, rel=1e-5)
    assert len(traces) == 1


def fit_reference(problem, steps, **kwargs):
    """The reference over consecutive rows, update u taking steps[u] batches of BATCH."""
    reference = AdaScaleReference(problem.initial, scale=steps[0], **kwargs)
    row = 0
    for k in steps:
        reference.scale = k
        reference.step([problem.gradient(reference.params, row + i * BATCH, row + (i + 1) * BATCH)
                        for i in range(k)])
        row += k * BATCH
    return reference, row


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_fit_with_a_callback_changing_the_steps_matches_the_reference(jit_compile):
    steps = [2, 2, 4, 4, 3, 8, 2]
    problem = LeastSquares(num_examples=sum(steps) * BATCH, seed=3)
    reference, rows = fit_reference(problem, steps, learning_rate=0.02, momentum=0.9)
    model = problem.model()
    optimizer = keras_adascale.AdaScaleSGD(0.02, momentum=0.9, gradient_accumulation_steps=2)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    plan = {2: 4, 4: 3, 5: 8, 6: 2}
    model.fit(problem.x[:rows], problem.y[:rows], batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=[ChangeSteps(plan)])
    assert int(optimizer.iterations) == len(steps)
    np.testing.assert_allclose(flat_weights(model), reference.params, rtol=2e-5, atol=1e-6)
    assert float(optimizer.scale_invariant_iterations) == pytest.approx(reference.tau, rel=1e-5)


@pytest.mark.parametrize(
    "steps, message",
    [(0, "`steps` must be an integer >= 1"), (2.5, "`steps`"), (True, "`steps`"), ("4", "`steps`")],
)
def test_bad_steps_raise_value_error_naming_the_argument(steps, message):
    optimizer = keras_adascale.AdaScaleSGD(gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match=message):
        optimizer.set_accumulation_steps(steps)


def test_one_sample_per_update_above_scale_one_is_refused():
    optimizer = keras_adascale.AdaScaleSGD(gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="`steps` would give S = 2 with one gradient sample"):
        keras_adascale.AdaScaleSGD(scale=4, gradient_accumulation_steps=2).set_accumulation_steps(1)
    optimizer.set_accumulation_steps(1)  # S = N = 1: plain SGD, allowed
    assert optimizer.scale == 1
    with pytest.raises(ValueError, match="`scale` would give S = 3"):
        optimizer.set_scale(3)


def test_steps_cannot_change_without_accumulation():
    with pytest.raises(ValueError, match="created without gradient accumulation.*gradient_accumulation_steps=k"):
        keras_adascale.AdaScaleSGD(scale=2).set_accumulation_steps(2)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_gradient_accumulation_steps_are_refused(bad):
    with pytest.raises(ValueError, match="`gradient_accumulation_steps` must be an integer >= 1"):
        keras_adascale.AdaScaleSGD(gradient_accumulation_steps=bad)


def test_one_accumulation_step_round_trips_through_get_config():
    optimizer = keras_adascale.AdaScaleSGD(0.1, gradient_accumulation_steps=1)
    restored = keras_adascale.AdaScaleSGD.from_config(optimizer.get_config())
    assert restored.gradient_accumulation_steps == 1 and restored.accumulation_steps == 1


# Saving and resuming a run whose S changed.


STEPS_PLAN = [2, 4, 4, 3, 3, 8]


def rows_for(steps):
    return sum(steps) * BATCH


def test_a_run_whose_s_changed_resumes_bit_exact_from_a_keras_file(tmp_path):
    problem = LeastSquares(num_examples=rows_for(STEPS_PLAN), seed=5)
    first_rows = rows_for(STEPS_PLAN[:3])

    def compiled():
        model = problem.model()
        model.compile(optimizer=keras_adascale.AdaScaleSGD(0.02, momentum=0.9, gradient_accumulation_steps=2),
                      loss="mse")
        return model

    uninterrupted = compiled()
    uninterrupted.fit(problem.x, problem.y, batch_size=BATCH, shuffle=False, verbose=0,
                      callbacks=[ChangeSteps({1: 4, 3: 3, 5: 8})])
    first = compiled()
    first.fit(problem.x[:first_rows], problem.y[:first_rows], batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=[ChangeSteps({1: 4, 3: 3})])
    first.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    assert restored.optimizer.accumulation_steps == 3 and restored.optimizer.scale == 3
    restored.fit(problem.x[first_rows:], problem.y[first_rows:], batch_size=BATCH, shuffle=False, verbose=0,
                 callbacks=[ChangeSteps({5: 8})])
    np.testing.assert_array_equal(flat_weights(restored), flat_weights(uninterrupted))
    for a, b in zip(restored.optimizer.variables, uninterrupted.optimizer.variables, strict=True):
        if a.name != "iteration":  # micro-steps: the resumed fit counts its own from the restored value
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)


def test_a_checkpoint_restores_the_changed_steps_and_scale(tmp_path):
    problem = LeastSquares(num_examples=rows_for([2, 4, 4]), seed=6)
    model = problem.model()
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.02, scale=3, gradient_accumulation_steps=2), loss="mse")
    model.fit(problem.x, problem.y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[ChangeSteps({1: 4})])
    prefix = tf.train.Checkpoint(optimizer=model.optimizer).save(str(tmp_path / "ckpt"))
    resumed = problem.model()
    resumed.compile(optimizer=keras_adascale.AdaScaleSGD(0.02, scale=3, gradient_accumulation_steps=2), loss="mse")
    resumed.optimizer.build(resumed.trainable_variables)
    tf.train.Checkpoint(optimizer=resumed.optimizer).restore(prefix).assert_consumed()
    assert resumed.optimizer.accumulation_steps == 4 and resumed.optimizer.scale == 6
    assert int(resumed.optimizer.iterations) == 3


class GrowEachEpoch(keras.callbacks.Callback):
    """k = 2, 3, 4, ... from epoch to epoch (a policy's change, made at epoch starts)."""

    def on_epoch_begin(self, epoch, logs=None):
        self.model.optimizer.set_accumulation_steps(2 + epoch)


def test_a_run_whose_s_changed_resumes_bit_exact_from_backup_and_restore(tmp_path):
    problem = LeastSquares(num_examples=96, seed=7)

    def train(backup_dir, interrupt=None):
        model = problem.model()
        model.compile(optimizer=keras_adascale.AdaScaleSGD(0.02, momentum=0.9, gradient_accumulation_steps=2),
                      loss="mse")
        callbacks = [keras.callbacks.BackupAndRestore(str(backup_dir)), GrowEachEpoch()]
        model.fit(problem.x, problem.y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0,
                  callbacks=callbacks + ([interrupt] if interrupt else []))
        return model

    expected = train(tmp_path / "uninterrupted")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "preempted", Interrupt(epoch=2, batch=5))
    model = train(tmp_path / "preempted")
    np.testing.assert_array_equal(flat_weights(model), flat_weights(expected))
    for a, b in zip(model.optimizer.variables, expected.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    assert model.optimizer.accumulation_steps == 5
