"""`make compat`: the core tests in one virtual environment per backend / Keras pair, and a table.

The pairs are in tools/compat_pairs.toml: TensorFlow / Keras pairs, and JAX or PyTorch / Keras pairs
(`backend = "jax"` or `"torch"`). Each gets a virtual environment under `--venvs` (kept and reused while
its requirements are unchanged; `--fresh` rebuilds), the project installed editable in it, and the core
test modules run there: tests/'s on TensorFlow, tests_backends/ with `KERAS_BACKEND` set on the others
(in an environment without TensorFlow, as `make test` runs them). Prints one row per pair (the versions
actually imported, passed / failed / errors / skipped, minutes, the date) as a Markdown table, and exits 1
when a blocking pair failed, naming it. A non-blocking pair (the nightlies) is reported and never fails the run.

    python tools/compat.py                 # every pair
    python tools/compat.py --pairs oldest  # what CI runs besides the full suite
"""

import argparse
import datetime
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAIRS_FILE = ROOT / "tools" / "compat_pairs.toml"
# The tests of the optimizer itself, on one device and under tf.distribute: what a user of the
# package relies on (`-m "not slow"`; a test that needs the runner's extra skips). The rest of the
# suite tests the experiment runner, its data and the tutorials, which pin their own extras.
CORE_TESTS = ("tests/test_gain.py", "tests/test_optimizer.py", "tests/test_adam.py", "tests/test_schedules.py",
              "tests/test_callbacks.py", "tests/test_validation.py", "tests/test_init.py",
              "tests/test_keras_conventions.py", "tests/test_private_api.py", "tests/test_mirrored.py",
              "tests/test_distribute.py", "tests/test_changing_scale.py", "tests/test_multi_worker.py",
              "tests/test_setting.py", "tests/test_fairscale.py", "tests/test_autoscale.py", "tests/test_model.py")
# What the core tests import besides the package, as the `test` and `examples` extras pin them
# (TensorFlow >= 2.21 no longer installs tensorboard, which the callback's TensorBoard tests need).
TEST_TOOLS = ("pytest", "hypothesis", "tensorboard")
# Per backend: its name in the table, its import package, the tests, and the tools they import.
BACKENDS = {
    "tensorflow": {"name": "TensorFlow", "module": "tensorflow", "tests": CORE_TESTS, "tools": TEST_TOOLS},
    "jax": {"name": "JAX", "module": "jax", "tests": ("tests_backends",), "tools": ("pytest", "hypothesis")},
    "torch": {"name": "PyTorch", "module": "torch", "tests": ("tests_backends",), "tools": ("pytest", "hypothesis")},
}
# JAX 0.10 needs NumPy 2; the other backends' pairs get it too (pip may keep an older one otherwise).
BACKEND_EXTRAS = ("numpy>=2",)


def _versions_probe(backend):
    module = BACKENDS[backend]["module"]
    return (f"import json, sys, {module} as backend, keras; "
            "print(json.dumps([backend.__version__, keras.version(), sys.version.split()[0]]))")


def load_pairs(path=PAIRS_FILE):
    """The pairs of `path`, each a dict with `name`, `requirements`, `blocking` and `nightly`."""
    pairs = tomllib.loads(path.read_text())["pair"]
    for pair in pairs:
        pair.setdefault("nightly", False)
        pair.setdefault("backend", "tensorflow")
    return pairs


def test_tool_requirements(tools=TEST_TOOLS):
    """The requirements for `tools`, as pyproject.toml's `test` and `examples` extras declare them."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return [r for r in extras["test"] + extras["examples"] if re.match(r"[A-Za-z0-9_.-]+", r)[0].lower() in tools]


def _environment(tf_log_level, backend="tensorflow"):
    """This environment without a path that could put another copy of the project first, on `backend`."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": tf_log_level, "KERAS_BACKEND": backend}


def _run(command, log, **kwargs):
    with open(log, "a") as stream:
        stream.write(f"$ {' '.join(map(str, command))}\n")
        stream.flush()
        return subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, **kwargs).returncode


