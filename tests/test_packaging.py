"""The package as a user gets it: the sdist and wheel that `python -m build` makes (twine-checked, one
version), that wheel alone in a fresh virtual environment, and the checks it makes before it needs what
it may lack (the runner's packages, Keras's TensorFlow backend)."""

import ast
import email
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The wheel test's whole budget: build, a fresh venv, `pip install` (TensorFlow from PyPI), a short fit.
BUDGET_SECONDS = 600
RUNNER_MODULES = ("yaml", "matplotlib", "tensorflow_datasets")

_FIT = """
import importlib.util, json
import numpy as np
import keras, keras_adascale

x = np.random.RandomState(0).randn(40, 3).astype("float32")
y = x @ np.array([[1.0], [-2.0], [0.5]], "float32") + 0.3
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=2)
model.compile(optimizer=optimizer, loss="mse")
history = model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)  # 10 steps, 5 updates
print(json.dumps({
    "steps": len(x) // 4,
    "updates": int(optimizer.iterations.numpy()),
    "tau": float(optimizer.scale_invariant_iterations),
    "loss": history.history["loss"][-1],
    "module": keras_adascale.__file__,
    "importable": {name: importlib.util.find_spec(name) is not None for name in %r},
}))
""" % (RUNNER_MODULES,)


def _clean_env():
    """The environment without this checkout on the path: the fresh venv must see only what it installed."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "PYTHONNOUSERSITE": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


class _Clock:
    """Runs commands within one deadline and records how long each phase took."""

    def __init__(self, seconds):
        self.deadline = time.monotonic() + seconds
        self.phases = {}

    def run(self, phase, command, **kwargs):
        left = self.deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"out of time before {phase}; so far {self.phases}")
        start = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, timeout=left, env=_clean_env(), **kwargs)
        self.phases[phase] = round(time.monotonic() - start, 1)
        return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """The project's sdist and wheel, built by `python -m build` (the wheel from the sdist, build isolation
    on) from a copy holding only what they ship: `(wheel, sdist, clock)`."""
    root = tmp_path_factory.mktemp("dist")
    source = root / "source"
    shutil.copytree(ROOT / "keras_adascale", source / "keras_adascale",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "CHANGELOG.md", "MANIFEST.in"):
        shutil.copy(ROOT / name, source / name)
    clock = _Clock(BUDGET_SECONDS)
    result = clock.run("build", [sys.executable, "-m", "build", "--outdir", str(root / "dist"), str(source)])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (wheel_path,) = (root / "dist").glob("keras_adascale-*.whl")
    (sdist_path,) = (root / "dist").glob("keras_adascale-*.tar.gz")
    return wheel_path, sdist_path, clock


@pytest.fixture(scope="module")
def wheel(dist):
    wheel_path, _, clock = dist
    return wheel_path, clock


def _source_version():
    """`__version__` as keras_adascale/__init__.py writes it (the one version source)."""
    tree = ast.parse((ROOT / "keras_adascale" / "__init__.py").read_text())
    (value,) = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and [getattr(target, "id", None) for target in node.targets] == ["__version__"]]
    return value


@pytest.mark.slow
def test_twine_check_passes_on_the_sdist_and_the_wheel(dist):
    wheel_path, sdist_path, clock = dist
    result = clock.run("twine", [sys.executable, "-m", "twine", "check", "--strict", str(wheel_path), str(sdist_path)])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert result.stdout.count("PASSED") == 2, result.stdout


@pytest.mark.slow
def test_the_sdist_and_the_wheel_carry_the_packages_one_version(dist):
    wheel_path, sdist_path, _ = dist
    version = _source_version()
    assert wheel_path.name.startswith(f"keras_adascale-{version}-")
    assert sdist_path.name == f"keras_adascale-{version}.tar.gz"
    with zipfile.ZipFile(wheel_path) as archive:
        metadata_name = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        metadata = email.message_from_string(archive.read(metadata_name).decode())
    assert metadata["Version"] == version
    assert "Programming Language :: Python :: 3.11" in metadata.get_all("Classifier")
    with tarfile.open(sdist_path) as archive:
        names = archive.getnames()
        (pkg_info,) = [name for name in names if name.count("/") == 1 and name.endswith("/PKG-INFO")]
        assert email.message_from_string(archive.extractfile(pkg_info).read().decode())["Version"] == version
    assert any(name.endswith("/CHANGELOG.md") for name in names)


def test_the_version_has_one_source():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "keras_adascale.__version__"}
    assert f"## {_source_version()} " in (ROOT / "CHANGELOG.md").read_text()


def _requirements(metadata):
    """{(name, extra or None): requested extras} from a wheel's Requires-Dist lines, names canonical."""
    found = {}
    for line in metadata.get_all("Requires-Dist"):
        match = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?[^;]*(?:;.*extra\s*==\s*[\"']([^\"']+))?", line)
        name = re.sub(r"[-_.]+", "-", match[1]).lower()
        found[(name, match[3])] = set((match[2] or "").replace(" ", "").split(",")) - {""}
    return found


@pytest.mark.slow
def test_the_wheel_requires_keras_and_numpy_and_puts_each_backend_and_the_runner_in_an_extra(wheel):
    path, _ = wheel
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        metadata_name = next(name for name in names if name.endswith(".dist-info/METADATA"))
        metadata = email.message_from_string(archive.read(metadata_name).decode())
        entry_points = archive.read(metadata_name.replace("METADATA", "entry_points.txt")).decode()
    requirements = _requirements(metadata)
    assert sorted(name for name, extra in requirements if extra is None) == ["keras", "numpy"]
    assert {name for name, extra in requirements if extra == "tensorflow"} == {"tensorflow"}
    assert {name for name, extra in requirements if extra == "jax"} == {"jax", "jaxlib", "keras"}
    assert {name for name, extra in requirements if extra == "torch"} == {"torch", "keras"}
    assert {name for name, extra in requirements if extra == "runner"} == {
        "keras-adascale", "tensorflow-datasets", "importlib-resources", "pyyaml", "matplotlib"}
    assert requirements[("keras-adascale", "runner")] == {"tensorflow"}  # tf.data, on every backend
    assert requirements[("keras-adascale", "examples")] == {"runner"}  # the tutorials get the runner too
    assert "keras_adascale/validation.py" in names and "keras_adascale/datasets/bundled_mnist.py" in names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    assert "keras-adascale = keras_adascale.__main__:main" in entry_points


@pytest.mark.slow
def test_the_wheel_alone_trains_in_a_fresh_venv_without_the_runners_packages(wheel, tmp_path):
    path, clock = wheel
    environment = tmp_path / "venv"
    python, script = environment / "bin" / "python", environment / "bin" / "keras-adascale"
    try:
        result = clock.run("venv", [sys.executable, "-m", "venv", str(environment)])
        assert result.returncode == 0, result.stderr[-3000:]
        result = clock.run("install", [str(python), "-m", "pip", "install", "--quiet", f"{path}[tensorflow]"])
        assert result.returncode == 0, result.stderr[-3000:]

        result = clock.run("fit", [str(python), "-c", _FIT], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert pathlib.Path(report["module"]).is_relative_to(environment)  # the installed copy, not the checkout
        assert report["steps"] == 10 and report["updates"] == 5
        assert 5 <= report["tau"] <= 10  # each update's gain lies in [1, S = 2]
        assert math.isfinite(report["loss"])
        assert report["importable"] == {name: False for name in RUNNER_MODULES}

        (tmp_path / "x.yaml").write_text("total_steps: 10\n")
        for phase, command in (("train", [str(script), "train", "x.yaml"]),
                               ("compare", [str(python), "-m", "keras_adascale", "compare", "runs"])):
            result = clock.run(phase, command, cwd=tmp_path)
            assert result.returncode == 2, result.stderr[-3000:]
            assert "pip install 'keras-adascale[runner]'" in result.stderr and "Traceback" not in result.stderr
    finally:
        print(f"wheel test phases (seconds): {clock.phases}")
        shutil.rmtree(environment, ignore_errors=True)  # ~2 GB


def test_the_command_line_without_the_runners_packages_names_the_extra_and_exits_2():
    # `sys.modules[name] = None` makes a package unimportable and invisible to `find_spec`.
    script = ("import sys; sys.modules['yaml'] = sys.modules['matplotlib'] = None; "
              "sys.argv = ['keras-adascale', 'train', 'missing.yaml']; "
              "from keras_adascale.__main__ import main; code = main(); "
              "print(sorted({'tensorflow', 'keras'} & set(sys.modules))); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "(missing here: pyyaml, matplotlib)" in result.stderr
    assert "Install them with: pip install 'keras-adascale[runner]'" in result.stderr
    assert result.stdout.strip() == "[]"  # said before TensorFlow is imported


def import_error_under(backend):
    """The last line `import keras_adascale` prints to stderr under KERAS_BACKEND=`backend`; it must fail."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", "import keras_adascale"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode != 0
    return result.stderr.strip().splitlines()[-1]


# Keras 3.15's numpy backend imports jax, which this environment lacks (the JAX and PyTorch tests have their
# own, tests_backends/): so Keras can load neither numpy nor jax here.
def test_importing_under_a_backend_keras_cannot_load_names_the_supported_ones():
    last_line = import_error_under("numpy")
    assert last_line.startswith("ImportError: keras_adascale needs Keras's TensorFlow, JAX or PyTorch backend"), \
        last_line
    assert "KERAS_BACKEND=numpy, which Keras could not load" in last_line
    assert "Set KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax or KERAS_BACKEND=torch." in last_line


def test_importing_under_a_supported_backend_that_is_not_installed_names_the_extra():
    last_line = import_error_under("jax")
    assert last_line.startswith("ImportError: KERAS_BACKEND=jax, which Keras could not load (No module named 'jax')"), \
        last_line
    assert last_line.endswith("Install it with keras-adascale's extra: pip install 'keras-adascale[jax]' "
                              "(in a clone: pip install -e '.[jax]').")


def test_a_keras_that_loaded_an_unsupported_backend_is_refused_naming_it(monkeypatch):
    # No other backend loads here: Keras is told it runs on one.
    import keras

    import keras_adascale

    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")
    with pytest.raises(ImportError, match="TensorFlow, JAX or PyTorch backend.*runs on its 'numpy' backend"):
        keras_adascale._require_backend(keras_adascale.BACKENDS,
                                        "keras_adascale needs Keras's TensorFlow, JAX or PyTorch backend")
    # what needs TensorFlow says so on JAX and PyTorch too
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    with pytest.raises(ImportError, match="needs Keras's TensorFlow backend here.*runs on its 'torch' backend"):
        keras_adascale._require_tensorflow_backend()


def test_the_runner_under_another_keras_backend_exits_2_naming_the_requirement(tmp_path):
    (tmp_path / "x.yaml").write_text("total_steps: 10\n")
    env = {**os.environ, "KERAS_BACKEND": "numpy", "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-m", "keras_adascale", "train", "x.yaml"], capture_output=True,
                            text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert ("keras-adascale: error: the experiment runner trains on Keras's TensorFlow backend (tf.distribute) or "
            "its JAX backend") in result.stderr
    assert "KERAS_BACKEND=numpy" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()
