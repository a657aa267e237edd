"""The JAX and PyTorch guide's examples, the one-batch guide's, and getting started's, run as written on this backend
(tests/test_docs.py runs them on TensorFlow); a block marked `jax only (...)` runs on JAX alone (4 host devices, from
conftest.py)."""

import contextlib
import io
import pathlib
import re

import keras
import numpy as np
import pytest

from conftest import BACKEND

PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "guides" / "backends.md"
PAGES = [PAGE, PAGE.with_name("one-batch.md")]
_BLOCK = re.compile(r"(?:<!-- test: (?P<marker>[^>]*?) -->\n[ \t]*)?```python\n(?P<code>.*?)```", re.S)
BLOCKS = [match["code"] for page in PAGES for match in _BLOCK.finditer(page.read_text())
          if not (match["marker"] or "").startswith("skip")
          and (BACKEND == "jax" or not (match["marker"] or "").startswith("jax only"))]


def test_the_page_has_examples():
    assert BLOCKS


@pytest.mark.parametrize("code", BLOCKS)
def test_an_example_runs_as_written(code):
    printed, namespace = io.StringIO(), {"__name__": "__main__"}
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, str(PAGE), "exec"), namespace)
    finally:
        if BACKEND == "jax":
            keras.distribution.set_distribution(None)  # the DataParallel example sets one
    assert printed.getvalue().startswith(f"{BACKEND}: ")
    # a training example trains to T_SI, in fewer updates than T_SI (the gain is above 1)
    snapshot = namespace["optimizer"].snapshot()
    assert snapshot["scale_invariant_iterations"] >= namespace["total_steps"]
    assert int(namespace["updates"]) < namespace["total_steps"]


GETTING_STARTED = PAGE.parent.parent / "getting-started.md"
STARTED_BLOCKS = [match["code"] for match in _BLOCK.finditer(GETTING_STARTED.read_text())
                  if not (match["marker"] or "").startswith("skip")]


def placeholders():
    """What getting started leaves to the reader (as tests/test_docs.py fills it on TensorFlow): a 3-class model and
    its data, here a generator of batches, which `fit` takes on every backend."""
    rng = np.random.RandomState(0)
    x = rng.randn(64, 4).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)

    def batches():
        while True:
            for start in range(0, 64, 8):
                yield x[start:start + 8], y[start:start + 8]

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    return {"model": model, "dataset": batches()}


def test_getting_started_has_python_examples():
    assert STARTED_BLOCKS


@pytest.mark.parametrize("code", STARTED_BLOCKS)
def test_a_getting_started_example_runs_as_written(code):
    namespace = {"__name__": "__main__", **placeholders()}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(GETTING_STARTED), "exec"), namespace)
    optimizer = namespace["optimizer"]
    assert float(optimizer.scale_invariant_iterations) >= namespace["schedule"].total_steps
    assert printed.getvalue().strip().splitlines()[-1].startswith(f"{namespace['updates']} updates for ")
