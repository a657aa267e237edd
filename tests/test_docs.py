"""Every code block of README.md and of the documentation site's pages (docs/**/*.md) runs as written,
with its placeholders (model, dataset...) filled in; and the site builds with no warning.

A block preceded by `<!-- test: skip (reason) -->` is not run; one preceded by
`<!-- test: fresh process (...) -->` runs in a new Python process. ```bash blocks are runner commands
(`keras-adascale ...`), run in order in one folder; other shell lines belong in skipped blocks.
"""

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adascale

ROOT = pathlib.Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"(?:<!-- test: (?P<marker>[^>]*?) -->\n[ \t]*)?```(?P<language>\w+)\n(?P<code>.*?)```", re.S)
# The pages whose code runs: the README and the site's own pages (docs/tutorials links to the
# notebooks, which tests/test_tutorials.py runs).
PAGES = [ROOT / "README.md", *sorted(page for page in (ROOT / "docs").rglob("*.md")
                                     if "tutorials" not in page.relative_to(ROOT / "docs").parts)]
# Small and fast: the runner commands train a few updates of a tiny MLP on a slice of MNIST, and
# only the run that the later commands use (they read and sit beside runs/demo/adascale).
_TINY_RUNNER = ["--set", "total_steps=16", "--set", "evaluations=1", "--set", "dataset.train_split=train[:2%]",
                "--set", "dataset.test_split=test[:2%]", "--set", "dataset.shuffle_buffer=100",
                "--set", "model.name=mlp", "--set", "model.hidden_units=[16]"]


def blocks(language):
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in _BLOCK.finditer(text):
            if match["language"] != language:
                continue
            line = text.count("\n", 0, match.start("code")) + 1
            # "jax only (...)": a JAX block, run by tests_backends/test_docs.py on JAX's 4 host devices
            skipped = (match["marker"] or "").startswith(("skip", "jax only"))
            marks = [pytest.mark.skip(reason=match["marker"])] if skipped else []
            name = page.relative_to(ROOT).as_posix()
            found.append(pytest.param(textwrap.dedent(match["code"]), match["marker"] or "", id=f"{name}:{line}", marks=marks))
    return found


def test_every_page_has_its_blocks_found():
    """A typo in a marker or fence (```Python, a marker not right above its block) would hide a block."""
    for page in PAGES:
        text = page.read_text()
        fences = len(re.findall(r"^[ \t]*```", text, re.M))
        assert fences == 2 * len(list(_BLOCK.finditer(text))), f"{page}: a fence without a language?"
        for marker in re.findall(r"<!-- test(?:_readme)?:[^>]*-->", text):
            assert re.match(r"<!-- test: (skip \(.+\)|fresh process \(.+\)|jax only \(.+\)) -->$", marker), \
                (page, marker)


def placeholders():
    """What the README and the pages leave to the reader: a 3-class model and its data, a loss, T_SI."""
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


def _expected_outputs(command):
    """The files a runner command must leave behind (relative to its folder), from its own arguments."""
    arguments = command[2:]
    options = dict(zip(arguments, arguments[1:]))
    if command[1] == "train" and "--help" not in command:
        names = [value.split("=", 1)[1] for key, value in zip(arguments, arguments[1:])
                 if key == "--set" and value.startswith("name=")]
        experiment = names[-1] if names else pathlib.Path(arguments[0]).stem
        return [pathlib.Path("runs", experiment, options.get("--only", "adascale"), "final.json")]
    if command[1] == "compare":
        return [pathlib.Path(options["--output"]) if "--output" in options
                else pathlib.Path(arguments[0]).parent / "comparison.png"]
    if command[1] == "advise":
        return [pathlib.Path(options["--output"]) if "--output" in options else pathlib.Path(arguments[0]) / "advice.png"]
    return []


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
        # What each command says it writes is there (a compare's comparison.png, a train's final.json...).
        for output in _expected_outputs(command):
            assert (tmp_path / output).is_file(), f"{shlex.join(command)} did not write {output}"


