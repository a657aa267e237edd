"""The JAX and PyTorch guide's examples run as written on this backend (tests/test_docs.py runs them on TensorFlow);
a block marked `jax only (...)` runs on JAX alone (4 host devices, from conftest.py)."""

import contextlib
import io
import pathlib
import re

import keras
import pytest

from conftest import BACKEND

PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "guides" / "backends.md"
_BLOCK = re.compile(r"(?:<!-- test: (?P<marker>[^>]*?) -->\n[ \t]*)?```python\n(?P<code>.*?)```", re.S)
BLOCKS = [match["code"] for match in _BLOCK.finditer(PAGE.read_text())
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
