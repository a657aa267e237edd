"""`make compat` (tools/compat.py): its table of pairs agrees with pyproject.toml's declared ranges, and
its report names a failing pair. The pairs themselves run in `make compat`, not here (one virtual
environment each)."""

import importlib.util
import pathlib
import re
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("compat", ROOT / "tools" / "compat.py")
compat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compat)


def _declared():
    """{name: requirement} of pyproject.toml's core dependencies and its `tensorflow` extra (the backend the
    `oldest` pair tests)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dependencies = project["dependencies"] + project["optional-dependencies"]["tensorflow"]
    return {re.match(r"[A-Za-z0-9_.-]+", requirement)[0]: requirement for requirement in dependencies}


def test_the_lower_bounds_are_the_oldest_tested_pair():
    (oldest,) = [pair for pair in compat.load_pairs() if pair["name"] == "oldest"]
    pinned = dict(requirement.split("==") for requirement in oldest["requirements"])
    declared = _declared()
    assert set(pinned) == {"tensorflow", "keras"} and set(declared) == {"tensorflow", "keras", "numpy"}
    for name, version in pinned.items():
        assert f">={version}" in declared[name], (name, declared[name], version)


def test_a_tensorflow_pair_is_installed_with_the_tensorflow_extra():
    # The core names no backend: a pair's declared range is checked through the extra.
    assert 'f"{ROOT}[tensorflow]"' in (ROOT / "tools" / "compat.py").read_text()


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_the_backends_extras_lower_bounds_are_their_oldest_tested_pair(backend):
    (oldest,) = [pair for pair in compat.load_pairs() if pair["name"] == f"{backend}-oldest"]
    assert oldest["backend"] == backend and oldest["blocking"]
    pinned = dict(requirement.split("==") for requirement in oldest["requirements"])
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][backend]
    assert sorted(f"{name}>={version}" for name, version in pinned.items()) == sorted(extra)


def test_the_oldest_pairs_are_what_ci_runs():
    makefile = (ROOT / "Makefile").read_text()
    assert "tools/compat.py --pairs oldest,jax-oldest,torch-oldest" in makefile


def test_no_upper_bound_is_declared_without_a_known_break():
    assert all("<" not in requirement for requirement in _declared().values()), _declared()


def test_release_pairs_block_and_the_nightlies_do_not():
    pairs = {pair["name"]: pair for pair in compat.load_pairs()}
    assert pairs["oldest"]["blocking"] and pairs["newest"]["blocking"]
    assert pairs["nightly"]["nightly"] and not pairs["nightly"]["blocking"]


def test_the_core_tests_exist():
    assert all((ROOT / path).exists() for path in compat.CORE_TESTS)


@pytest.mark.parametrize("line, counts", [
    ("194 passed in 100.1s", (194, 0, 0, 0)),
    ("60 failed, 124 passed, 13 warnings, 10 errors in 157.4s", (124, 60, 10, 0)),
    ("1 failed, 2 passed, 1 error in 3s", (2, 1, 1, 0)),
    ("319 passed, 2 skipped, 2 deselected, 17 warnings in 110.80s", (319, 0, 0, 2)),
    ("no tests ran", (0, 0, 0, 0)),
])
def test_pytest_counts_are_read_from_its_closing_line(line, counts):
    assert compat._summary_counts("....\n" + line + "\n") == counts


def test_the_table_names_a_failing_pair_and_marks_a_nightly_not_blocking():
    row = {"backend": "TensorFlow", "version": "2.16.2", "keras": "3.5.0", "python": "3.11.9", "passed": 130,
           "failed": 60, "errors": 10, "skipped": 2, "date": "2026-11-29"}
    rows = [{**row, "pair": "oldest", "blocking": True, "problem": "core tests failed (exit 1)"},
            {**row, "pair": "nightly", "blocking": False, "problem": "core tests failed (exit 1)"},
            {**row, "pair": "newest", "blocking": True, "problem": None, "failed": 0, "errors": 0}]
    lines = compat.table(rows).splitlines()
    assert lines[0].startswith("| pair | backend | Keras |")
    assert lines[2] == "| oldest | TensorFlow 2.16.2 | 3.5.0 | 3.11.9 | 130 | 60 | 10 | 2 | FAILED | 2026-11-29 |"
    assert lines[3].endswith("| failed (not blocking) | 2026-11-29 |")
    assert lines[4].endswith("| ok | 2026-11-29 |")


@pytest.mark.parametrize("pair, exit_code", [("oldest", 1), ("nightly", 0)])
def test_a_failing_blocking_pair_fails_the_run_naming_it_and_a_nightly_does_not(monkeypatch, capsys, tmp_path,
                                                                                 pair, exit_code):
    def failing(pair, venvs, fresh):
        return {"pair": pair["name"], "blocking": pair["blocking"], "backend": "TensorFlow", "version": "2.16.2",
                "keras": "3.5.0",
                "python": "3.11.9", "passed": 1, "failed": 2, "errors": 0, "skipped": 0, "minutes": 0.1, "date": "2026-11-29",
                "log": "x.log", "problem": "core tests failed (exit 1)"}

    monkeypatch.setattr(compat, "run_pair", failing)
    assert compat.main(["--pairs", pair, "--venvs", str(tmp_path)]) == exit_code
    err = capsys.readouterr().err
    kind = "FAILED" if exit_code else "failed, not blocking"
    assert f"compat: {kind}: {pair} (TensorFlow 2.16.2, Keras 3.5.0): core tests failed" in err


def test_an_unknown_pair_is_refused_naming_it(capsys):
    with pytest.raises(SystemExit):
        compat.main(["--pairs", "oldest,newst"])
    assert "newst" in capsys.readouterr().err
