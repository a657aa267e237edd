"""python_chars: byte windows of the installed keras's library sources, as a tfds dataset, offline."""

import importlib.metadata
import json
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

import keras
from keras_adascale.datasets import python_chars

KERAS_ROOT = pathlib.Path(keras.__file__).parent
LIBRARY_FILES = sorted(
    path.relative_to(KERAS_ROOT).as_posix() for path in (KERAS_ROOT / "src").rglob("*.py")
    if not path.name.endswith("_test.py")
)


def load(data_dir, split, **kwargs):
    return tfds.as_numpy(tfds.load("python_chars", split=split, data_dir=str(data_dir), download=False, **kwargs))


def test_windows_are_keras_source_text_and_targets_are_inputs_shifted_by_one(python_chars_data_dir):
    texts = {}
    for example in load(python_chars_data_dir, "validation[:200]"):
        path = example["path"].decode()
        text = texts.setdefault(path, (KERAS_ROOT / path).read_bytes())
        inputs, targets = example["inputs"], example["targets"]
        assert inputs.shape == targets.shape == (128,) and inputs.dtype == np.uint8
        np.testing.assert_array_equal(inputs[1:], targets[:-1])
        window = inputs.tobytes() + targets[-1:].tobytes()
        assert any(text[start:start + 129] == window for start in range(0, len(text), 128))
    assert len(texts) > 1


def test_each_split_holds_every_window_of_its_files_and_no_file_is_in_two_splits(python_chars_data_dir):
    builder = tfds.builder("python_chars", data_dir=str(python_chars_data_dir))
    files = {}
    for split in ("train", "validation", "test"):
        paths = [path.decode() for batch in tfds.as_numpy(tfds.load(
            "python_chars", split=split, data_dir=str(python_chars_data_dir), download=False,
            decoders=tfds.decode.PartialDecoding({"path": True})).batch(8192)) for path in batch["path"]]
        files[split] = set(paths)
        # a file of n bytes gives (n - 1) // 128 windows of 129 bytes, 128 apart
        assert len(paths) == builder.info.splits[split].num_examples == sum(
            ((KERAS_ROOT / path).stat().st_size - 1) // 128 for path in files[split])
    assert not files["train"] & files["validation"] and not files["train"] & files["test"]
    assert not files["validation"] & files["test"]
    long_enough = {path for path in LIBRARY_FILES if (KERAS_ROOT / path).stat().st_size > 128}
    assert files["train"] | files["validation"] | files["test"] == long_enough
    assert len(files["validation"]) >= 10 and len(files["test"]) >= 10
    assert len(files["train"]) > 0.8 * len(long_enough)


def test_the_info_names_the_keras_version_and_the_vocabulary(python_chars_data_dir):
    info = tfds.builder("python_chars", data_dir=str(python_chars_data_dir)).info
    version = importlib.metadata.version("keras")
    assert f"keras {version}" in info.description
    assert dict(info.metadata) == {"keras_version": version, "vocabulary_size": 256, "sequence_length": 128}
    assert info.supervised_keys == ("inputs", "targets")


def test_the_split_of_a_file_depends_on_its_path_alone():
    # SHA-256 of the path, first 8 bytes as a big-endian integer, modulo 100 (here 32, 91 and 95):
    # < 90 train, < 95 validation, else test.
    assert [python_chars.split_of(path) for path in (
        "src/layers/layer.py", "src/applications/vgg19.py", "src/api_export.py")] == ["train", "validation", "test"]
    files = python_chars.source_files(python_chars.source_root())
    assert files == python_chars.source_files(python_chars.source_root())
    assert all(files[split] == sorted(files[split]) for split in files)
    assert sorted(path for paths in files.values() for path in paths) == LIBRARY_FILES


def test_data_prepared_from_another_keras_version_is_refused(python_chars_data_dir, tmp_path):
    shutil.copytree(python_chars_data_dir, tmp_path, dirs_exist_ok=True)
    metadata_path = tmp_path / "python_chars" / "1.0.0" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata_path.write_text(json.dumps(metadata | {"keras_version": "3.0.0"}))
    with pytest.raises(ValueError, match="prepared from keras 3.0.0, but keras .* is installed: delete"):
        tfds.builder("python_chars", data_dir=str(tmp_path)).download_and_prepare()
