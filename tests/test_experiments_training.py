"""The runner's optimizer plans (keras_adascale/experiments/training.py `plan`) for the Adam family."""

import math

import keras
import pytest

import keras_adascale
from keras_adascale.experiments import config, training

TOTAL_STEPS, SCALE = 400, 4


def planned(name, replicas=1, **optimizer):
    raw = {"total_steps": TOTAL_STEPS, "schedule": {"name": "constant", "learning_rate": 0.002},
           "optimizer": {"name": name, "scale": SCALE, **optimizer}}
    (run,) = config.resolve(raw, name="plan")
    return training.plan(run, replicas)


def test_adascale_adam_takes_n_samples_and_its_statistics():
    steps = planned("adascale_adam", statistics="preconditioned", beta_2=0.99)
    assert isinstance(steps.optimizer, keras_adascale.AdaScaleAdam)
    assert steps.optimizer.statistics == "preconditioned" and steps.optimizer.beta_2 == 0.99
    assert (steps.accumulation, steps.batch_size) == (SCALE, 32)
    assert (steps.min_updates, steps.max_updates) == (TOTAL_STEPS // SCALE, TOTAL_STEPS)


@pytest.mark.parametrize(
    "name, rate, beta_1, beta_2, epsilon, updates",
    [
        ("adam", 0.002, 0.9, 0.999, 1e-7, TOTAL_STEPS),
        ("adam_fixed", 0.002, 0.9, 0.999, 1e-7, TOTAL_STEPS // SCALE),
        ("adam_linear", 0.002 * SCALE, 0.9, 0.999, 1e-7, TOTAL_STEPS // SCALE),
        # Malladi et al.'s square-root rule at kappa = S = 4: 1 - beta x 4, epsilon / 2.
        ("adam_sqrt", 0.002 * 2, 0.6, 0.996, 5e-8, TOTAL_STEPS // SCALE),
    ],
)
def test_each_adam_baseline_scales_as_its_rule_says(name, rate, beta_1, beta_2, epsilon, updates):
    steps = planned(name)
    optimizer = steps.optimizer
    assert type(optimizer) is keras.optimizers.Adam
    assert float(optimizer.learning_rate) == pytest.approx(rate, rel=1e-6)
    assert (optimizer.beta_1, optimizer.beta_2) == (pytest.approx(beta_1), pytest.approx(beta_2))
    assert optimizer.epsilon == pytest.approx(epsilon)
    assert steps.min_updates == steps.max_updates == updates
    assert steps.batch_size == SCALE * 32 and steps.accumulation == 1


def test_the_square_root_rule_caps_one_minus_beta_at_one():
    optimizer = planned("adam_sqrt", beta_1=0.5).optimizer  # 1 - beta_1 = 0.5 x 4 > 1
    assert optimizer.beta_1 == 0.0 and optimizer.epsilon == pytest.approx(1e-7 / math.sqrt(SCALE))
