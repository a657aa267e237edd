"""Every config in saved_configs/ resolves and builds (dataset metadata, model, optimizer) without training."""

import pathlib

import keras
import pytest

from keras_adascale import AdaScaleSGD
from keras_adascale.experiments import config, data, models, training

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "saved_configs").glob("*.yaml"))


def test_there_are_saved_configs():
    assert {path.stem for path in CONFIGS} >= {"demo", "cifar10_resnet18", "imagenet_resnet50"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_every_run_of_a_saved_config_builds(path):
    runs = config.load(path)
    assert path.read_text().startswith("#"), "each saved config starts with a header comment"
    built = {}
    for run in runs:
        input_shape, num_classes = data.describe(run["dataset"])
        key = (run["model"]["name"], input_shape)
        if key not in built:  # models are the same across runs; build each once
            built[key] = models.build(run["model"], input_shape, num_classes).count_params()
        assert built[key] > 0
        replicas = run["strategy"]["devices"] if run["strategy"]["name"] == "mirrored" else 1
        steps = training.plan(run, replicas)
        if run["optimizer"]["name"] == "adascale":
            assert isinstance(steps["optimizer"], AdaScaleSGD)
            assert replicas * steps["accumulation"] == run["optimizer"]["scale"]
            assert steps["min_updates"] * run["optimizer"]["scale"] >= run["total_steps"]
        else:
            assert isinstance(steps["optimizer"], keras.optimizers.SGD)
            assert steps["batch_size"] == run["optimizer"]["scale"] * run["dataset"]["batch_size"]
