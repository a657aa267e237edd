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
