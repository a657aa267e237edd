"""Every config in saved_configs/ resolves and builds (dataset metadata, model, optimizer) without training."""

import pathlib

import keras
import numpy as np
import pytest

from keras_adascale import AdaScaleAdam, AdaScaleSGD
from keras_adascale.experiments import config, data, models, training

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "saved_configs").glob("*.yaml"))

SMALL_CNN_ON_MNIST = (
    (3 * 3 * 1 * 32 + 32)  # conv 3x3, 32 filters
    + (3 * 3 * 32 * 64 + 64)  # conv 3x3, 64 filters
    + (5 * 5 * 64 * 64 + 64)  # dense on the 5x5x64 map that two valid convs and pools leave of 28x28
    + (64 * 10 + 10)  # logits
)
CHAR_LM_ON_BYTES = (
    256 * 64  # embedding of 256 byte values
    + (64 * 128 + 128)  # projection to 128 channels
    + 4 * ((2 * 128) + (3 * 128 * 128 + 128))  # per dilation: LayerNorm, causal conv 3 x 128 -> 128
    + 2 * 128  # final LayerNorm
    + (128 * 256 + 256)  # logits per position
)
# Trainable parameters and output shape of each (model, input shape, classes) a saved config builds,
# counted apart from the builder: small_cnn and char_lm by hand, the CIFAR ResNet-18 (3x3 stem, no
# max-pool) as kuangliu/pytorch-cifar's ResNet18 counts them, ResNet-50 as Keras's summary of
# keras.applications.ResNet50 does.
TRAINABLE_PARAMETERS = {
    ("small_cnn", (28, 28, 1), 10): (SMALL_CNN_ON_MNIST, (None, 10)),
    ("resnet18", (32, 32, 3), 10): (11_173_962, (None, 10)),
    ("resnet50", (224, 224, 3), 1000): (25_583_592, (None, 1000)),
    ("char_lm", (128,), 256): (CHAR_LM_ON_BYTES, (None, 128, 256)),  # logits at every position
}


def test_there_are_saved_configs():
    assert {path.stem for path in CONFIGS} >= {"demo", "cifar10_resnet18", "imagenet_resnet50"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_every_saved_config_starts_with_a_header_comment(path):
    assert path.read_text().startswith("#"), "each saved config starts with a header comment"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_every_run_of_a_saved_config_builds(path):
    runs = config.load(path)
    built = {}
    for run in runs:
        input_shape, num_classes = data.describe(run["dataset"])
        key = (run["model"]["name"], tuple(input_shape), num_classes)
        if key not in built:  # models are the same across runs; build each once
            model = models.build(run["model"], input_shape, num_classes)
            built[key] = (sum(int(np.prod(w.shape)) for w in model.trainable_weights), model.output_shape)
        assert key in TRAINABLE_PARAMETERS, f"no independent parameter count for {key}"
        assert built[key] == TRAINABLE_PARAMETERS[key]
        replicas = run["strategy"]["devices"] if run["strategy"]["name"] in config.LOCAL_STRATEGIES else 1
        steps = training.plan(run, replicas)
        scale, batch = run["optimizer"]["scale"], run["dataset"]["batch_size"]
        baseline = run["optimizer"]["baseline_batch_size"] or batch
        if scale == "auto":
            # An auto run starts at its least S, whose updates hold replicas x accumulation samples of B,
            # and may reach autoscale.max_scale.
            scale = steps.autoscale["scale_per_step"] * steps.accumulation
            assert scale == replicas * steps.accumulation * batch / baseline
            assert steps.autoscale["callback"]["max_steps"] * scale / steps.accumulation <= run["autoscale"]["max_scale"]
            assert steps.autoscale["steps_per_epoch"] % steps.autoscale["callback"]["max_steps"] == 0
            assert steps.min_updates * run["autoscale"]["max_scale"] >= run["total_steps"]
            continue
        if run["optimizer"]["name"] in config.ADASCALE_OPTIMIZERS:
            expected = AdaScaleAdam if run["optimizer"]["name"] == "adascale_adam" else AdaScaleSGD
            assert type(steps.optimizer) is expected
            # S x B0 examples per update, from N = replicas x groups x accumulation samples of B.
            samples = replicas * run["optimizer"]["groups"] * steps.accumulation
            assert samples * batch == scale * baseline
            assert steps.batch_size == replicas * run["optimizer"]["groups"] * batch
            # S is left to default (N) where they agree, so the saved model resumes at any N.
            assert (steps.optimizer.get_config()["scale"] or samples) == scale
            assert steps.min_updates * scale >= run["total_steps"]
        else:
            adam = run["optimizer"]["name"].startswith("adam")
            assert type(steps.optimizer) is (keras.optimizers.Adam if adam else keras.optimizers.SGD)
            assert steps.batch_size == scale * baseline


def test_the_large_replica_batch_config_has_scale_apart_from_samples():
    (adascale,) = [run for run in config.load(CONFIGS[0].parent / "mnist_large_replica_batch.yaml")
                   if run["run"] == "adascale"]
    steps = training.plan(adascale, 4)
    assert (steps.optimizer.scale, steps.accumulation, steps.batch_size) == (8, 1, 256)
