"""AdaScaleModel across several JAX processes on 127.0.0.1 (issue 40): the topology of a multi-host job.

As tests/test_multi_worker.py starts TensorFlow's workers, these start real processes (keras_adascale.launch:
Keras's distribution variables, each process under `timeout -k`, fail-fast timeouts, free ports) that run
tests_backends/multiprocess_worker.py under `DataParallel(devices=keras.distribution.list_devices())`, each
process feeding its own part of every global batch, and compare what every process saw with the NumPy
reference and with the other processes'. One job per topology runs all its checks (a process costs ~10 s to
start on 2 cores): 2 processes x 2 host devices and 4 processes x 1, R = 4 devices on the batch axis.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import BACKEND
from keras_adascale import launch
from problems import BATCH, LeastSquares, assert_same_history, reference_history, replay_reference
from reference import AdaScaleAdamReference, AdaScaleReference

pytestmark = pytest.mark.skipif(BACKEND != "jax", reason="several JAX processes (keras.distribution on JAX)")

WORKER = str(pathlib.Path(__file__).with_name("multiprocess_worker.py"))
REPLICAS = 4
TIMEOUT = 240  # seconds a process may run
COLLECTIVE_TIMEOUT = 45  # above the compile skew of processes on 2 loaded cores
_JOBS = {}


def run_job(tmp_path_factory, processes, devices):
    """Every process's report of the `train` job on `processes` x `devices` (run once per module)."""
    if (processes, devices) not in _JOBS:
        out = tmp_path_factory.mktemp(f"job_{processes}x{devices}")
        extras = ["extras"] if (processes, devices) == (2, 2) else []
        launch.launch([sys.executable, WORKER, "train", str(out), *extras], processes, cpu_devices=devices,
                      timeout=TIMEOUT, collective_timeout=COLLECTIVE_TIMEOUT)  # raises with every output
        _JOBS[processes, devices] = [json.loads((out / f"p{index}.json").read_text()) for index in range(processes)]
    return _JOBS[processes, devices]


@pytest.fixture(scope="module", params=[(2, 2), (4, 1)], ids=["2_processes_x_2_devices", "4_processes_x_1_device"])
def job(request, tmp_path_factory):
    return run_job(tmp_path_factory, *request.param)


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory):
    return run_job(tmp_path_factory, 2, 2)


@pytest.fixture(scope="module")
def problem():
    return LeastSquares(num_examples=64 * BATCH, seed=3)


def test_every_process_sees_every_device_and_feeds_its_part_of_the_global_batch(job):
    processes = len(job)
    for index, report in enumerate(job):
        assert report["process_id"] == index and report["num_processes"] == processes
        assert report["replicas"] == REPLICAS and report["local_devices"] == REPLICAS // processes
        assert report["rows_fed"] == REPLICAS // processes * BATCH
        # every step traced saw the global batch: R x BATCH rows (the worker's step raises otherwise)
        assert report["seen_rows"] == [REPLICAS * BATCH]


@pytest.mark.parametrize("name,steps", [("sgd", 1), ("sgd", 2), ("adam", 1), ("adam", 2)],
                         ids=["sgd_n4", "sgd_n8_k2", "adam_n4", "adam_n8_k2"])
def test_every_process_matches_the_reference_update_by_update(job, problem, name, steps):
    samples = REPLICAS * steps
    if name == "adam":
        adam = AdaScaleAdamReference(problem.initial, 0.05, scale=samples, beta_1=0.9, beta_2=0.99)
        _, expected = reference_history(problem, samples, 4, reference=adam)
    else:
        _, expected = reference_history(problem, samples, 4, learning_rate=0.05, momentum=0.9)
    assert 1.0 < expected[-1][1] < samples  # the gain is measured, not 1 or N
    for report in job:
        assert_same_history([(np.asarray(w), g, t) for w, g, t in report[f"{name}_k{steps}"]], expected)


