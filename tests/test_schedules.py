"""ScaleInvariantSchedule (wrapping, evaluation, serialization) and LinearScalingSchedule against hand-computed
rates."""

import keras
import numpy as np
import pytest

from keras_adascale import ScaleInvariantSchedule
from keras_adascale.schedules import LinearScalingSchedule


def test_scale_invariant_schedule_wraps_a_float():
    schedule = ScaleInvariantSchedule(0.25, total_steps=100)
    assert float(schedule(0)) == 0.25 and float(schedule(1000)) == 0.25


def test_scale_invariant_schedule_wraps_a_keras_schedule_and_passes_the_step_through():
    inner = keras.optimizers.schedules.PiecewiseConstantDecay([10], [1.0, 0.5])
    schedule = ScaleInvariantSchedule(inner)
    assert float(schedule(10)) == 1.0 and float(schedule(11)) == 0.5


@pytest.mark.parametrize(
    "schedule",
    [
        ScaleInvariantSchedule(0.1, total_steps=500),
        ScaleInvariantSchedule(keras.optimizers.schedules.CosineDecay(0.1, 1000), total_steps=1000),
    ],
)
def test_scale_invariant_schedule_serialization_round_trip(schedule):
    restored = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert isinstance(restored, ScaleInvariantSchedule)
    assert restored.get_config() == schedule.get_config()
    assert float(restored(321)) == pytest.approx(float(schedule(321)))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"schedule": "0.1"}, "schedule"),
        ({"schedule": -0.1}, "schedule"),
        ({"schedule": 0.1, "total_steps": 0}, "total_steps"),
        ({"schedule": 0.1, "total_steps": "10"}, "total_steps"),
    ],
)
def test_scale_invariant_schedule_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        ScaleInvariantSchedule(**kwargs)


def single_batch():
    return keras.optimizers.schedules.PiecewiseConstantDecay([100], [0.1, 0.01])


def test_linear_scaling_without_warmup_the_rate_is_s_times_the_schedule_run_s_times_faster():
    schedule = LinearScalingSchedule(single_batch(), scale=4)
    rates = [float(schedule(step)) for step in (0, 24, 25, 26)]
    # step 25 is single-batch step 100, still before the boundary (PiecewiseConstantDecay: step > 100)
    np.testing.assert_allclose(rates, [0.4, 0.4, 0.4, 0.04], rtol=1e-6)


def test_linear_scaling_warmup_ramps_linearly_from_the_single_batch_rate_to_s_times_it():
    schedule = LinearScalingSchedule(0.1, scale=5, warmup_steps=10)
    rates = [float(schedule(step)) for step in (0, 5, 10, 20)]
    np.testing.assert_allclose(rates, [0.1, 0.3, 0.5, 0.5], rtol=1e-6)


def test_linear_scaling_with_a_rate_factor_multiplies_by_it_but_runs_s_times_faster():
    schedule = LinearScalingSchedule(single_batch(), scale=4, rate_factor=2)
    rates = [float(schedule(step)) for step in (0, 25, 26)]
    np.testing.assert_allclose(rates, [0.2, 0.2, 0.02], rtol=1e-6)


def test_linear_scaling_warmup_ramps_to_the_rate_factor():
    warming = LinearScalingSchedule(0.1, scale=16, warmup_steps=10, rate_factor=4)
    np.testing.assert_allclose([float(warming(step)) for step in (0, 5, 10)], [0.1, 0.25, 0.4], rtol=1e-6)


def test_linear_scaling_schedule_config_round_trips_through_keras_serialization():
    schedule = LinearScalingSchedule(single_batch(), scale=8, warmup_steps=3, rate_factor=3, name="lsr")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert restored.get_config() == schedule.get_config()
    assert float(restored(7)) == pytest.approx(float(schedule(7)))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"scale": 0}, "scale"),
        ({"scale": 2, "warmup_steps": -1}, "warmup_steps"),
        ({"scale": float("inf")}, "scale"),
        ({"scale": 2, "schedule": "0.1"}, "schedule"),
        ({"scale": 2, "schedule": -0.1}, "schedule"),
        ({"scale": 2, "rate_factor": 0.5}, "rate_factor"),
    ],
)
def test_linear_scaling_schedule_bad_arguments_are_refused(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        LinearScalingSchedule(**{"schedule": 0.1, **kwargs})


def test_a_linear_scaling_schedule_saved_from_its_former_module_loads_by_its_registered_name():
    # Saved before it moved into the core, its config names keras_adascale.experiments.baselines,
    # a module that no longer exists; Keras finds a registered class by its registered name first.
    saved = keras.saving.serialize_keras_object(LinearScalingSchedule(0.1, scale=4, warmup_steps=2))
    assert saved["registered_name"] == "keras_adascale>LinearScalingSchedule"
    saved["module"] = "keras_adascale.experiments.baselines"
    restored = keras.saving.deserialize_keras_object(saved)
    assert isinstance(restored, LinearScalingSchedule)
    assert float(restored(1)) == pytest.approx(0.1 * (1 + 3 * 0.5))
