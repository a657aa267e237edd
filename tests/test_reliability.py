"""Non-finite gradients are skipped (or raise), and the gain survives extreme gradient scales."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adascale
from reference import AdaScaleReference

SCALE = 2


def samples(update):
    rng = np.random.RandomState(update)
    return [rng.randn(4) for _ in range(SCALE)]


def state(optimizer, variable):
    """Everything an update may change, as plain numbers."""
    values = {name: float(getattr(optimizer, name)) for name in
              ("gain", "scale_invariant_iterations", "gradient_variance", "gradient_sqr_norm",
               "effective_learning_rate")}
    values["weights"] = variable.numpy().tolist()
    values["momentum"] = [v.numpy().tolist() for v in optimizer.variables if "momentum" in v.path]
    return values


def accumulating_optimizer(**kwargs):
    variable = keras.Variable(np.zeros(4, np.float32))
    optimizer = keras_adascale.AdaScaleSGD(0.1, momentum=0.9, gradient_accumulation_steps=SCALE, **kwargs)
    optimizer.build([variable])

    @tf.function
    def apply(gradient):
        optimizer.apply_gradients([(gradient, variable)])

    def update(sample_list):
        for sample in sample_list:
            apply(tf.constant(sample, tf.float32))

    return optimizer, variable, update


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_an_update_with_a_non_finite_gradient_is_skipped_and_training_goes_on(bad):
    optimizer, variable, update = accumulating_optimizer()
    reference = AdaScaleReference(np.zeros(4), 0.1, scale=SCALE, momentum=0.9)
    update(samples(0))
    reference.step(samples(0))
    before = state(optimizer, variable)
    poisoned = samples(1)
    poisoned[1][2] = bad
    update(poisoned)
    assert state(optimizer, variable) == before
    assert int(optimizer.skipped_updates) == 1
    update(samples(2))  # the next finite update continues as if the bad one never came
    reference.step(samples(2))
    np.testing.assert_allclose(variable.numpy(), reference.params, rtol=1e-5, atol=1e-7)
    assert float(optimizer.scale_invariant_iterations) == pytest.approx(reference.tau, rel=1e-6)
    assert float(optimizer.gain) == pytest.approx(reference.gain, rel=1e-5)
    assert np.isfinite(float(optimizer.gradient_variance)) and np.isfinite(float(optimizer.gradient_sqr_norm))


def test_non_finite_raise_fails_the_step_and_changes_nothing():
    optimizer, variable, update = accumulating_optimizer(non_finite="raise")
    update(samples(0))
    before = state(optimizer, variable)
    poisoned = samples(1)
    poisoned[0][0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf in the gradients"):
        update(poisoned)
    assert state(optimizer, variable) == before


def test_non_finite_must_be_skip_or_raise():
    with pytest.raises(ValueError, match="`non_finite` must be 'skip' or 'raise'"):
        keras_adascale.AdaScaleSGD(0.1, non_finite="ignore")
    config = keras_adascale.AdaScaleSGD(0.1, non_finite="raise").get_config()
    assert keras_adascale.AdaScaleSGD.from_config(config).non_finite == "raise"


@pytest.mark.parametrize("magnitude", [1e-30, 1e-20, 1e20, 1e30])
def test_the_gain_is_the_same_at_extreme_gradient_scales(magnitude):
    gains = {}
    for scale_factor in (1.0, magnitude):
        optimizer, variable, update = accumulating_optimizer()
        for step in range(3):
            update([scale_factor * sample for sample in samples(step)])
        gains[scale_factor] = float(optimizer.gain)
        assert np.isfinite(float(optimizer.gradient_variance))
    assert 1.0 < gains[1.0] < SCALE
    assert gains[magnitude] == pytest.approx(gains[1.0], rel=1e-5)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_with_a_nan_batch_skips_it_and_the_callback_counts_or_raises(jit_compile):
    rng = np.random.RandomState(0)
    x, y = rng.randn(32, 3).astype(np.float32), rng.randn(32, 1).astype(np.float32)
    x[20, 0] = np.nan  # in the third micro-batch: the second update
    for mode in ("skip", "raise"):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        optimizer = keras_adascale.AdaScaleSGD(0.1, gradient_accumulation_steps=2, non_finite=mode)
        model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
        history = keras.callbacks.History()
        if mode == "skip":
            model.fit(x, y, batch_size=8, shuffle=False, verbose=0,
                      callbacks=[keras_adascale.AdaScaleCallback(), history])
            assert history.history["skipped_updates"] == [1]
            assert all(np.isfinite(w).all() for w in model.get_weights())
        else:
            error = tf.errors.InvalidArgumentError if not jit_compile else FloatingPointError
            with pytest.raises(error, match="NaN or Inf"):
                model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[keras_adascale.AdaScaleCallback()])
        assert int(optimizer.skipped_updates) == 1


class Interrupt(keras.callbacks.Callback):
    """Stands for a preemption: fails in the middle of an epoch."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.epoch, self.batch = epoch, batch

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.current, batch) == (self.epoch, self.batch):
            raise KeyboardInterrupt("preempted")


def test_backup_and_restore_resumes_to_the_same_end_as_an_uninterrupted_run(least_squares, tmp_path):
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([5, 10], [0.05, 0.02, 0.01])

    def train(backup_dir, interrupt=None):
        model = least_squares.model()
        optimizer = keras_adascale.AdaScaleSGD(
            keras_adascale.ScaleInvariantSchedule(schedule), momentum=0.9, gradient_accumulation_steps=2)
        model.compile(optimizer=optimizer, loss="mse")
        callbacks = [keras.callbacks.BackupAndRestore(str(backup_dir))] + ([interrupt] if interrupt else [])
        model.fit(least_squares.x[:64], least_squares.y[:64], batch_size=8, epochs=4, shuffle=False,
                  callbacks=callbacks, verbose=0)
        return model, optimizer

    expected_model, expected = train(tmp_path / "uninterrupted")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "preempted", Interrupt(epoch=2, batch=5))
    model, optimizer = train(tmp_path / "preempted")  # the restarted job
    for a, b in zip(model.get_weights(), expected_model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(optimizer.variables, expected.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    assert float(optimizer.scale_invariant_iterations) > 16  # 16 updates, each with gain >= 1


def test_a_mismatched_or_corrupt_checkpoint_fails_loudly(least_squares, tmp_path):
    def compiled(**kwargs):
        model = least_squares.model()
        model.compile(optimizer=keras_adascale.AdaScaleSGD(0.05, gradient_accumulation_steps=2, **kwargs),
                      loss="mse")
        model.optimizer.build(model.trainable_variables)
        return model

    saved = compiled(momentum=0.9)
    saved.fit(least_squares.x[:32], least_squares.y[:32], batch_size=8, verbose=0)
    path = tmp_path / "saved.weights.h5"
    saved.save_weights(path)
    with pytest.raises(ValueError, match="checkpoint holds .* optimizer variables and this optimizer has"):
        compiled(momentum=0.0).load_weights(path)  # no momentum slots: tau would silently restart
    restored = compiled(momentum=0.9)
    restored.load_weights(path)
    assert float(restored.optimizer.scale_invariant_iterations) == float(saved.optimizer.scale_invariant_iterations)
    corrupt = tmp_path / "corrupt.weights.h5"
    corrupt.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(Exception, match="(?i)truncated|unable|signature|file"):
        compiled(momentum=0.9).load_weights(corrupt)
