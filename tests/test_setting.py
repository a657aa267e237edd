"""The scale setting (keras_adascale/setting.py): one state machine for S and k, read the same way eagerly and in
the compiled step, and the review's bugs (issue 29, section 2), each with the case that showed it."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_adascale
from keras_adascale import setting
from reference import AdaScaleReference


def applier(optimizer, dim=1):
    """A variable of `dim` zeros and a traced one-micro-batch apply of a constant gradient to it."""
    variable = keras.Variable(np.zeros(dim, np.float32))
    optimizer.build([variable])

    @tf.function
    def apply(gradient):
        optimizer.apply_gradients([(gradient, variable)])

    return variable, lambda value: apply(tf.constant(np.broadcast_to(value, (dim,)), tf.float32))


class Float32Statistics(keras_adascale.AdaScaleSGD):
    """AdaScaleSGD with the statistics dtype a TPUStrategy gives it (float32), on the CPU."""

    def _choose_statistics_dtype(self):
        return tf.float32


# --- one rule, two readers -------------------------------------------------------------------------------------

stored = st.tuples(
    st.lists(st.integers(0, 40), min_size=6, max_size=6),
    st.lists(st.floats(1.0, 64.0, allow_nan=False, width=32), min_size=3, max_size=3),
    st.sampled_from([np.float32, np.float64]),
    st.tuples(st.integers(0, 8), st.integers(1, 8), st.sampled_from([0.0, 1.1, 2.5, 3.0, 6.0])),
    st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(stored)
def test_the_eager_and_the_compiled_reader_agree_on_any_stored_values(values):
    counters, scales, dtype, (steps, replicas, scale), same_configuration = values
    configuration = setting.Configuration(steps, replicas, scale)
    counters, scales = np.asarray(counters, np.int64), np.asarray(scales, dtype)
    if same_configuration:  # as written by this configuration (the configured scale stored in `dtype`)
        counters[4:6] = [steps, replicas]
        scales[2] = dtype(scale)
    numbers, numbers_same = setting.resolve(counters, scales, configuration, setting.NUMBERS)
    tensors, tensors_same = setting.resolve(tf.constant(counters), tf.constant(scales), configuration,
                                            setting.TENSORS)
    assert numbers_same == bool(tensors_same)
    if same_configuration:
        assert numbers_same
    for name in setting.ScaleSetting._fields:
        assert np.asarray(getattr(numbers, name)) == np.asarray(getattr(tensors, name)), name


# --- a. set_scale checks the count the next update will use ------------------------------------------------------

def test_set_scale_is_checked_against_a_pending_count():
    optimizer = keras_adascale.AdaScaleSGD(1.0, gradient_accumulation_steps=2)
    _, apply = applier(optimizer)
    apply(1.0)  # one micro-batch of two
    optimizer.set_accumulation_steps(1)  # pending: the next update sees one sample
    with pytest.raises(ValueError, match="one gradient sample per update"):
        optimizer.set_scale(4)
    apply(1.0)  # the update completes; now between updates, the same request is refused the same way
    assert optimizer.accumulation_steps == 1
    with pytest.raises(ValueError, match="one gradient sample per update"):
        optimizer.set_scale(4)


def test_set_scale_in_the_middle_of_an_update_starts_with_the_next_update():
    # The update in progress keeps S = 2 (N = 2); the next one has S = 5 with its N = 2.
    optimizer = keras_adascale.AdaScaleSGD(0.1, gradient_accumulation_steps=2)
    reference = AdaScaleReference(np.zeros(3), 0.1, scale=2)
    variable, apply = applier(optimizer, dim=3)
    rng = np.random.RandomState(3)
    first, second = rng.randn(2, 3), rng.randn(2, 3)
    apply(first[0])
    optimizer.set_scale(5)
    assert optimizer.scale == 5 and optimizer.accumulation_steps == 2
    apply(first[1])
    reference.step(first)
    reference.scale = 5
    for sample in second:
        apply(sample)
    reference.step(second)
    np.testing.assert_allclose(variable.numpy(), reference.params, rtol=2e-5, atol=1e-6)
    assert float(optimizer.gain) == pytest.approx(reference.gain, rel=1e-5)


# --- b. float32 statistics: the eager view is the compiled step's --------------------------------------------------

def test_with_float32_statistics_the_eager_view_follows_a_change():
    optimizer = Float32Statistics(0.1, scale=1.1, gradient_accumulation_steps=2)
    assert optimizer._statistics_dtype == tf.float32
    reference = AdaScaleReference(np.zeros(3), 0.1, scale=float(np.float32(1.1) * 4 / 2))
    variable, apply = applier(optimizer, dim=3)
    optimizer.set_accumulation_steps(4)
    assert optimizer.accumulation_steps == 4 and optimizer.gradient_accumulation_steps == 4
    assert optimizer.scale == pytest.approx(2.2, rel=1e-6)
    samples = np.random.RandomState(4).randn(4, 3)
    for sample in samples:
        apply(sample)
    reference.step(samples)
    assert int(optimizer.iterations) == 1  # one update of four micro-batches, as the eager view said
    assert float(optimizer.gain) == pytest.approx(reference.gain, rel=1e-5)
    np.testing.assert_allclose(variable.numpy(), reference.params, rtol=2e-5, atol=1e-6)
    snapshot = optimizer.snapshot()
    assert snapshot["accumulation_steps"] == 4 and snapshot["scale"] == pytest.approx(2.2, rel=1e-6)


# --- c. a restore into another configuration: one mean-gradient step after it ---------------------------------------

def saved_after(micro_batches, **kwargs):
    """An SGD(lr 1) AdaScale optimizer after `micro_batches` gradients of 1.0, and its checkpoint."""
    optimizer = keras_adascale.AdaScaleSGD(1.0, **kwargs)
    variable, apply = applier(optimizer)
    for _ in range(micro_batches):
        apply(1.0)
    checkpoint = tf.train.Checkpoint(variable=variable, optimizer=optimizer)
    return optimizer, variable, checkpoint


def restored(path, **kwargs):
    optimizer = keras_adascale.AdaScaleSGD(1.0, **kwargs)
    variable, apply = applier(optimizer)
    tf.train.Checkpoint(variable=variable, optimizer=optimizer).restore(path).expect_partial()
    return optimizer, variable, apply


@pytest.mark.parametrize("steps", [2, 1, 8])
def test_a_restore_into_another_count_keeps_the_partial_update_and_steps_by_the_mean(tmp_path, steps):
    # Saved after 2 updates of 4 and 3 micro-batches of a third, all gradients 1.0 (gain 1, lr 1: a step of -1).
    saved, _, checkpoint = saved_after(11, gradient_accumulation_steps=4)
    tau, variance = float(saved.scale_invariant_iterations), float(saved.gradient_variance)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    optimizer, variable, apply = restored(path, gradient_accumulation_steps=steps)
    assert float(variable.numpy()[0]) == -2.0 and int(optimizer.iterations) == 2
    assert float(optimizer.scale_invariant_iterations) == tau and float(optimizer.gradient_variance) == variance
    # The update in progress holds 3 micro-batches: it completes at the first micro-step that gives it >= k.
    micro_steps = max(steps - 3, 1)
    for _ in range(micro_steps - 1):
        apply(1.0)
        assert float(variable.numpy()[0]) == -2.0
    apply(1.0)
    assert float(variable.numpy()[0]) == pytest.approx(-3.0, abs=1e-6)  # one mean-gradient step
    assert int(optimizer.iterations) == 3
    assert optimizer.accumulation_steps == steps and optimizer.scale == steps
    for _ in range(steps):  # then updates of k micro-batches
        apply(1.0)
    assert float(variable.numpy()[0]) == pytest.approx(-4.0, abs=1e-6) and int(optimizer.iterations) == 4


def test_a_restore_from_a_run_without_accumulation_goes_on_counting_updates(tmp_path):
    with pytest.warns(UserWarning, match="scale S = 1"):
        _, _, checkpoint = saved_after(3)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    optimizer, variable, apply = restored(path, gradient_accumulation_steps=2)
    assert int(optimizer.iterations) == 3 and float(variable.numpy()[0]) == -3.0
    apply(1.0)
    assert float(variable.numpy()[0]) == -3.0 and int(optimizer.iterations) == 3  # half an update
    apply(1.0)
    assert float(variable.numpy()[0]) == pytest.approx(-4.0, abs=1e-6) and int(optimizer.iterations) == 4


def test_a_restore_into_the_same_configuration_resumes_the_update_in_progress(tmp_path):
    saved, _, checkpoint = saved_after(3, gradient_accumulation_steps=4)
    saved.set_accumulation_steps(6)  # pending, for the next update
    path = checkpoint.save(str(tmp_path / "ckpt"))
    optimizer, variable, apply = restored(path, gradient_accumulation_steps=4)
    assert optimizer.accumulation_steps == 6 and optimizer.scale == 6
    apply(1.0)  # the fourth of four
    assert float(variable.numpy()[0]) == pytest.approx(-1.0, abs=1e-6) and int(optimizer.iterations) == 1
    for _ in range(5):
        apply(1.0)
    assert int(optimizer.iterations) == 1  # five of six
    apply(1.0)
    assert int(optimizer.iterations) == 2


# --- d. the snapshot's S and k are one update's --------------------------------------------------------------------

def test_the_snapshot_in_the_middle_of_an_update_describes_the_next_update():
    optimizer = keras_adascale.AdaScaleSGD(0.1, gradient_accumulation_steps=2)
    _, apply = applier(optimizer, dim=3)
    rng = np.random.RandomState(5)
    for sample in rng.randn(4, 3):
        apply(sample)
    apply(rng.randn(3))  # one micro-batch of the third update
    optimizer.set_accumulation_steps(4)
    snapshot = optimizer.snapshot()
    assert (snapshot["accumulation_steps"], snapshot["scale"]) == (4, 4)
    assert snapshot["scaling_efficiency"] == pytest.approx(float(optimizer.predicted_gain(4)) / 4, rel=1e-12)


# --- e. Keras's attribute and the count in effect cannot disagree --------------------------------------------------

def test_gradient_accumulation_steps_is_the_count_in_effect_and_the_config_keeps_the_configured_one():
    optimizer = keras_adascale.AdaScaleSGD(0.1, gradient_accumulation_steps=2)
    _, apply = applier(optimizer)
    optimizer.set_accumulation_steps(3)
    assert optimizer.gradient_accumulation_steps == optimizer.accumulation_steps == 3
    assert optimizer.get_config()["gradient_accumulation_steps"] == 2
    apply(1.0)
    optimizer.set_accumulation_steps(5)  # pending
    assert optimizer.gradient_accumulation_steps == optimizer.accumulation_steps == 5
    assert keras_adascale.AdaScaleSGD(0.1).gradient_accumulation_steps is None


# --- a 0.2.0 checkpoint: S of the update in progress and the configured S only -----------------------------------

def stored_as_0_2_0(optimizer):
    """The optimizer's variables as Keras's store holds them, the setting in 0.2.0's layout (and, as in 0.2.0
    and 0.3.0, no count of what entered the accumulators)."""
    count = getattr(optimizer, "_sample_count_accumulator", None)
    kept = [variable for variable in optimizer.variables if variable is not count]
    store = {str(index): np.array(variable.numpy()) for index, variable in enumerate(kept)}
    scales_key = str(next(i for i, v in enumerate(kept) if v is optimizer._setting_scales))
    scale, _, configured = store[scales_key]
    store[scales_key] = np.asarray([scale, configured], store[scales_key].dtype)
    return store


def test_a_0_2_0_checkpoint_loads_with_its_s_and_k():
    saved = keras_adascale.AdaScaleSGD(1.0, gradient_accumulation_steps=2)
    _, apply = applier(saved)
    for _ in range(4):
        apply(1.0)
    saved.set_accumulation_steps(3)
    restored = keras_adascale.AdaScaleSGD(1.0, gradient_accumulation_steps=2)
    variable, apply = applier(restored)
    restored.load_own_variables(stored_as_0_2_0(saved))
    assert (restored.accumulation_steps, restored.scale, int(restored.iterations)) == (3, 3, 2)
    for _ in range(3):
        apply(1.0)
    assert int(restored.iterations) == 3 and float(variable.numpy()[0]) == pytest.approx(-1.0, abs=1e-6)


def test_a_0_2_0_checkpoint_without_accumulation_gets_its_update_count():
    with pytest.warns(UserWarning, match="scale S = 1"):
        saved = keras_adascale.AdaScaleSGD(1.0)
        _, apply = applier(saved)
    for _ in range(3):
        apply(1.0)
    store = stored_as_0_2_0(saved)
    counters_key = str(next(i for i, v in enumerate(saved.variables) if v is saved._setting_counters))
    store[counters_key][2:4] = 0  # 0.2.0 never wrote the update count without accumulation
    with pytest.warns(UserWarning, match="scale S = 1"):
        restored = keras_adascale.AdaScaleSGD(1.0)
        applier(restored)
    restored.load_own_variables(store)
    assert restored._setting_numbers().updates == 3 == int(restored.iterations)


def test_a_0_2_0_checkpoint_saved_with_a_pending_count_takes_the_s_0_2_0_would_have_used():
    # 0.2.0 kept S of the update in progress, and made the next update's S = S x next k / k when it completed.
    saved = keras_adascale.AdaScaleSGD(1.0, gradient_accumulation_steps=2)
    _, apply = applier(saved)
    apply(1.0)  # one micro-batch of two
    saved.set_accumulation_steps(4)  # pending
    store = stored_as_0_2_0(saved)
    scales_key = str(next(i for i, v in enumerate(saved.variables) if v is saved._setting_scales))
    np.testing.assert_array_equal(store[scales_key], [2.0, 0.0])  # as 0.2.0 stored it: S = 2 in progress
    restored = keras_adascale.AdaScaleSGD(1.0, gradient_accumulation_steps=2)
    variable, apply = applier(restored)
    restored.load_own_variables(store)
    assert (restored.accumulation_steps, restored.scale) == (4, 4)
    apply(1.0)  # completes the update in progress (k = 2)
    assert int(restored.iterations) == 1 and restored._setting_numbers().scale == 4.0
