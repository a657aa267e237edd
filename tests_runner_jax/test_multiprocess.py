"""`keras-adascale launch --processes 2 train ...`: a data_parallel run as a job of 2 JAX processes x 2 host devices
on 127.0.0.1 (the topology of a multi-host job, issue 40) ends where the same run on 1 process x 4 devices ends;
one process SIGKILLed mid-run fails the job in bounded time, leaves no process, and the rerun resumes from the
chief's last backup to the uninterrupted result."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ENV, assert_same_finished_models, read_jsonl, run, train_command

RECIPE = {
    "total_steps": 160, "evaluations": 4,
    "dataset": {"train_split": "train[:5%]", "test_split": "test[:5%]", "batch_size": 16},
    "model": {"name": "mlp", "hidden_units": [32]},
    "schedule": {"name": "piecewise_constant", "learning_rate": 0.1, "decay_at": [0.5]},
    "optimizer": {"scale": 4},
    "strategy": {"name": "data_parallel", "devices": 4},
}
TIMEOUT = 300  # seconds a job may take
# 2 processes x 2 devices against 1 x 4: the same global batches, the all-reduces summed in another order; after
# 40 updates the weights (~0.05) differ by up to ~4e-7 (measured). Within one job the processes are bit-identical.
ACROSS_TOPOLOGIES = {"rtol": 1e-4, "atol": 2e-6}


def launch_command(config, output, data_dir, processes=2):
    return [sys.executable, "-m", "keras_adascale", "launch", "--processes", str(processes), "--timeout", str(TIMEOUT),
            *train_command(config, output, f"dataset.data_dir={data_dir}")[3:]]


def job_processes(marker):
    """The pids of live processes whose command line holds `marker` (this job's output folder), with their
    KERAS_DISTRIBUTION_PROCESS_ID (None for the launcher)."""
    found = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if marker not in command or "keras_adascale" not in command:
                continue
            status = (entry / "status").read_text()
            if "State:\tZ" in status:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        ids = [item.split(b"=", 1)[1].decode() for item in environ if item.startswith(b"KERAS_DISTRIBUTION_PROCESS_ID=")]
        found[int(entry.name)] = int(ids[0]) if ids else None
    return found


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe")
    (folder / "mp.yaml").write_text(yaml.safe_dump(RECIPE))
    return folder / "mp.yaml"


@pytest.fixture(scope="module")
def one_process(recipe, tfds_data_dir, tmp_path_factory):
    """The run on 1 process x 4 host devices (`keras-adascale train`)."""
    output = tmp_path_factory.mktemp("one_process")
    result = run(train_command(recipe, output, f"dataset.data_dir={tfds_data_dir}"))
    assert result.returncode == 0, result.stderr[-3000:]
    return output / "mp" / "adascale"


def test_two_processes_end_where_one_process_with_four_devices_ends(recipe, one_process, tfds_data_dir, tmp_path):
    result = run(launch_command(recipe, tmp_path, tfds_data_dir), timeout=TIMEOUT + 60)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    chief = tmp_path / "mp" / "adascale"
    assert "[p0] [1/1] mp/adascale: adascale at S=4 on data_parallel" in result.stdout
    assert "[p1]" not in result.stdout  # process 0 speaks for the job
    # The chief writes the run folder; the other process writes <run>.process1 beside it; no backup is left.
    assert sorted(path.name for path in (tmp_path / "mp").iterdir()) == ["adascale", "adascale.process1",
                                                                          "comparison.png"]
    finals = [json.loads((folder / "final.json").read_text()) for folder in (one_process, chief)]
    assert finals[1]["replicas"] == 4 and finals[1]["accumulation"] == 1  # strategy.devices counts both processes'
    for key in ("updates", "tau", "test_accuracy"):
        assert finals[1][key] == pytest.approx(finals[0][key], rel=1e-6), key
    assert_same_finished_models(one_process / "model.keras", chief / "model.keras", **ACROSS_TOPOLOGIES)
    assert_same_finished_models(chief / "model.keras", tmp_path / "mp" / "adascale.process1" / "model.keras",
                                rtol=0, atol=0)
    rows = [read_jsonl(folder / "metrics.jsonl") for folder in (one_process, chief)]
    assert [row["update"] for row in rows[1]] == [row["update"] for row in rows[0]]
    assert [row["gain"] for row in rows[1]] == pytest.approx([row["gain"] for row in rows[0]], rel=1e-5)


def test_a_killed_process_fails_the_job_in_bounded_time_and_the_rerun_resumes_to_the_uninterrupted_run(
        recipe, one_process, tfds_data_dir, tmp_path):
    command = launch_command(recipe, tmp_path, tfds_data_dir)
    launcher = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metadata = tmp_path / "mp" / "adascale.incomplete" / "backup" / "training_metadata.json"
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (metadata.exists() and json.loads(metadata.read_text())["epoch"] >= 2):
            assert launcher.poll() is None, f"the job ended (exit code {launcher.returncode}) before epoch 2"
            assert time.monotonic() < deadline, "the job never backed up epoch 2"
            time.sleep(0.05)
        (victim,) = [pid for pid, index in job_processes(str(tmp_path)).items() if index == 1 and
                     "timeout" not in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        stdout, stderr = launcher.communicate(timeout=90)
        ended_after = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode != 0
    assert ended_after < 60, ended_after
    assert "process 1 of 2 failed first (killed by SIGKILL" in stderr, stderr[-3000:]
    assert not job_processes(str(tmp_path)), "a process of the job outlived it"
    assert not (tmp_path / "mp" / "adascale").exists()
    backed_up = json.loads(metadata.read_text())["epoch"]

    resumed = run(command, timeout=TIMEOUT + 60)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert f"resuming mp/adascale from epoch {backed_up}" in resumed.stdout
    assert_same_finished_models(one_process / "model.keras", tmp_path / "mp" / "adascale" / "model.keras",
                                **ACROSS_TOPOLOGIES)
    rows = [read_jsonl(folder / "metrics.jsonl") for folder in (one_process, tmp_path / "mp" / "adascale")]
    assert [row["update"] for row in rows[1]] == [row["update"] for row in rows[0]]  # no update logged twice
    assert [row["loss"] for row in rows[1]] == pytest.approx([row["loss"] for row in rows[0]], rel=1e-4)
