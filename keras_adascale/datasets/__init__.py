"""tensorflow-datasets builders for real data that ships inside installed packages.

Importing this package registers the builders with tfds, so that
``tfds.load("bundled_mnist")`` works without network access.
"""

from keras_adascale.datasets.bundled_mnist import BundledMnist

__all__ = ["BundledMnist"]
