"""AdaScaleCallback: logs in History, the progress bar and TensorBoard, the T_SI stopping rule, skipped updates."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adascale
from conftest import LeastSquares


def compiled(problem, total_steps=None, **kwargs):
    model = problem.model()
    schedule = keras_adascale.ScaleInvariantSchedule(0.02, total_steps=total_steps)
    optimizer = keras_adascale.AdaScaleSGD(schedule, gradient_accumulation_steps=4, **kwargs)
    model.compile(optimizer=optimizer, loss="mse")
    return model, optimizer


def test_logs_gain_tau_and_learning_rate_into_history(least_squares):
    model, optimizer = compiled(least_squares)
    history = model.fit(
        least_squares.x, least_squares.y, batch_size=8, epochs=2,
        callbacks=[keras_adascale.AdaScaleCallback()], verbose=0,
    )
    for key in ("gain", "scale_invariant_iterations", "effective_learning_rate"):
        assert len(history.history[key]) == 2
    assert history.history["scale_invariant_iterations"][-1] == pytest.approx(
        float(optimizer.scale_invariant_iterations)
    )
    assert history.history["effective_learning_rate"][-1] == pytest.approx(
        0.02 * history.history["gain"][-1], rel=1e-6
    )


def test_stops_at_the_first_update_reaching_total_steps(least_squares):
    model, optimizer = compiled(least_squares, total_steps=10)
    model.fit(
        least_squares.x, least_squares.y, batch_size=8, epochs=50,
        callbacks=[keras_adascale.AdaScaleCallback()], verbose=0,
    )
    tau, gain = float(optimizer.scale_invariant_iterations), float(optimizer.gain)
    assert tau >= 10 and tau - gain < 10


def test_a_fit_resumed_at_total_steps_runs_no_batch_and_says_why(least_squares, capsys):
    model, optimizer = compiled(least_squares, total_steps=10)
    model.fit(least_squares.x, least_squares.y, batch_size=8, epochs=50,
              callbacks=[keras_adascale.AdaScaleCallback()], verbose=0)
    capsys.readouterr()
    weights, tau = model.get_weights(), float(optimizer.scale_invariant_iterations)
    micro_steps = int(optimizer._iterations)
    assert tau >= 10

    # Resumed with the defaults of fit and of the callback: nothing trains, and it says so.
    history = model.fit(least_squares.x, least_squares.y, batch_size=8, epochs=3,
                        callbacks=[keras_adascale.AdaScaleCallback()])
    out = capsys.readouterr().out
    assert f"tau {tau:.2f}".rstrip("0").rstrip(".") + " >= total_steps 10: training is complete" in out, out
    assert history.history == {}
    assert int(optimizer._iterations) == micro_steps
    assert float(optimizer.scale_invariant_iterations) == tau
    for before, after in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(after, before)

    # verbose=0 is silent; a larger T_SI trains again from epoch 0, as a fit without the callback would.
    model.fit(least_squares.x, least_squares.y, batch_size=8, epochs=1,
              callbacks=[keras_adascale.AdaScaleCallback(verbose=0)], verbose=0)
    assert capsys.readouterr().out == ""
    history = model.fit(least_squares.x, least_squares.y, batch_size=8, epochs=2, verbose=0,
                        callbacks=[keras_adascale.AdaScaleCallback(total_steps=1000)])
    assert len(history.history["loss"]) == 2
    assert int(optimizer._iterations) == micro_steps + 2 * 192 // 8


def test_with_adascale_adam_it_stops_at_total_steps_and_logs_the_square_root_rate(least_squares):
    model = least_squares.model()
    optimizer = keras_adascale.AdaScaleAdam(keras_adascale.ScaleInvariantSchedule(0.02, total_steps=10),
                                            gradient_accumulation_steps=4)
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(least_squares.x, least_squares.y, batch_size=8, epochs=50,
                        callbacks=[keras_adascale.AdaScaleCallback()], verbose=0)
    tau, gain = float(optimizer.scale_invariant_iterations), float(optimizer.gain)
    assert tau >= 10 and tau - gain < 10
    assert history.history["effective_learning_rate"][-1] == pytest.approx(0.02 * np.sqrt(gain), rel=1e-6)


def test_the_snapshot_holds_what_the_properties_say(least_squares):
    model, optimizer = compiled(least_squares)
    model.fit(least_squares.x, least_squares.y, batch_size=8, epochs=1, verbose=0)
    snapshot = optimizer.snapshot()
    for name in ("gain", "scale_invariant_iterations", "effective_learning_rate", "gradient_variance",
                 "gradient_sqr_norm", "gradient_noise_scale"):
        assert snapshot[name] == float(getattr(optimizer, name)), name
    assert snapshot["skipped_updates"] == int(optimizer.skipped_updates) == 0
    # The next update's predicted efficiency: at an unchanged S, the last gain / S (the gain is float32).
    assert snapshot["scaling_efficiency"] == pytest.approx(snapshot["gain"] / 4, rel=1e-6)
    assert snapshot["gain"] > 1.0


def test_an_explicit_total_steps_wins_over_the_schedules(least_squares):
    model, optimizer = compiled(least_squares, total_steps=10)
    model.fit(
        least_squares.x, least_squares.y, batch_size=8, epochs=50,
        callbacks=[keras_adascale.AdaScaleCallback(total_steps=3)], verbose=0,
    )
    assert 3 <= float(optimizer.scale_invariant_iterations) < 3 + float(optimizer.gain)


@pytest.mark.parametrize("verbose", [1, 2])
def test_the_progress_bar_shows_what_a_user_watches_and_history_what_was_asked(least_squares, capsys, verbose):
    model, _ = compiled(least_squares)
    history = model.fit(least_squares.x, least_squares.y, batch_size=8, epochs=1,
                        callbacks=[keras_adascale.AdaScaleCallback()], verbose=verbose)
    out = capsys.readouterr().out
    for name in ("gain", "scale_invariant_iterations", "effective_learning_rate", "scale"):
        assert f" {name}:" in out and name in history.history, name
    for name in ("skipped_updates", "gradient_variance", "gradient_sqr_norm", "gradient_noise_scale",
                 "scaling_efficiency", "accumulation_steps"):
        assert name not in out and name not in history.history, name


def test_logged_all_adds_every_statistic(least_squares, capsys):
    model, _ = compiled(least_squares)
    history = model.fit(least_squares.x, least_squares.y, batch_size=8, epochs=1,
                        callbacks=[keras_adascale.AdaScaleCallback(logged="all")], verbose=2)
    out = capsys.readouterr().out
    for name in keras_adascale.callbacks.STATISTICS:
        assert f" {name}:" in out and name in history.history, name


def test_logged_refuses_unknown_names():
    with pytest.raises(ValueError, match="`logged` must be 'all' or names among gain, "):
        keras_adascale.AdaScaleCallback(logged=("gain", "noise"))


def test_rejects_a_model_without_adascale(least_squares):
    model = least_squares.model()
    model.compile(optimizer=keras.optimizers.SGD(), loss="mse")
    with pytest.raises(ValueError, match="AdaScaleSGD"):
        model.fit(least_squares.x, least_squares.y, callbacks=[keras_adascale.AdaScaleCallback()], verbose=0)


def fit_at_scale_six(problem):
    """Two epochs at S = 6 from N = 4 samples with the callback: `(optimizer, history)`."""
    model, optimizer = compiled(problem, scale=6)
    history = model.fit(problem.x, problem.y, batch_size=8, epochs=2,
                        callbacks=[keras_adascale.AdaScaleCallback(logged="all")], verbose=0)
    return optimizer, history


def test_logs_the_noise_scale(least_squares):
    optimizer, history = fit_at_scale_six(least_squares)
    variance, sqr_norm = float(optimizer.gradient_variance), float(optimizer.gradient_sqr_norm)
    assert history.history["gradient_noise_scale"][-1] == pytest.approx(variance / sqr_norm, rel=1e-6)


def test_logs_the_scaling_efficiency(least_squares):
    _, history = fit_at_scale_six(least_squares)
    assert history.history["scaling_efficiency"][-1] == pytest.approx(history.history["gain"][-1] / 6, rel=1e-6)
    assert 1 / 6 <= history.history["scaling_efficiency"][-1] <= 1.0


def read_scalars(log_dir):
    """{tag: [(step, value), ...]} from every TensorBoard event file under `log_dir`."""
    import tensorflow as tf

    scalars = {}
    for path in sorted(tf.io.gfile.glob(f"{log_dir}/**/events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "scalars":
                    continue  # Keras also writes the model's config as text
                scalars.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    return scalars


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    """Two epochs of 6 updates of 4 micro-batches, logged by the callback and Keras's TensorBoard.

    Returns:
        `(optimizer, History.history, {tag: [(step, value), ...]})`.
    """
    log_dir = tmp_path_factory.mktemp("tensorboard")
    problem = LeastSquares(num_examples=192)
    model, optimizer = compiled(problem)
    history = model.fit(
        problem.x, problem.y, batch_size=8, epochs=2, verbose=0,
        callbacks=[keras_adascale.AdaScaleCallback(log_dir=log_dir),
                   keras.callbacks.TensorBoard(log_dir, update_freq="batch")],
    )
    return optimizer, history.history, read_scalars(log_dir)


def test_tensorboard_gets_gain_and_tau_per_update_under_accumulation(tensorboard_run):
    optimizer, _, scalars = tensorboard_run
    # 192 examples in batches of 8, 4 micro-batches per update: 6 updates per epoch.
    assert int(optimizer.iterations.numpy()) == 12
    gains = scalars["update_gain"]
    taus = scalars["update_scale_invariant_iterations"]
    assert [step for step, _ in gains] == [step for step, _ in taus] == list(range(1, 13))
    assert all(1.0 <= gain <= 4.0 for _, gain in gains)
    # tau is the running sum of the gains (Algorithm 1), update by update.
    np.testing.assert_allclose([tau for _, tau in taus], np.cumsum([gain for _, gain in gains]), rtol=1e-5)
    assert [step for step, _ in scalars["update_effective_learning_rate"]] == list(range(1, 13))


def test_keras_tensorboard_logs_what_the_callback_put_in_the_logs(tensorboard_run):
    # Per epoch, and per model.fit step (micro-batch) for the batch_ scalars.
    _, history, scalars = tensorboard_run
    assert [value for _, value in scalars["epoch_gain"]] == pytest.approx(history["gain"])
    assert len(scalars["batch_gain"]) == 48


def fit_with_a_nan_batch(jit_compile, non_finite, callbacks=()):
    """Two updates of 2 micro-batches of 8, the second update's first micro-batch holding a NaN."""
    rng = np.random.RandomState(0)
    x, y = rng.randn(32, 3).astype(np.float32), rng.randn(32, 1).astype(np.float32)
    x[20, 0] = np.nan  # in the third micro-batch: the second update
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    optimizer = keras_adascale.AdaScaleSGD(0.1, gradient_accumulation_steps=2, non_finite=non_finite)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    return model, optimizer, lambda: model.fit(x, y, batch_size=8, shuffle=False, verbose=0,
                                               callbacks=[keras_adascale.AdaScaleCallback(logged="all"),
                                                          *callbacks])


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_with_a_nan_batch_skips_it_and_the_callback_counts_it(jit_compile):
    history = keras.callbacks.History()
    model, optimizer, fit = fit_with_a_nan_batch(jit_compile, "skip", [history])
    fit()
    assert history.history["skipped_updates"] == [1]
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert int(optimizer.skipped_updates) == 1


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_with_a_nan_batch_raises_under_non_finite_raise(jit_compile):
    # Inside an XLA-compiled step the assertion cannot fire: the callback raises after the batch.
    _, optimizer, fit = fit_with_a_nan_batch(jit_compile, "raise")
    error = tf.errors.InvalidArgumentError if not jit_compile else FloatingPointError
    with pytest.raises(error, match="NaN or Inf"):
        fit()
    assert int(optimizer.skipped_updates) == 1