def _schema_keys(schema, prefix=""):
    from keras_adascale.experiments import config

    for name, entry in schema.items():
        if config._is_section(entry):
            yield from _schema_keys(entry, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_site_builds_strict_with_every_config_key_and_the_api(tmp_path):
    """`make docs`: MkDocs builds the site with no warning; the generated pages carry the code's truth."""
    from keras_adascale.experiments import config

    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-5000:]
    # MkDocs's own warnings ("WARNING -  ..."), not TensorFlow's absl lines, which the hooks' import prints.
    warnings = re.findall(r"^(?:WARNING|ERROR) +-.*$", result.stderr, re.M)
    assert not warnings, "\n".join(warnings)
    reference = (site / "runner" / "config" / "index.html").read_text()
    missing = [key for key in _schema_keys(config.SCHEMA) if f"<code>{key}</code>" not in reference]
    assert not missing, f"config keys missing from the generated reference: {missing}"
    api = (site / "api" / "index.html").read_text()
    for name in keras_adascale.__all__:
        assert f'id="keras_adascale.{name}"' in api, name
    for method in ("set_scale", "set_accumulation_steps", "predicted_gain"):
        assert f'id="keras_adascale.AdaScaleSGD.{method}"' in api, method
    cli_page = (site / "runner" / "cli" / "index.html").read_text()
    for command in ("train", "compare", "advise"):
        assert f"keras-adascale {command}" in cli_page, command
    notebook = (site / "tutorials" / "01_quickstart" / "index.html").read_text()
    assert "AdaScaleSGD" in notebook


def test_readme_is_a_landing_page():
    """Two set-up commands first; under 200 lines; the rest lives in the site, linked from it."""
    text = (ROOT / "README.md").read_text()
    first = next(_BLOCK.finditer(text))
    assert [line.split("#")[0].strip() for line in first["code"].splitlines()] == ["make demo", "make test"]
    assert len(text.splitlines()) < 200
    for heading in ("## Should I use it?", "## How do I pick S?", "## Install"):
        assert heading in text
    for link in re.findall(r"\]\((docs/[^)#]+|CHANGELOG\.md)(?:#[^)]*)?\)", text):
        assert (ROOT / link).is_file(), link


def _hooks():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import hooks
    finally:
        sys.path.remove(str(ROOT / "docs"))
    return hooks


def test_the_cli_page_is_written_from_the_parser_not_by_argparse_s_formatter(monkeypatch):
    """argparse's `--help` layout changes with the Python version (3.13 and 3.14 rework it) and the terminal:
    the page must be the same whatever argparse's formatter and COLUMNS say."""
    import argparse

    hooks = _hooks()
    page = hooks.cli_reference()
    monkeypatch.setenv("COLUMNS", "40")
    for method in ("format_help", "_format_usage", "_format_action", "_format_text"):
        monkeypatch.setattr(argparse.HelpFormatter, method, lambda self, *args: "another Python's layout\n")
    assert hooks.cli_reference() == page
    assert "usage: keras-adascale train [-h] [--set KEY=VALUE]" in page
    assert "  --output OUTPUT       PNG to write (default: RUN_DIR/advice.png)" in page  # the help column


def test_the_committed_reference_pages_match_the_code():
    """docs/runner/config.md and cli.md carry the generated tables in the repository (a reader of the README's
    links sees them); they must be what the schema and the parser say now (`python docs/hooks.py` writes them)."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import hooks
    finally:
        sys.path.remove(str(ROOT / "docs"))
    assert hooks.stale_pages() == [], "run `python docs/hooks.py`"
    from keras_adascale.experiments import config

    page = (ROOT / "docs" / "runner" / "config.md").read_text()
    missing = [key for key in _schema_keys(config.SCHEMA) if f"| `{key}` |" not in page]
    assert not missing, missing
    stale = hooks.regenerated(page.replace("| `seed` | `0` |", "| `seed` | `1` |"), *hooks.GENERATED["runner/config.md"])
    assert stale == page  # a hand edit inside the generated part is seen and undone
