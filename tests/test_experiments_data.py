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
