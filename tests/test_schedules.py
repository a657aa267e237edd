"""ScaleInvariantSchedule: wrapping, evaluation and serialization."""

import keras
import pytest

from keras_adascale import ScaleInvariantSchedule


def test_wraps_a_float():
    schedule = ScaleInvariantSchedule(0.25, total_steps=100)
    assert float(schedule(0)) == 0.25 and float(schedule(1000)) == 0.25


def test_wraps_a_keras_schedule_and_passes_the_step_through():
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
def test_serialization_round_trip(schedule):
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
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        ScaleInvariantSchedule(**kwargs)
