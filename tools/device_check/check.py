"""The device check's one command, run on a lent GPU machine (see docs/contributing.md, "The device check").

    PYTHONUNBUFFERED=1 python3 tools/device_check/check.py                # there, with .device-check carried
    python tools/device_check/check.py --quick --no-install --out DIR     # here, on CPU: the quick mode (a test)

It installs the wheels that `make device-check` put in `--wheels` (Keras, the packages of Keras's the image lacks,
this project) with `pip install --no-index --no-deps --target` into a folder of its own, which the parts find on
PYTHONPATH (the image's packages stay as they are); then runs each part (parts.py) in its own process with its
KERAS_BACKEND and a time limit of its own, so that the whole ends within 8 minutes:
- jax_overhead, torch_overhead: AdaScaleSGD / keras.optimizers.SGD with the same accumulation (k = 4) on the
  5.8M MLP and on ResNet-18 at CIFAR's shape (synthetic data, batch 128); on JAX also AdaScaleModel against
  keras.Model's own step (one device); on PyTorch also the host reads per micro-batch;
- demo_jax, demo_torch: the demo's recipe (real MNIST from the carried file, NumPy arrays) trained with AdaScale
  at S = 4 by accumulation on the device: wall time, updates, test accuracy.
It prints the tables and writes `--out`/device_check.json (default $OUT) with the device's name (nvidia-smi), the
driver and the versions, and each part's log beside it. A part that fails or outlasts its limit is reported as
such, with what it had measured; the others run on.
"""

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
WHEELS = ".device-check"  # what `make device-check` fills (ignored by git), carried to the device
MNIST_FILE = "mnist.pkl.gz"
# (part, backend, parts.py's subcommand, seconds allowed: full, quick). The full limits and the install add up to
# under 8 minutes: the ResNet-18 compilations on JAX are the largest unknown.
PARTS = [
    ("jax_overhead", "jax", "overhead", 160, 90),
    ("demo_jax", "jax", "demo", 60, 60),
    ("torch_overhead", "torch", "overhead", 120, 90),
    ("demo_torch", "torch", "demo", 90, 60),
]
INSTALL_SECONDS = 40
PACKAGES = ("keras", "keras-adascale", "jax", "jaxlib", "torch", "numpy", "optree", "namex", "ml-dtypes", "h5py")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and steps; the demo on a few hundred examples")
    parser.add_argument("--backends", default="jax,torch", help="comma-separated: the parts of these backends")
    parser.add_argument("--wheels", default=str(ROOT / WHEELS), help="the folder `make device-check` filled")
    parser.add_argument("--no-install", action="store_true",
                        help="use this Python's own packages (Keras and the project installed), not the wheels")
    parser.add_argument("--mnist", default=None, help=f"the MNIST file (default: {MNIST_FILE} in --wheels)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "device_check"),
                        help="where device_check.json and the logs go (default $OUT)")
    args = parser.parse_args(argv)
    args.backends = args.backends.split(",")
    unknown = set(args.backends) - {"jax", "torch"}
    if unknown:
        parser.error(f"--backends: jax or torch, not {sorted(unknown)}")
    args.mnist = args.mnist or str(pathlib.Path(args.wheels) / MNIST_FILE)
    return args


def install(wheels, site):
    """The wheels into `site` (no index, no dependencies: the image has the rest); returns pip's output."""
    found = sorted(pathlib.Path(wheels).glob("*.whl"))
    if not found:
        raise SystemExit(f"no wheels in {wheels}: run `make device-check` here first and carry {WHEELS}")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_SECONDS)
    if result.returncode:
        raise SystemExit(f"pip install of the wheels failed:\n{result.stdout}{result.stderr}")
    return [path.name for path in found]


