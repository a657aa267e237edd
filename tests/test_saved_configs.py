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
        scale, batch = run["optimizer"]["scale"], run["dataset"]["batch_size"]
        baseline = run["optimizer"]["baseline_batch_size"] or batch
        if run["optimizer"]["name"] == "adascale":
            assert isinstance(steps.optimizer, AdaScaleSGD)
            # S x B0 examples per update, from N = replicas x accumulation samples of B.
            assert replicas * steps.accumulation * batch == scale * baseline
            # S is left to default (N) where they agree, so the saved model resumes at any N.
            assert (steps.optimizer.get_config()["scale"] or replicas * steps.accumulation) == scale
            assert steps.min_updates * scale >= run["total_steps"]
        else:
            assert isinstance(steps.optimizer, keras.optimizers.SGD)
            assert steps.batch_size == scale * baseline


def test_the_large_replica_batch_config_has_scale_apart_from_samples():
    (adascale,) = [run for run in config.load(CONFIGS[0].parent / "mnist_large_replica_batch.yaml")
                   if run["run"] == "adascale"]
    steps = training.plan(adascale, 4)
    assert (steps.optimizer.scale, steps.accumulation, steps.batch_size) == (8, 1, 256)
