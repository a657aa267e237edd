"""The backends benchmark's quick mode runs on this backend and ends with its JSON line (no timing asserted)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import BACKEND

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "backends_overhead.py"


def test_backends_overhead_quick_prints_the_ratio_to_keras_sgd(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--steps-per-update", "2"], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path, env={**os.environ, "KERAS_BACKEND": BACKEND})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["backend"] == BACKEND and summary["accumulation_steps"] == 2
    row = summary["results"]["mlp_small"]
    assert row["parameters"] == 784 * 128 + 128 + 128 * 10 + 10
    assert row["ratio_q1"] <= row["ratio_median"] <= row["ratio_q3"]
    assert row["keras_ms_per_update"] > 0 and row["adascale_ms_per_update"] > 0


def test_jax_data_parallel_quick_prints_the_ratios_and_the_memory(tmp_path):
    if BACKEND != "jax":
        pytest.skip("keras.distribution on JAX")
    script = SCRIPT.parent / "jax_data_parallel.py"
    result = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env={**os.environ, "KERAS_BACKEND": "jax"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["devices"] == 4
    row = summary["results"]["mlp"]
    assert row["parameters"] == 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    for label in ("adascale", "vmap"):
        assert row[f"{label}_ratio"]["q1"] <= row[f"{label}_ratio"]["median"] <= row[f"{label}_ratio"]["q3"]
    for label in ("keras", "adascale", "vmap"):
        memory = row[f"{label}_memory"]
        assert memory["temp_mib"] > 0 and memory["argument_mib"] > 0 and memory["all_reduces"] >= 1


def quick_jax_run(name, tmp_path):
    """`benchmarks/<name>.py --quick` on JAX: `(printed lines, the summary it prints last)`; the JSON it writes is
    that summary."""
    result = subprocess.run([sys.executable, str(SCRIPT.parent / f"{name}.py"), "--quick", "--output-dir",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "KERAS_BACKEND": "jax"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert json.loads((tmp_path / "out" / f"{name}.json").read_text()) == summary
    return lines, summary


def test_multiprocess_step_quick_prints_both_topologies_and_writes_the_json(tmp_path):
    if BACKEND != "jax":
        pytest.skip("several JAX processes (keras.distribution on JAX)")
    lines, summary = quick_jax_run("multiprocess_step", tmp_path)
    assert [(row["topology"], row["model"]) for row in summary["results"]] == [("2x2", "mlp_small"),
                                                                              ("1x4", "mlp_small")]
    parameters = 784 * 128 + 128 + 128 * 10 + 10
    for row in summary["results"]:
        assert row["parameters"] == parameters and len(row["per_process"]) == len(row["peak_rss_mib"])
        assert len(row["per_process"]) == row["processes"] and row["processes"] * row["devices_per_process"] == 4
        assert row["keras_ms"] > 0 and row["adascale_ms"] > 0
        assert row["ratio"]["q1"] <= row["ratio"]["median"] <= row["ratio"]["q3"]
        for label in ("keras", "adascale"):
            memory = row["memory"][label]
            assert memory["model_bytes"] == 4 * parameters  # float32, every variable whole on each device
            assert memory["optimizer_bytes"] >= 4 * parameters  # the momentum at least
            assert memory["temp_mib"] > 0 and memory["all_reduces"] >= 1
        assert 0 < row["memory"]["adascale"]["optimizer_bytes"] - row["memory"]["keras"]["optimizer_bytes"] < 200
        assert all(rss > 100 for rss in row["peak_rss_mib"])
        printed = next(line for line in lines if line.split()[:2] == [row["topology"], "mlp_small"]).split()
        assert printed[3:6] == [f"{row['keras_ms']:.2f}", f"{row['adascale_ms']:.2f}", f"{row['ratio']['median']:.3f}"]


def test_groups_cost_quick_prints_the_five_steps_and_writes_the_json(tmp_path):
    if BACKEND != "jax":
        pytest.skip("AdaScaleModel(groups=n): Keras's JAX backend only for now")
    lines, summary = quick_jax_run("groups_cost", tmp_path)
    assert summary["batch"] == 32 and summary["groups"] == [4]
    rows = summary["results"]
    assert [(row["model"], row["groups"], row["variant"]) for row in rows] == [
        ("cnn_tiny", 4, variant) for variant in ("keras", "adascale_sgd", "one_pass", "vmap", "accumulation")]
    parameters = 3 * 3 * 4 + 4 + 6 * 6 * 4 * 10 + 10
    for row in rows:
        assert row["parameters"] == parameters and row["ms_per_update"] > 0
        assert row["temp_mib"] > 0 and row["argument_mib"] > 0
        printed = next(line for line in lines if line.split()[:3] == ["cnn_tiny", "4", row["variant"]]).split()
        assert printed[3] == f"{row['ms_per_update']:.2f}"
        if row["variant"] == "keras":
            assert row["ratio"] is None
        else:
            assert 0 < row["ratio"]["q1"] <= row["ratio"]["median"] <= row["ratio"]["q3"]


def test_groups_cost_quick_off_jax_times_the_three_steps_there_are(tmp_path):
    """On PyTorch (`--backend torch`): Keras's step, AdaScaleSGD alone and accumulation; no groups, no memory."""
    if BACKEND != "torch":
        pytest.skip("the run off JAX (PyTorch's here; TensorFlow's in the TensorFlow environment)")
    result = subprocess.run([sys.executable, str(SCRIPT.parent / "groups_cost.py"), "--quick", "--backend", "torch",
                             "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={**os.environ, "KERAS_BACKEND": "torch"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "out" / "groups_cost_torch.json").read_text()) == summary
    assert summary["backend"] == "torch" and summary["command"].endswith("--backend torch")
    assert [row["variant"] for row in summary["results"]] == ["keras", "adascale_sgd", "accumulation"]
    for row in summary["results"]:
        assert row["ms_per_update"] > 0 and row["temp_mib"] is None
        assert row["ratio"] is None if row["variant"] == "keras" else row["ratio"]["q1"] <= row["ratio"]["q3"]
