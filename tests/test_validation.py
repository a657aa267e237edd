"""The shared argument rules: intervals, what they let through, and the values the checkers return."""

import math

import pytest

from keras_adascale import validation


@pytest.mark.parametrize("value", [math.nan, True, False, "0.5", None])
def test_nan_bools_and_non_numbers_are_in_no_interval(value):
    for interval in (validation.MOMENTUM, validation.SMOOTHING, validation.SCALE, validation.POSITIVE):
        assert value not in interval


def test_intervals_print_their_bounds_as_a_reader_writes_them():
    texts = [str(interval) for interval in (validation.MOMENTUM, validation.SMOOTHING, validation.SCALE,
                                             validation.POSITIVE)]
    assert texts == ["[0, 1]", "[0, 1)", "[1, inf)", "(0, inf)"]


def test_the_bounds_are_included_or_excluded_as_printed():
    assert 1.0 in validation.MOMENTUM and 1.0 not in validation.SMOOTHING
    assert 1 in validation.SCALE and math.inf not in validation.SCALE
    assert 0 not in validation.POSITIVE and 1e-9 in validation.POSITIVE


def test_checkers_return_the_stored_type():
    assert validation.scale(8) == 8 and isinstance(validation.scale(8), int)
    assert validation.scale(6.5) == 6.5
    assert validation.momentum(1) == 1.0 and isinstance(validation.momentum(1), float)
    assert validation.optional(validation.smoothing, None) is None


def test_momentum_is_refused_in_keras_words():
    with pytest.raises(ValueError, match=r"^`momentum` must be a float between \[0, 1\]. Received: momentum=1.5$"):
        validation.momentum(1.5)
