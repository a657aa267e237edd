"""The runner's datasets: checked before a run writes anything, never downloaded; a training stream
that depends on its seed only."""

import hashlib
import logging

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


def _hashes(iterator, batches):
    """Each example of the next `batches` batches, as a digest of its image (one list per batch)."""
    return [[hashlib.md5(image.tobytes()).hexdigest()[:12] for image in next(iterator)[0].numpy()]
            for _ in range(batches)]


@pytest.fixture
def mnist_stream_config(tfds_data_dir):
    # 600 examples: a pass over the split is 30 batches of 20; the window holds 250.
    return config.defaults()["dataset"] | {"train_split": "train[:1%]", "data_dir": str(tfds_data_dir),
                                          "shuffle_buffer": 250}


@pytest.mark.parametrize("augment", [False, True])
def test_every_iterator_of_the_training_stream_yields_the_same_batches_whatever_others_read(
        mnist_stream_config, augment):
    # Under a tf.distribute strategy, Keras's fit reads a batch from an iterator it then drops,
    # which goes on prefetching while the training iterator starts; a resumed run also skips
    # whole passes. The stream must not depend on either.
    stream_config = mnist_stream_config | {"augment": augment}
    stream = data.train_dataset(stream_config, 20, seed=3)
    first = _hashes(iter(stream), 70)
    other = iter(stream)
    _hashes(other, 95)  # three passes and more, left open
    assert _hashes(iter(stream), 70) == first
    assert _hashes(iter(data.train_dataset(stream_config, 20, seed=3)), 70) == first
    assert _hashes(iter(data.train_dataset(stream_config, 20, seed=4)), 70) != first


def test_each_pass_over_the_split_holds_every_example_once_in_a_new_order(mnist_stream_config):
    passes = _hashes(iter(data.train_dataset(mnist_stream_config, 20, seed=3)), 90)
    orders = [sum(passes[start:start + 30], []) for start in (0, 30, 60)]
    assert len(set(orders[0])) == 600
    assert all(sorted(order) == sorted(orders[0]) for order in orders)
    assert orders[0] != orders[1] and orders[1] != orders[2]
    assert orders[0][:250] != orders[1][:250]  # the first window too is shuffled anew


# Batches of 20 split the 600 examples into passes of 30 batches; batches of 32 straddle passes.
@pytest.mark.parametrize("batch, skip_batches", [(20, 7), (20, 30), (20, 95), (32, 40)])
def test_a_stream_started_after_some_batches_goes_on_as_the_whole_stream(mnist_stream_config, batch, skip_batches):
    whole = _hashes(iter(data.train_dataset(mnist_stream_config, batch, seed=3)), skip_batches + 8)
    started = data.train_dataset(mnist_stream_config, batch, seed=3, skip_batches=skip_batches)
    assert _hashes(iter(started), 8) == whole[skip_batches:]


def test_a_misspelled_name_suggests_the_dataset_that_ships_offline_first():
    with pytest.raises(config.ConfigError) as error:
        data.describe(config.defaults()["dataset"] | {"name": "mnsit"})
    message = str(error.value)
    assert "did you mean 'bundled_mnist' (ships offline with keras-adascale)" in message
    assert message.index("'bundled_mnist'") < message.index("'mnist'")
    assert "(tfds; needs a download unless prepared)" in message


def test_an_unprepared_dataset_logs_no_tfds_warning_before_the_runners_message(offline, tmp_path, caplog):
    dataset = config.defaults()["dataset"] | {"name": "cifar10", "data_dir": str(tmp_path)}
    with caplog.at_level(logging.WARNING), pytest.raises(config.ConfigError, match="is not prepared"):
        data.prepare(dataset)
    assert not [record for record in caplog.records if "dataset_info.json" in record.getMessage()]