def test_every_process_ends_with_the_same_weights_gain_and_tau(job):
    # Bit for bit: every process holds the replicated state of one SPMD program (but its own clock: goodput's
    # times, compared in the goodput test).
    def shared(report):
        kept = {key: value for key, value in report.items() if key not in ("process_id", "goodput")}
        if "goodput" in report:
            kept["goodput"] = {key: value for key, value in report["goodput"].items() if key != "timed"}
        return kept

    for report in job[1:]:
        assert shared(report) == shared(job[0])


def test_a_process_feeding_the_full_batch_fails_the_step_s_shape_check(two_by_two):
    # Every process passing the whole global batch (not its part): Keras builds a batch of duplicated rows,
    # twice as long, which a mean loss would not tell apart; the step's check does.
    for report in two_by_two:
        assert report["full_batch_error"] == (f"the train step got a global batch of {2 * REPLICAS * BATCH} rows, "
                                              f"not {REPLICAS * BATCH} (R = {REPLICAS} devices x {BATCH})")


def test_fit_checks_each_process_s_batches_over_its_own_devices_and_that_the_processes_agree(two_by_two):
    for report in two_by_two:
        checks = report["batch_checks"]
        # 6 rows per process over its 2 devices: a global batch of 12 over 4 (R would not divide 6)
        assert checks["per_process_batch"] is None
        assert checks["indivisible_per_process_batch"] == (
            "AdaScaleModel under keras.distribution across 2 processes splits the batch that each process feeds (its "
            "per-process batch, its part of the global batch) over that process's 2 devices of the batch axis (4 in "
            "all), and the per-process batch size 7 does not divide by them: JAX would fail at that batch. To train, "
            "give every process a per-process batch size that does (6, say).")
        assert checks["rows_differ"] == (
            "AdaScaleModel.fit across 2 JAX processes needs every process to train the same steps (each feeds its own "
            "part of every global batch), and their calls differ: process 0: rows 8, batch_size 4, epochs 1, "
            "initial_epoch 0; process 1: rows 4, batch_size 4, epochs 1, initial_epoch 0. Give every process as many "
            "rows, the same per-process batch size and the same epochs.")


def test_autoscale_decides_the_same_at_the_same_update_in_every_process(two_by_two, problem):
    runs = [report["autoscale"] for report in two_by_two]
    assert runs[0]["changes"] and runs[0]["steps"] == runs[0]["changes"][-1]["steps"] != 2
    for run in runs[1:]:
        assert run["changes"] == runs[0]["changes"] and run["updates"] == runs[0]["updates"]
        assert run["history"] == runs[0]["history"]
    run = runs[0]
    assert run["samples_per_update"] == REPLICAS * run["steps"]
    assert [scale for _, _, scale in run["updates"]] == [REPLICAS * (stop - first) for first, stop, _ in run["updates"]]
    assert len({scale for _, _, scale in run["updates"]}) > 1
    reference = AdaScaleReference(problem.initial, 0.01, scale=REPLICAS * 2, momentum=0.9)
    expected = replay_reference(problem, run["updates"], reference, samples_per_batch=REPLICAS)
    assert_same_history([(np.asarray(w), g, t) for w, g, t in run["history"]], expected)


def test_autoscale_s_goodput_decides_from_the_processes_mean_times_the_same_in_every_process(two_by_two):
    runs = [report["goodput"] for report in two_by_two]
    # Each process put in its own times (k = 1: 0.1 and 0.2 s, k = 2: 0.5 and 1.5 s); each got the mean back.
    for run in runs:
        assert run["agreed"] == pytest.approx({"1": 0.15, "2": 1.0})
    assert runs[1]["timed"] != runs[0]["timed"]  # each process's own clock
    assert runs[1]["changes"] == runs[0]["changes"]


