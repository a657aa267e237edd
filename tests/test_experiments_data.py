"""The runner's datasets: checked before a run writes anything, never downloaded."""

import pytest
import tensorflow_datasets as tfds

from keras_adascale.experiments import config, data, training


@pytest.fixture
def offline(monkeypatch):
    """Fails the test at any download attempt (here a download would hang for minutes, then fail)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the runner tried to download")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)
    monkeypatch.setattr(tfds.download.DownloadManager, "download", refuse)


def test_a_misspelled_dataset_name_gets_the_closest_tfds_names():
    with pytest.raises(config.ConfigError, match="no dataset 'bundled_mnsit'; did you mean 'bundled_mnist'"):
        data.describe(config.defaults()["dataset"] | {"name": "bundled_mnsit"})


def test_an_unprepared_dataset_is_refused_without_a_download_naming_its_data_dir(offline, tmp_path):
    dataset = config.defaults()["dataset"] | {"name": "cifar10", "data_dir": str(tmp_path)}
    with pytest.raises(config.ConfigError) as error:
        data.prepare(dataset)
    message = str(error.value)
    assert f"'cifar10' is not prepared in the tfds data_dir {tmp_path}" in message
    assert f"tfds build cifar10 --data_dir {tmp_path}" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, message", [("bundled_mnsit", "did you mean 'bundled_mnist'"),
                                           ("cifar10", "'cifar10' is not prepared")])
def test_a_run_with_bad_data_writes_nothing_so_its_corrected_retry_runs(offline, tmp_path, name, message):
    (run,) = config.resolve({"dataset": {"name": name, "data_dir": str(tmp_path / "tfds")}}, name="typo")
    with pytest.raises(config.ConfigError, match=message):
        training.train(run, tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "tfds").exists() or list((tmp_path / "tfds").iterdir()) == []


LANGUAGE_MODEL = {"name": "python_chars", "input_feature": "inputs", "target_feature": "targets",
                  "test_split": "validation"}


def test_a_token_dataset_gives_its_sequence_length_and_vocabulary():
    dataset = config.defaults()["dataset"] | LANGUAGE_MODEL
    assert data.describe(dataset) == ((128,), 256)
    assert data.is_language_model(dataset)
    assert not data.is_language_model(config.defaults()["dataset"])


@pytest.mark.parametrize("overrides, message", [
    ({"target_feature": "label"}, "dataset.target_feature: 'python_chars' has no feature 'label'; it has inputs, "),
    ({"target_feature": "path"}, "neither an image and a class label nor token sequences of one length"),
    ({"augment": True}, "dataset.augment: only for images; 'python_chars' holds token sequences"),
])
def test_features_that_fit_no_task_are_refused_naming_the_key(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        data.describe(config.defaults()["dataset"] | LANGUAGE_MODEL | overrides)


@pytest.mark.parametrize("dataset, model, message", [
    ({"name": "bundled_mnist"}, "char_lm", "'char_lm' does not fit dataset 'bundled_mnist', which has images"),
    (LANGUAGE_MODEL, "small_cnn", "'small_cnn' does not fit dataset 'python_chars', which has token sequences"),
])
def test_a_model_for_another_task_is_refused_before_anything_is_written(offline, tmp_path, dataset, model, message):
    (run,) = config.resolve({"dataset": dataset | {"data_dir": str(tmp_path / "tfds")}, "model": {"name": model}},
                            name="mismatch")
    with pytest.raises(config.ConfigError, match=message):
        training.train(run, tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
