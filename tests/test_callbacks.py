"""AdaScaleCallback: logs in History and the progress bar, and the T_SI stopping rule."""

import keras
import pytest

import keras_adascale


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
    # The explicit argument wins over the schedule's total_steps.
    model, optimizer = compiled(least_squares, total_steps=10)
    model.fit(
        least_squares.x, least_squares.y, batch_size=8, epochs=50,
        callbacks=[keras_adascale.AdaScaleCallback(total_steps=3)], verbose=0,
    )
    assert 3 <= float(optimizer.scale_invariant_iterations) < 3 + float(optimizer.gain)


def test_progress_bar_shows_gain_and_tau(least_squares, capsys):
    model, _ = compiled(least_squares)
    model.fit(least_squares.x, least_squares.y, batch_size=8, epochs=1,
              callbacks=[keras_adascale.AdaScaleCallback()], verbose=2)
    out = capsys.readouterr().out
    assert "gain:" in out and "scale_invariant_iterations:" in out


def test_rejects_a_model_without_adascale(least_squares):
    model = least_squares.model()
    model.compile(optimizer=keras.optimizers.SGD(), loss="mse")
    with pytest.raises(ValueError, match="AdaScaleSGD"):
        model.fit(least_squares.x, least_squares.y, callbacks=[keras_adascale.AdaScaleCallback()], verbose=0)


def test_logs_the_noise_scale_and_the_scaling_efficiency(least_squares):
    model, optimizer = compiled(least_squares, scale=6)
    history = model.fit(least_squares.x, least_squares.y, batch_size=8, epochs=2,
                        callbacks=[keras_adascale.AdaScaleCallback()], verbose=0)
    variance, sqr_norm = float(optimizer.gradient_variance), float(optimizer.gradient_sqr_norm)
    assert history.history["gradient_noise_scale"][-1] == pytest.approx(variance / sqr_norm, rel=1e-6)
    assert history.history["scaling_efficiency"][-1] == pytest.approx(history.history["gain"][-1] / 6, rel=1e-6)
    assert 1 / 6 <= history.history["scaling_efficiency"][-1] <= 1.0