def test_a_model_saved_mid_update_and_loaded_in_every_process_resumes_to_the_uninterrupted_run(two_by_two, problem):
    _, expected = reference_history(problem, 2 * REPLICAS, 4, learning_rate=0.05, momentum=0.9)
    for report in two_by_two:
        resumed = report["resumed"]
        assert resumed["class"] == "AdaScaleFunctional" and resumed["samples_per_update"] == 2 * REPLICAS
        history = [(np.asarray(w), g, t) for w, g, t in resumed["history"]]
        assert_same_history(history, expected)
        uninterrupted = [(np.asarray(w), g, t) for w, g, t in report["sgd_k2"]]
        for (weights, gain, tau), (straight, straight_gain, straight_tau) in zip(history, uninterrupted, strict=True):
            np.testing.assert_allclose(weights, straight, rtol=1e-6, atol=1e-7)
            assert gain == pytest.approx(straight_gain, rel=1e-6) and tau == pytest.approx(straight_tau, rel=1e-6)


def _gone(pid, wait=10.0):
    """Whether process `pid` has exited (a zombie counts) within `wait` seconds: SIGKILL takes a moment."""
    deadline = time.monotonic() + wait
    while True:
        try:
            state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_a_killed_process_fails_the_others_within_a_minute_and_leaves_no_process(tmp_path):
    # Process 1 SIGKILLs itself at its fourth step; process 0 (the coordinator) must fail on its own, with
    # JAX's message, well before the launcher's grace would end it.
    started = time.time()
    results = launch.launch([sys.executable, WORKER, "kill", str(tmp_path), "1", "3"], 2, cpu_devices=1,
                            timeout=TIMEOUT, collective_timeout=COLLECTIVE_TIMEOUT, grace=120, check=False,
                            tail_lines=400)
    killed = float((tmp_path / "killed").read_text())
    survivor, victim = results
    assert victim.returncode == -signal.SIGKILL and not victim.killed_by_launcher
    assert survivor.returncode != 0 and not survivor.killed_by_launcher, survivor.describe()
    assert started + survivor.seconds - killed < 60, survivor.describe()
    assert "another task died" in survivor.output and "Task 1 heartbeat timeout" in survivor.output
    assert not (tmp_path / "p0.json").exists()  # it did not finish its fit
    for index, result in enumerate(results):
        assert _gone(int((tmp_path / f"pid{index}").read_text())) and _gone(result.pid)
    with pytest.raises(ProcessLookupError):
        os.killpg(results[0].pid, 0)


# The launcher itself, on plain Python processes (no JAX): a second each.

REPORT_ENVIRONMENT = ("import json, os; print('ENV ' + json.dumps({name: os.environ.get(name) for name in "
                      "('KERAS_DISTRIBUTION_JOB_ADDRESSES', 'KERAS_DISTRIBUTION_NUM_PROCESSES', "
                      "'KERAS_DISTRIBUTION_PROCESS_ID', 'XLA_FLAGS', 'JAX_NUM_CPU_DEVICES', 'JAX_PLATFORMS')}))")


