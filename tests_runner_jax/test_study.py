"""benchmarks/jax_runner_study.py's --quick mode: both backends train, each in its own process, and it ends with
its JSON summary. No timing or accuracy is asserted: the study measures, the test checks what it reports."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_the_quick_study_trains_the_run_on_both_backends_and_compares_them(tfds_data_dir, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TFDS_DATA_DIR": str(tfds_data_dir)}
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, str(REPO / "benchmarks" / "jax_runner_study.py"), "--quick",
               "--output-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["seeds"] == 1 and summary["quick"]
    assert (summary["tensorflow"]["replicas"], summary["jax"]["replicas"]) == (4, 4)
    assert summary["tensorflow"]["samples"] == summary["jax"]["samples"] == 4
    row = next(line for line in lines if line.startswith("| 0 |")).split("|")
    assert int(row[2].replace(",", "")) == summary["tensorflow"]["updates"][0]
    assert int(row[3].replace(",", "")) == summary["jax"]["updates"][0]
    # each backend's run is its own folder, and a second call keeps them (trains nothing)
    for backend in ("tensorflow", "jax"):
        final = json.loads((tmp_path / f"jax_runner_study_{backend}" / "adascale_seed0" / "final.json").read_text())
        assert final["updates"] == summary[backend]["updates"][0]
    again = subprocess.run(command + ["--report"], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier from the same config, kept") == 2
    assert json.loads(again.stdout.strip().splitlines()[-1]) == summary
