"""Argument rules shared by the AdaScale optimizers, the schedules, the callback and the runner's config, so they agree.

Each checker returns the value as the caller stores it (a plain int or float) or
raises `ValueError` naming the argument, in Keras's wording for Keras's own
arguments. The intervals are public so that the config can state the same rule
in its own words. No TensorFlow here: the config (and `keras-adascale --help`)
imports this module.
"""

import math
import numbers
from typing import NamedTuple


class Interval(NamedTuple):
    """The real numbers between `low` and `high`; `x in interval` is False for NaN and bools."""

    low: float
    high: float
    low_closed: bool = True
    high_closed: bool = False

    def __contains__(self, value):
        if not is_real(value):
            return False
        above = self.low <= value if self.low_closed else self.low < value
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def __str__(self):
        return f"{'[' if self.low_closed else '('}{self.low:g}, {self.high:g}{']' if self.high_closed else ')'}"


# keras.optimizers.SGD's rule: "`momentum` must be a float between [0, 1]".
MOMENTUM = Interval(0.0, 1.0, high_closed=True)
# theta = 1 would never move the averages off their start.
SMOOTHING = Interval(0.0, 1.0)
# S, the examples per update over the baseline batch: 1 (no scaling) or more, finite.
SCALE = Interval(1.0, math.inf)
NON_NEGATIVE = Interval(0.0, math.inf)
# An Adam decay rate: beta = 1 would never move its moment off zero.
BETA = Interval(0.0, 1.0)
POSITIVE = Interval(0.0, math.inf, low_closed=False)


def is_real(value):
    """A real number that is not a bool (`True` is an int to Python, not a number to a user)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def plain_number(value):
    """An int stays an int (S = 8 reads as 8), any other real becomes a float."""
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def rate(value, name):
    """A learning rate given as a number: a float >= 0."""
    if not is_real(value):
        raise ValueError(
            f"Argument `{name}` must be a float or a keras.optimizers.schedules.LearningRateSchedule. "
            f"Received: {name}={value!r}"
        )
    if value not in NON_NEGATIVE:
        raise ValueError(f"Argument `{name}` must be >= 0. Received: {name}={value}")
    return float(value)


def learning_rate(value):
    """An optimizer's `learning_rate`: a callable (a `LearningRateSchedule` is one) as is, else `rate`."""
    if callable(value) and not isinstance(value, numbers.Number):
        return value
    if not is_real(value):
        raise ValueError(
            "Argument `learning_rate` must be a float, a keras.optimizers.schedules.LearningRateSchedule "
            f"or a callable. Received: learning_rate={value!r}"
        )
    return rate(value, "learning_rate")


def momentum(value):
    """Keras's SGD rule for `momentum`, in Keras's words; ints are accepted (0 is 0.0)."""
    if value not in MOMENTUM:
        raise ValueError(f"`momentum` must be a float between [0, 1]. Received: momentum={value!r}")
    return float(value)


def scale(value, name="scale"):
    """S: a finite number >= 1, kept an int where it is one."""
    if value not in SCALE:
        raise ValueError(f"Argument `{name}` must be a finite number >= 1. Received: {name}={value!r}")
    return plain_number(value)


def smoothing(value):
    """theta: a float in [0, 1)."""
    if value not in SMOOTHING:
        raise ValueError(f"Argument `smoothing` must be a float in {SMOOTHING}. Received: smoothing={value!r}")
    return float(value)


def beta(value, name):
    """An Adam decay rate (`beta_1`, `beta_2`): a float in [0, 1)."""
    if value not in BETA:
        raise ValueError(f"Argument `{name}` must be a float in {BETA}. Received: {name}={value!r}")
    return float(value)


def non_negative(value, name):
    """A float >= 0 (Adam's `epsilon`)."""
    if value not in NON_NEGATIVE:
        raise ValueError(f"Argument `{name}` must be a float >= 0. Received: {name}={value!r}")
    return float(value)


def positive(value, name):
    """A number > 0 (a length such as T_SI), returned as given."""
    if not is_real(value):
        raise ValueError(f"Argument `{name}` must be a positive number. Received: {name}={value!r}")
    if value not in POSITIVE:
        raise ValueError(f"Argument `{name}` must be > 0. Received: {name}={value}")
    return value


def flag(value, name):
    """A bool (`nesterov`, `amsgrad`); 0 and 1 are not bools."""
    if not isinstance(value, bool):
        raise ValueError(f"Argument `{name}` must be a bool. Received: {name}={value!r}")
    return value


def count(value, name):
    """An int >= 0 (a number of steps)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise ValueError(f"Argument `{name}` must be an int >= 0. Received: {name}={value!r}")
    return int(value)


def accumulation_steps(value, name):
    """A count of micro-batches per update: an int >= 1."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Argument `{name}` must be an integer >= 1. Received: {name}={value!r}")
    return int(value)


def optional(check, value, *args, **kwargs):
    """`check(value, ...)`, or None for None."""
    return None if value is None else check(value, *args, **kwargs)