def sources_digest(package_root):
    """A digest of the package's .py files, to tell whether the installed wheel is this working tree's."""
    digest = hashlib.sha256()
    for path in sorted(package_root.rglob("*.py")):
        digest.update(path.relative_to(package_root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def nvidia_smi():
    """The GPU's name, memory and driver, or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=30)
    if result.returncode:
        return {"error": (result.stdout + result.stderr).strip()[-500:]}
    name, memory, driver = [field.strip() for field in result.stdout.strip().splitlines()[0].split(",")]
    return {"name": name, "memory": memory, "driver": driver}


def versions(site):
    """The versions the parts import (the installed wheels first, as on their PYTHONPATH)."""
    paths = ([str(site)] if site else []) + sys.path
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        distribution = next(iter(importlib.metadata.distributions(name=name, path=paths)), None)
        found[name] = None if distribution is None else distribution.version
    return found


def run_part(args, name, backend, command, seconds, environment, scratch):
    """One part in its own process, stopped after `seconds`: its result, with its status and duration."""
    result_file = scratch / f"{name}.json"
    log = pathlib.Path(args.out) / f"{name}.log"
    arguments = [sys.executable, str(ROOT / "tools" / "device_check" / "parts.py"), command,
                 "--result", str(result_file), "--budget", str(seconds)]
    if args.quick:
        arguments.append("--quick")
    if command == "demo":
        arguments += ["--mnist", args.mnist]
    began = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen(arguments, stdout=output, stderr=subprocess.STDOUT, cwd=scratch,
                                   env={**environment, "KERAS_BACKEND": backend}, start_new_session=True)
        try:
            status = "ok" if process.wait(timeout=seconds) == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            status = "timed_out"
    part = json.loads(result_file.read_text()) if result_file.exists() else {}
    part.update(status=status, seconds=time.perf_counter() - began, limit_s=seconds)
    if status != "ok":
        part["log_tail"] = log.read_text()[-3000:]
    return part


def print_tables(report):
    device, versions_found = report["device"], report["versions"]
    gpu = device["nvidia_smi"] or {}
    print(f"\nDevice: {gpu.get('name', 'no nvidia-smi')} ({gpu.get('memory', '-')}, driver {gpu.get('driver', '-')}); "
          + ", ".join(f"{name} {version}" for name, version in versions_found.items() if version))
    parts = report["parts"]
    for name, part in parts.items():
        if part["status"] != "ok":
            print(f"{name}: {part['status'].upper()} after {part['seconds']:.0f} s (limit {part['limit_s']} s); "
                  f"log tail:\n{part.get('log_tail', '')[-1500:]}")
    overheads = [part for part in parts.values() if part.get("part") == "overhead"]
    if overheads:
        first = overheads[0]
        print(f"\nAdaScaleSGD / keras.optimizers.SGD, both momentum 0.9 and gradient_accumulation_steps="
              f"{first['accumulation_steps']}, batch {first['batch']}, {first['updates_per_window']} updates per "
              "window; ms per update (medians), ratio median [q1 - q3] within rounds:")
        print(f"{'backend':>7} {'model':>11} {'params':>10} {'rounds':>6} {'SGD ms':>8} {'AdaScale ms':>11} "
              f"{'ratio':>6} {'quartiles':>13}   AdaScaleModel / keras.Model (both AdaScaleSGD)")
        for part in overheads:
            for model, row in part["results"].items():
                ms, ratio = row["ms_per_update"], row["ratios"]["adascale/keras"]
                wrapper = row["ratios"].get("adascale_model/adascale")
                wrapper = (f"{wrapper['median']:.3f} [{wrapper['q1']:.3f} - {wrapper['q3']:.3f}]" if wrapper
                           else "-")
                print(f"{part['backend']:>7} {model:>11} {row['parameters']:>10,} {row['rounds']:>6} "
                      f"{ms['keras']:>8.2f} {ms['adascale']:>11.2f} {ratio['median']:>6.3f} "
                      f"[{ratio['q1']:.3f} - {ratio['q3']:.3f}]   {wrapper}")
    torch_parts = [part for part in overheads if part["backend"] == "torch"]
    if torch_parts:
        print(f"\nPyTorch host reads per micro-batch ({torch_parts[0]['host_reads_counted']}):")
        print(f"{'model':>11} {'optimizer':>9} {'reads':>6} {'on GPU':>6} {'CUDA syncs':>10}   by kind")
        for model, row in torch_parts[0]["results"].items():
            for optimizer, reads in row["host_reads"].items():
                syncs = reads["cuda_syncs_per_micro_batch"]
                print(f"{model:>11} {optimizer:>9} {reads['per_micro_batch']:>6.2f} "
                      f"{reads['on_accelerator_per_micro_batch']:>6.2f} "
                      f"{'-' if syncs is None else format(syncs, '.2f'):>10}   "
                      + ", ".join(f"{kind} {count:.2f}" for kind, count in reads["by_kind"].items()))
                for site, count in reads["by_site"].items():
                    print(f"{'':>47} {count:.2f} {site}")
    demos = [part for part in parts.values() if part.get("part") == "demo"]
    if demos:
        first = demos[0]
        print(f"\nThe demo's recipe with AdaScale at S = {first['scale']} by accumulation "
              f"(batch {first['batch_size']}, T_SI {first['total_steps']:,}, {first['train_examples']:,} / "
              f"{first['test_examples']:,} MNIST images):")
        print(f"{'backend':>7} {'wall s':>7} {'updates':>7} {'micro-batches':>13} {'tau':>7} {'gain':>5} "
              f"{'test acc':>8}")
        for part in demos:
            gain = part["mean_gain"]
            note = "" if part["reached_total_steps"] else "  (stopped at its time limit before T_SI)"
            print(f"{part['backend']:>7} {part['wall_s']:>7.1f} {part['updates']:>7,} {part['micro_batches']:>13,} "
                  f"{part['scale_invariant_iterations']:>7.0f} {'-' if gain is None else format(gain, '.2f'):>5} "
                  f"{100 * part['test_accuracy']:>7.2f}%{note}")


def main(argv=None):
    args = parse_args(argv)
    began = time.perf_counter()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="device_check_"))
    environment = dict(os.environ)
    # One device per part: without the host devices that the JAX tests ask XLA for (tests_backends/conftest.py).
    environment["XLA_FLAGS"] = " ".join(flag for flag in environment.get("XLA_FLAGS", "").split()
                                        if not flag.startswith("--xla_force_host_platform_device_count"))
    environment["PYTHONUNBUFFERED"] = "1"
    site, installed = None, []
    if not args.no_install:
        site = scratch / "site"
        installed = install(args.wheels, site)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    selected = [part for part in PARTS if part[1] in args.backends]
    if any(command == "demo" for _, _, command, _, _ in selected) and not pathlib.Path(args.mnist).exists():
        raise SystemExit(f"no MNIST file at {args.mnist}: run `make device-check` here first, or give --mnist")
    report = {"command": "tools/device_check/check.py" + (" --quick" if args.quick else ""),
              "date": datetime.date.today().isoformat(), "quick": args.quick,
              "device": {"nvidia_smi": nvidia_smi(), "machine": platform.machine()},
              "versions": versions(site), "installed_wheels": installed}
    if site is not None:
        report["project_wheel_matches_tree"] = (
            sources_digest(site / "keras_adascale") == sources_digest(ROOT / "keras_adascale"))
        if not report["project_wheel_matches_tree"]:
            print("WARNING: the keras_adascale wheel is not this working tree's: run `make device-check` again")
    limits = {name: quick if args.quick else full for name, _, _, full, quick in selected}
    print(f"device check: parts {', '.join(f'{name} ({seconds} s)' for name, seconds in limits.items())}; "
          f"{sum(limits.values())} s at most, after {time.perf_counter() - began:.0f} s of set-up", flush=True)
    report["parts"] = {}
    for name, backend, command, _, _ in selected:
        part = run_part(args, name, backend, command, limits[name], environment, scratch)
        report["parts"][name] = part
        print(f"{name}: {part['status']} in {part['seconds']:.0f} s", flush=True)
        (out / "device_check.json").write_text(json.dumps(report, indent=1))
    report["seconds"] = time.perf_counter() - began
    (out / "device_check.json").write_text(json.dumps(report, indent=1))
    print_tables(report)
    print(f"\n{out / 'device_check.json'} written; {report['seconds']:.0f} s in all")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0 if all(part["status"] == "ok" for part in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
