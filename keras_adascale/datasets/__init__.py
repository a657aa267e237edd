"""tensorflow-datasets builders for real data that ships inside installed packages.

Importing this package registers the builders with tfds, so that
``tfds.load("bundled_mnist")`` and ``tfds.load("python_chars")`` work without
network access.
"""

from keras_adascale.datasets.bundled_mnist import BundledMnist
from keras_adascale.datasets.python_chars import PythonChars

__all__ = ["BundledMnist", "PythonChars"]