def test_each_process_gets_keras_distribution_variables_and_the_fail_fast_flags():
    base = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_cpu_enable_fast_math=false")
    results = launch.launch([sys.executable, "-c", REPORT_ENVIRONMENT], 3, cpu_devices=2, collective_timeout=30,
                            env=base, timeout=60)
    seen = [json.loads(result.output.split("ENV ", 1)[1]) for result in results]
    addresses = seen[0]["KERAS_DISTRIBUTION_JOB_ADDRESSES"].split(",")
    assert len(set(addresses)) == 3 and all(address.startswith("127.0.0.1:") for address in addresses)
    for index, env in enumerate(seen):
        assert env["KERAS_DISTRIBUTION_JOB_ADDRESSES"] == ",".join(addresses)
        assert env["KERAS_DISTRIBUTION_NUM_PROCESSES"] == "3" and env["KERAS_DISTRIBUTION_PROCESS_ID"] == str(index)
        assert env["JAX_NUM_CPU_DEVICES"] == "2" and env["JAX_PLATFORMS"] == "cpu"
        assert sorted(env["XLA_FLAGS"].split()) == sorted(["--xla_cpu_enable_fast_math=false",
                                                           "--xla_force_host_platform_device_count=2",
                                                           "--xla_cpu_collective_timeout_seconds=30"])
    assert launch.job_from_environment(seen[2]) == launch.Job(2, 3, addresses[0])
    assert launch.job_from_environment({}) is None
    with pytest.raises(ValueError, match="KERAS_DISTRIBUTION_PROCESS_ID is not set"):
        launch.job_from_environment({"KERAS_DISTRIBUTION_JOB_ADDRESSES": "a:1,b:2",
                                     "KERAS_DISTRIBUTION_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="do not agree"):
        launch.job_from_environment({"KERAS_DISTRIBUTION_JOB_ADDRESSES": "a:1,b:2",
                                     "KERAS_DISTRIBUTION_NUM_PROCESSES": "3", "KERAS_DISTRIBUTION_PROCESS_ID": "0"})


# A process that, like one after jax.distributed.initialize, ignores SIGTERM, and starts a grandchild; process 1
# fails after half a second.
STUBBORN = r"""
import os, pathlib, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
index = int(os.environ["KERAS_DISTRIBUTION_PROCESS_ID"])
child = subprocess.Popen(["sleep", "300"])
pathlib.Path(sys.argv[1], f"pids{index}").write_text(f"{os.getpid()} {child.pid}")
print(f"process {index} up", flush=True)
if index == 1 and sys.argv[2] == "fail":
    time.sleep(0.5)
    sys.exit("process 1 gives up")
time.sleep(300)
"""


def _pids(path, processes):
    deadline = time.monotonic() + 30
    while not all((path / f"pids{index}").exists() for index in range(processes)):
        assert time.monotonic() < deadline, "the processes did not start"
        time.sleep(0.05)
    return [int(pid) for index in range(processes) for pid in (path / f"pids{index}").read_text().split()]


def test_a_failing_process_ends_the_others_after_the_grace_and_no_process_is_left(tmp_path):
    started = time.monotonic()
    with pytest.raises(launch.LaunchError) as raised:
        launch.launch([sys.executable, "-c", STUBBORN, str(tmp_path), "fail"], 3, grace=2, timeout=60)
    assert time.monotonic() - started < 20
    message = str(raised.value)
    assert message.startswith("process 1 of 3 failed first (exit code 1 after ")
    assert "process 0: killed by SIGKILL, ended by the launcher" in message and "process 1 gives up" in message
    assert [result.killed_by_launcher for result in raised.value.results] == [True, False, True]
    assert all(_gone(pid) for pid in _pids(tmp_path, 3))


def test_a_process_past_its_timeout_is_killed_though_it_ignores_sigterm(tmp_path):
    with pytest.raises(launch.LaunchError, match=r"failed first \(timed out, killed by SIGKILL after [23]\.\d s\)"):
        launch.launch([sys.executable, "-c", STUBBORN, str(tmp_path), "wait"], 1, timeout=2, kill_after=1)
    assert all(_gone(pid) for pid in _pids(tmp_path, 1))


def test_ctrl_c_in_the_launcher_kills_every_process(tmp_path):
    def interrupt():
        _pids(tmp_path, 2)
        os.kill(os.getpid(), signal.SIGINT)

    # Python's Ctrl-C handler, which a process started in the background (nohup, CI) does not get: SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=interrupt, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            launch.launch([sys.executable, "-c", STUBBORN, str(tmp_path), "wait"], 2, timeout=60)
    finally:
        signal.signal(signal.SIGINT, previous)
    pids = _pids(tmp_path, 2)
    assert all(_gone(pid) for pid in pids), subprocess.run(["ps", "-o", "pid,stat,cmd", "-p",
                                                           ",".join(map(str, pids))], capture_output=True).stdout