def build_venv(pair, venv, log, fresh):
    """Creates `venv` for `pair` unless one made for the same requirements is there. Returns an error or None."""
    stamp = venv / "compat-requirements.json"
    wanted = {"requirements": pair["requirements"], "tools": test_tool_requirements(BACKENDS[pair["backend"]]["tools"]),
              "nightly": pair["nightly"], "backend": pair["backend"]}
    if not fresh and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return None
    shutil.rmtree(venv, ignore_errors=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    if _run([sys.executable, "-m", "venv", str(venv)], log):
        return "venv creation failed"
    _run(pip + ["install", "--quiet", "--upgrade", "pip"], log)
    if pair["backend"] != "tensorflow":
        # Without TensorFlow, as `make test` does: the project with the backend's extra (which brings none), the
        # pair's pins (the extra's lower bounds) and the test tools, through the declared ranges.
        if _run(pip + ["install", "--quiet", "-e", f"{ROOT}[{pair['backend']}]", *pair["requirements"],
                       *BACKEND_EXTRAS, *wanted["tools"]], log):
            return "install failed (see the log): the declared ranges may refuse this pair"
    elif not pair["nightly"]:
        # Through the declared ranges: a pair that pyproject.toml refuses fails here.
        if _run(pip + ["install", "--quiet", "-e", f"{ROOT}[tensorflow]", *pair["requirements"], *wanted["tools"]],
                log):
            return "install failed (see the log): the declared ranges may refuse this pair"
    else:
        if _run(pip + ["install", "--quiet", "--pre", *pair["requirements"], *wanted["tools"]], log):
            return "install failed (see the log)"
        # A nightly may pull the released `keras` or `tensorflow`, which share its import package.
        if _run(pip + ["uninstall", "--quiet", "--yes", "keras", "tensorflow"], log) == 0:
            _run(pip + ["install", "--quiet", "--pre", "--no-deps", "--force-reinstall", *pair["requirements"]], log)
        if _run(pip + ["install", "--quiet", "--no-deps", "-e", str(ROOT)], log):
            return "install of the project failed (see the log)"
    stamp.write_text(json.dumps(wanted))
    return None


def _summary_counts(output):
    """(passed, failed, errors, skipped) from pytest's closing line."""
    counts = {kind: 0 for kind in ("passed", "failed", "error", "skipped")}
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|errors?)\b", line)]
    for number, kind in re.findall(r"(\d+) (passed|failed|error|skipped)", lines[-1] if lines else ""):
        counts[kind] = int(number)
    return counts["passed"], counts["failed"], counts["error"], counts["skipped"]


def run_pair(pair, venvs, fresh):
    """Builds the pair's environment and runs the core tests there: one row of the table (a dict)."""
    venv = venvs / pair["name"]
    log = venvs / f"{pair['name']}.log"
    venvs.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    start = time.monotonic()
    backend = BACKENDS[pair["backend"]]
    row = {"pair": pair["name"], "blocking": pair["blocking"], "date": datetime.date.today().isoformat(),
           "backend": backend["name"], "version": "-", "keras": "-", "python": "-", "passed": 0, "failed": 0, "errors": 0, "skipped": 0,
           "minutes": 0.0, "log": str(log)}
    row["problem"] = build_venv(pair, venv, log, fresh)
    python = str(venv / "bin" / "python")
    if row["problem"] is None:
        found = subprocess.run([python, "-c", _versions_probe(pair["backend"])], capture_output=True, text=True,
                               env=_environment("3", pair["backend"]))
        if found.returncode:
            row["problem"] = "import failed: " + (found.stderr.strip().splitlines() or ["?"])[-1]
        else:
            row["version"], row["keras"], row["python"] = json.loads(found.stdout.strip().splitlines()[-1])
    if row["problem"] is None:
        tests = subprocess.run([python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "not slow",
                                *backend["tests"]],
                               cwd=ROOT, capture_output=True, text=True,
                               env=_environment("2", pair["backend"]))
        with open(log, "a") as stream:
            stream.write(tests.stdout + tests.stderr)
        row["passed"], row["failed"], row["errors"], row["skipped"] = _summary_counts(tests.stdout)
        if tests.returncode:
            row["problem"] = f"core tests failed (exit {tests.returncode})"
    row["minutes"] = round((time.monotonic() - start) / 60, 1)
    return row


def table(rows):
    """The rows as a Markdown table."""
    lines = ["| pair | backend | Keras | Python | passed | failed | errors | skipped | result | date |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        result = "ok" if row["problem"] is None else "FAILED" if row["blocking"] else "failed (not blocking)"
        lines.append(f"| {row['pair']} | {row['backend']} {row['version']} | {row['keras']} | {row['python']} | {row['passed']} "
                     f"| {row['failed']} | {row['errors']} | {row['skipped']} | {result} | {row['date']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", help="comma-separated pair names (default: every pair)")
    parser.add_argument("--venvs", type=pathlib.Path, default=ROOT / ".compat",
                        help="where the virtual environments go (default: .compat)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the environments even if they are there")
    args = parser.parse_args(argv)
    pairs = load_pairs()
    if args.pairs:
        wanted = args.pairs.split(",")
        unknown = sorted(set(wanted) - {pair["name"] for pair in pairs})
        if unknown:
            parser.error(f"no such pair {unknown} in {PAIRS_FILE.name}")
        pairs = [pair for pair in pairs if pair["name"] in wanted]
    rows = []
    for pair in pairs:
        print(f"compat: {pair['name']} ({' '.join(pair['requirements'])}) ...", flush=True)
        rows.append(run_pair(pair, args.venvs.resolve(), args.fresh))
        row = rows[-1]
        print(f"compat: {pair['name']}: {row['problem'] or 'ok'}; {row['passed']} passed, {row['failed']} failed, "
              f"{row['errors']} errors, {row['skipped']} skipped, {row['minutes']} min; log {row['log']}", flush=True)
    print(table(rows))
    broken = [row for row in rows if row["problem"] and row["blocking"]]
    for row in rows:
        if row["problem"]:
            kind = "FAILED" if row["blocking"] else "failed, not blocking"
            print(f"compat: {kind}: {row['pair']} ({row['backend']} {row['version']}, Keras {row['keras']}): "
                  f"{row['problem']}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
