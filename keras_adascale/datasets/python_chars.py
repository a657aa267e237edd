"""Character windows of the installed ``keras`` package's Python sources, as a tfds dataset."""

import hashlib
import importlib.metadata
import importlib.util
import pathlib

import numpy as np
import tensorflow_datasets as tfds

SEQUENCE_LENGTH = 128
VOCABULARY_SIZE = 256  # bytes
# Fractions of the files, by a stable hash of their path: 90% train, 5% validation, 5% test.
_SPLIT_BUCKETS = (("train", 90), ("validation", 95), ("test", 100))

_DESCRIPTION = """\
A character-level language-modelling dataset: the Python source files of the
installed `keras` package (keras {keras_version}), `keras/src/**/*.py` without
the `*_test.py` files, so that the text is library code.

Each file goes to one split by a stable hash of its path inside the package
(SHA-256 of e.g. `src/layers/layer.py`): about 90% of the files train, 5%
validation, 5% test; no file is in two splits. A file is cut into
non-overlapping windows of {length} + 1 bytes, starting every {length} bytes (the
last byte of a window is the first of the next, so every byte after a file's
first is a target exactly once); the tail that does not fill a window is
dropped. `inputs` are a window's first {length} bytes and `targets` its last
{length}: the same text shifted by one. `path` names the file.

The text is encoded as raw bytes (vocabulary {vocabulary}): lossless and with
no vocabulary to ship, and since the sources are all but entirely ASCII
(well under 0.01% of the bytes are above 127), bits per byte are bits per
character.
"""


def keras_version():
    """The version of the installed ``keras`` distribution."""
    return importlib.metadata.version("keras")


def source_root():
    """The installed ``keras`` package's folder (without importing it)."""
    spec = importlib.util.find_spec("keras")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the python_chars dataset reads the sources of 'keras', which is not installed")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def split_of(relative_path):
    """The split of a file: a stable hash of its path (a `str`, '/'-separated) picks it."""
    bucket = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big") % 100
    return next(split for split, end in _SPLIT_BUCKETS if bucket < end)


def source_files(root):
    """The library files of each split, in path order.

    Args:
        root: the ``keras`` package folder.

    Returns:
        A dict ``{split: [relative path, ...]}`` with '/'-separated paths
        relative to `root`, e.g. ``"src/layers/layer.py"``.
    """
    paths = sorted(
        path.relative_to(root).as_posix()
        for path in (root / "src").rglob("*.py")
        if not path.name.endswith("_test.py")
    )
    splits = {split: [] for split, _ in _SPLIT_BUCKETS}
    for path in paths:
        splits[split_of(path)].append(path)
    return splits


def windows(text, length=SEQUENCE_LENGTH):
    """`(start, inputs, targets)` of the non-overlapping windows of `text` (bytes), as uint8 arrays."""
    data = np.frombuffer(text, np.uint8)
    for start in range(0, len(data) - length, length):
        yield start, data[start:start + length], data[start + 1:start + length + 1]


class PythonChars(tfds.core.GeneratorBasedBuilder):
    """Byte windows of keras's own Python sources (installed with keras), no download."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "keras/src/**/*.py without tests; windows of 128 + 1 bytes."}

    def _info(self):
        return self.dataset_info_from_configs(
            description=_DESCRIPTION.format(
                keras_version=keras_version(), length=SEQUENCE_LENGTH, vocabulary=VOCABULARY_SIZE
            ),
            features=tfds.features.FeaturesDict(
                {
                    "inputs": tfds.features.Tensor(shape=(SEQUENCE_LENGTH,), dtype=np.uint8),
                    "targets": tfds.features.Tensor(shape=(SEQUENCE_LENGTH,), dtype=np.uint8),
                    "path": tfds.features.Text(),
                }
            ),
            supervised_keys=("inputs", "targets"),
            homepage="https://pypi.org/project/keras/",
            metadata=tfds.core.MetadataDict(
                keras_version=keras_version(), vocabulary_size=VOCABULARY_SIZE, sequence_length=SEQUENCE_LENGTH
            ),
        )

    def download_and_prepare(self, *args, **kwargs):
        """Prepares the dataset, or checks that the prepared one holds the installed keras's sources.

        Raises:
            ValueError: if the data dir holds the sources of another keras version.
        """
        super().download_and_prepare(*args, **kwargs)
        prepared, installed = self.info.metadata["keras_version"], keras_version()
        if prepared != installed:
            raise ValueError(
                f"{self.data_dir} holds python_chars prepared from keras {prepared}, but keras {installed} "
                "is installed: delete that folder (or use another data_dir) to prepare it from this keras"
            )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        root = source_root()
        files = source_files(root)
        return {split: self._generate_examples(root, paths) for split, paths in files.items()}

    def _generate_examples(self, root, paths):
        for path in paths:
            for start, inputs, targets in windows((root / path).read_bytes()):
                yield f"{path}:{start}", {"inputs": inputs, "targets": targets, "path": path}