def test_without_a_t_si_to_stop_at_it_warns_once_how_to_give_one(least_squares):
    model = least_squares.model()
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.02, gradient_accumulation_steps=2), loss="mse")
    with pytest.warns(UserWarning, match="no T_SI to stop at") as caught:
        model.fit(least_squares.x[:32], least_squares.y[:32], batch_size=8, epochs=2, verbose=0,
                  callbacks=[keras_adascale.AdaScaleCallback()])
    assert sum("no T_SI" in str(warning.message) for warning in caught) == 1


_TWO_CALLBACKS = """
import warnings
import keras, numpy as np, keras_adascale

x, y = np.ones((16, 3), "float32"), np.ones((16, 1), "float32")
for _ in range(2):  # a second callback in the same session, with Python's default warning filters
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.02, gradient_accumulation_steps=2), loss="mse")
    callback = keras_adascale.AdaScaleCallback()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])  # the same callback: no second
"""


def test_the_missing_t_si_warning_is_shown_once_per_callback_not_once_per_process(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "two_callbacks.py"
    script.write_text(_TWO_CALLBACKS)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("AdaScaleCallback has no T_SI to stop at") == 2, result.stderr[-2000:]


def test_with_a_t_si_it_does_not_warn(least_squares):
    import warnings

    model, _ = compiled(least_squares, total_steps=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(least_squares.x[:32], least_squares.y[:32], batch_size=8, verbose=0,
                  callbacks=[keras_adascale.AdaScaleCallback()])
    assert not any("no T_SI" in str(warning.message) for warning in caught)
