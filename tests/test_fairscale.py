"""FairScale's AdaScale (its numbers, made by tools/fairscale_gains.py) against the NumPy reference's two rules.

FairScale clips each update's sigma^2 and mu^2 estimates before its moving averages; keras-adascale (and the
reference's default rule) average the raw estimates and clip what they read (McCandlish et al. 2018, Appendix
A; AdaptDL). The reference's per-update rule reproduces FairScale's gains; the default rule differs from them
exactly where small N makes an update's mu^2 estimate negative, and reads a larger gain there.
"""

import json
import pathlib

import numpy as np
import pytest

from reference import AdaScaleReference, gain_statistics

DATA = json.loads((pathlib.Path(__file__).parent / "data" / "fairscale_gains.json").read_text())


def case_samples(case):
    # As tools/fairscale_gains.py draws them.
    rng = np.random.RandomState(case["seed"])
    dim = case["dim"]
    mean = rng.randn(dim) / np.sqrt(dim)
    return mean + case["noise"] * rng.randn(case["updates"], case["samples"], dim) / np.sqrt(dim)


def reference_gains(case, clip):
    reference = AdaScaleReference(np.zeros(case["dim"]), 0.1, scale=case["scale"], smoothing=case["smoothing"],
                                  clip=clip)
    return [reference.update_gain(update) for update in case_samples(case)]


@pytest.mark.parametrize("case", DATA["cases"], ids=lambda case: f"N{case['samples']}_S{case['scale']:g}")
def test_the_reference_per_update_rule_reproduces_fairscales_gains(case):
    np.testing.assert_allclose(reference_gains(case, "update"), case["gains"], rtol=1e-7)  # FairScale sums the squares in float32


@pytest.mark.parametrize("case", DATA["cases"], ids=lambda case: f"N{case['samples']}_S{case['scale']:g}")
def test_the_clip_on_read_rule_differs_from_fairscale_where_mu2_estimates_are_negative(case):
    samples = case_samples(case)
    negative = [gain_statistics(update, case["scale"])[1] < 0 for update in samples]
    assert any(negative), "the case must have negative mu^2 estimates to show the difference"
    read, fairscale = np.array(reference_gains(case, "read")), np.array(case["gains"])
    first = negative.index(True)
    # Identical until the first negative estimate; from there on, clipping it lifts mu^2 and lowers the gain.
    np.testing.assert_allclose(read[:first], fairscale[:first], rtol=1e-7)  # FairScale sums the squares in float32
    assert np.all(read[first:] >= fairscale[first:] - 1e-12)
    assert np.max(read - fairscale) > 0.01
