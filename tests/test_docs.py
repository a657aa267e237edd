"""Every code block of README.md runs as written, with its placeholders (model, dataset...) filled in.

A block preceded by `<!-- test_readme: skip (reason) -->` is not run; one preceded by
`<!-- test_readme: fresh process (...) -->` runs in a new Python process.
"""

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adascale

ROOT = pathlib.Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"(?:<!-- test_readme: (?P<marker>[^>]*?) -->\n)?```(?P<language>\w+)\n(?P<code>.*?)```", re.S)
# Small and fast: the runner commands train a few updates of a tiny MLP on a slice of MNIST, and
# only the run that the later commands use (they read and sit beside runs/demo/adascale).
_TINY_RUNNER = ["--set", "total_steps=16", "--set", "evaluations=1", "--set", "dataset.train_split=train[:2%]",
                "--set", "dataset.test_split=test[:2%]", "--set", "dataset.shuffle_buffer=100",
                "--set", "model.name=mlp", "--set", "model.hidden_units=[16]"]


def blocks(language):
    text = (ROOT / "README.md").read_text()
    found = []
    for match in _BLOCK.finditer(text):
        if match["language"] != language:
            continue
        line = text.count("\n", 0, match.start("code")) + 1
        marks = [pytest.mark.skip(reason=match["marker"])] if (match["marker"] or "").startswith("skip") else []
        found.append(pytest.param(match["code"], match["marker"] or "", id=f"line{line}", marks=marks))
    return found


def placeholders():
    """What the README leaves to the reader: a 3-class model and its data, a loss, T_SI."""
    rng = np.random.RandomState(0)
    x = rng.randn(64, 4).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)

    def make_model():
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])

    return {
        "model": make_model(),
        "make_model": make_model,
        "dataset": tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(8),
        "batches": iter(tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(8)),
        "loss_fn": keras.losses.SparseCategoricalCrossentropy(),
        "GLOBAL_BATCH": 8,
        "total_steps": 12,
    }


@pytest.fixture
def saved_model(tmp_path):
    """`m.keras` in tmp_path: a model compiled with AdaScaleSGD, after one update."""
    model = placeholders()["make_model"]()
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.1, momentum=0.9, gradient_accumulation_steps=2),
                  loss="sparse_categorical_crossentropy")
    model.fit(np.ones((4, 4), np.float32), np.zeros(4, np.int32), batch_size=2, verbose=0)
    model.save(tmp_path / "m.keras")
    return tmp_path / "m.keras"


@pytest.mark.parametrize("code, marker", blocks("python"))
@pytest.mark.filterwarnings("ignore:AdaScaleSGD has scale S = 1")  # MirroredStrategy() on one CPU
def test_python_block_runs(code, marker, saved_model, monkeypatch):
    monkeypatch.chdir(saved_model.parent)
    script = saved_model.parent / "readme_block.py"  # a file, so that autograph can read the source
    script.write_text(code)
    if marker.startswith("fresh process"):
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        assert result.returncode == 0, result.stderr[-3000:]
        return
    # The README's MirroredStrategy() takes every (logical) device; strategies of other sizes made
    # earlier in this process must not share its collective group keys (see conftest.mirrored).
    monkeypatch.setattr(tf.distribute.MirroredStrategy, "_collective_key_base", 100_000)
    namespace = placeholders()
    exec(compile(code, str(script), "exec"), namespace)
    optimizer = namespace.get("optimizer")
    if isinstance(optimizer, keras_adascale.AdaScaleSGD):  # a training example: it trained to T_SI
        schedule = namespace.get("schedule")
        total_steps = schedule.total_steps if schedule is not None else namespace["total_steps"]
        assert float(optimizer.scale_invariant_iterations) >= total_steps


@pytest.mark.parametrize("code, marker", blocks("bash"))
def test_runner_commands_run_in_order_without_colliding(code, marker, tfds_data_dir, tmp_path):
    commands = [shlex.split(line, comments=True) for line in code.splitlines()]
    assert commands and all(command[0] == "keras-adascale" for command in commands), code
    shutil.copytree(ROOT / "saved_configs", tmp_path / "saved_configs")
    for command in commands:
        extra = []
        if command[1:2] == ["train"] and "--help" not in command:
            extra = ["--set", f"dataset.data_dir={tfds_data_dir}", *_TINY_RUNNER]
            extra += [] if "--only" in command else ["--only", "adascale"]
        result = subprocess.run([sys.executable, "-m", "keras_adascale", *command[1:], *extra], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        assert result.returncode == 0, f"{shlex.join(command)}:\n{result.stderr[-3000:]}"
    assert (tmp_path / "runs" / "demo" / "comparison.png").is_file()
    assert (tmp_path / "runs" / "demo_s8" / "adascale" / "final.json").is_file()
