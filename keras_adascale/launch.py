"""Several local processes of one JAX training job, started and joined the way Keras's distribution expects.

A multi-host JAX job (a TPU pod slice, a GPU cluster) is one process per host, all running the same program:
`keras.distribution.list_devices()` then lists every process's devices, and `keras.distribution.DataParallel`
spans them. This module starts such a job on one machine, each process on 127.0.0.1 (the topology of a
multi-host job, for tests and for a machine with several accelerators), and lets each process join it:

    # the launcher (one process)
    results = launch([sys.executable, "train.py"], num_processes=2, cpu_devices=2, timeout=600)

    # train.py (every process), before anything else uses JAX
    from keras_adascale import launch
    job = launch.join()
    keras.distribution.set_distribution(keras.distribution.DataParallel(
        devices=keras.distribution.list_devices(), auto_shard_dataset=False))
    # ... each process feeds its own slice of every global batch (batch_size = the per-process size)

`launch` gives each process Keras's environment variables (`KERAS_DISTRIBUTION_JOB_ADDRESSES`,
`KERAS_DISTRIBUTION_NUM_PROCESSES`, `KERAS_DISTRIBUTION_PROCESS_ID`, which `keras.distribution.initialize()`
reads too), runs each under `timeout -k`, and ends the job as a whole: when one process fails, the others
are given `grace` seconds to fail on their own (they do, within the timeouts `join` sets) and are then
killed; no process outlives `launch`, whatever ends it (an error, Ctrl-C, SIGTERM).

`join` is `keras.distribution.initialize()` with the timeouts that make a broken job fail fast. Keras's
initialize calls `jax.distributed.initialize` with JAX's defaults: a process whose peer died waits up to
100 s for a missed heartbeat, and one whose peer raised an exception waits up to 300 s at shutdown (JAX
0.10.2, measured). It has no way to pass timeouts, so `join` calls `jax.distributed.initialize` itself,
then gives every process the same Keras random seed, as Keras's initialize does (without it, building a
model fails: each process would draw other initial weights).

The standard library only (JAX is imported inside `join`), so that a launcher imports it cheaply.
"""

import collections
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import NamedTuple, Optional

JOB_ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
NUM_PROCESSES = "KERAS_DISTRIBUTION_NUM_PROCESSES"
PROCESS_ID = "KERAS_DISTRIBUTION_PROCESS_ID"
# JAX's CPU collectives (gloo) wait this long for a peer before they raise; without it they wait for ever.
COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_timeout_seconds"
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_ports(count, host="127.0.0.1"):
    """`count` distinct TCP ports free on `host` now (held open together while they are picked)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def with_xla_flag(flags, flag, value):
    """The XLA_FLAGS string `flags` with `flag=value` set (an earlier value of `flag` replaced)."""
    kept = [part for part in (flags or "").split() if part.split("=", 1)[0] != flag]
    return " ".join(kept + [f"{flag}={value}"])


def job_environment(process_id, addresses, *, cpu_devices=None, collective_timeout=60, base=None):
    """The environment of process `process_id` of the job whose processes listen on `addresses`
    (["host:port", ...], the first the coordinator's), from `base` (default: this process's).

    Sets Keras's three variables, XLA_FLAGS's collective timeout (read once, as JAX's CPU client starts:
    here it is in place before the process starts), and with `cpu_devices` JAX on `cpu_devices` host
    devices per process (`JAX_PLATFORMS=cpu`, `JAX_NUM_CPU_DEVICES`, and XLA's device count flag replaced:
    one inherited from a test process would otherwise stay)."""
    env = dict(os.environ if base is None else base)
    env[JOB_ADDRESSES] = ",".join(addresses)
    env[NUM_PROCESSES] = str(len(addresses))
    env[PROCESS_ID] = str(process_id)
    env["PYTHONUNBUFFERED"] = "1"
    if collective_timeout:
        env["XLA_FLAGS"] = with_xla_flag(env.get("XLA_FLAGS"), COLLECTIVE_TIMEOUT_FLAG, int(collective_timeout))
    if cpu_devices:
        env["JAX_PLATFORMS"] = "cpu"
        env["JAX_NUM_CPU_DEVICES"] = str(int(cpu_devices))
        env["XLA_FLAGS"] = with_xla_flag(env.get("XLA_FLAGS"), _DEVICE_COUNT_FLAG, int(cpu_devices))
    return env


class ProcessResult(NamedTuple):
    """How one process of a launched job ended."""

    process_id: int
    returncode: int  # as `subprocess` gives it: negative for a signal; 124 or 137 where `timeout` ended it
    seconds: float  # from the start of the job to this process's exit
    output: str  # the last lines of its stdout and stderr
    pid: int  # of its `timeout` wrapper, the leader of the process group that `launch` killed at its exit
    killed_by_launcher: bool  # ended by `launch` after another process failed (or `launch` itself stopped)
    timed_out: bool  # ran until its `timeout` (which ends it with 124, or SIGKILL after `kill_after`)

    @property
    def ok(self):
        return self.returncode == 0

    def describe(self):
        """Its exit, in words: "exit code 1", "killed by SIGKILL", "timed out (exit code 124)", ..."""
        code = self.returncode
        if code < 0:
            try:
                what = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                what = f"killed by signal {-code}"
        elif code == 124:
            what = "timed out (exit code 124 from `timeout`)"
        elif code == 137:
            what = "timed out and killed (exit code 137 from `timeout -k`)"
        else:
            what = f"exit code {code}"
        if self.timed_out and code not in (124, 137):
            what = f"timed out, {what}"
        if self.killed_by_launcher:
            what += ", ended by the launcher"
        return f"{what} after {self.seconds:.1f} s"


class LaunchError(RuntimeError):
    """A launched job in which a process failed; `results` has every process's `ProcessResult`."""

    def __init__(self, message, results):
        super().__init__(message)
        self.results = results


def launch(command, num_processes, *, timeout=3600, kill_after=5, grace=30, host="127.0.0.1", cpu_devices=None,
           collective_timeout=60, env=None, cwd=None, tail_lines=60, echo=False, check=True):
    """Runs `num_processes` processes of `command` as one JAX job on `host`; returns their `ProcessResult`s.

    Each process gets Keras's distribution variables (a free port per process, the first the coordinator's)
    and the settings of `job_environment`, and runs under `timeout -k kill_after timeout` (JAX catches
    SIGTERM for its preemption service, so `timeout` alone would not end it) in a process group of its own.

    When a process fails, the others are given `grace` seconds to end on their own (after `join`, a
    process whose peer died or raised fails within its heartbeat or collective timeout, with JAX's message);
    those still running then are killed (SIGKILL to their process groups). On any exit from this function
    (the job done, an exception, KeyboardInterrupt, SIGTERM in the main thread) every process group still
    there is killed.

    Args:
        command: the argv of every process (the process's id is in `KERAS_DISTRIBUTION_PROCESS_ID`).
        num_processes: P, the processes of the job.
        timeout: seconds each process may run.
        kill_after: seconds between `timeout`'s SIGTERM and its SIGKILL.
        grace: seconds the other processes get to end after one fails.
        host: the address every process listens on.
        cpu_devices: optional; JAX on this many host (CPU) devices per process (see `job_environment`).
        collective_timeout: seconds JAX's CPU collectives wait for a peer (XLA_FLAGS); 0 or None leaves XLA's
            default. On a loaded machine, keep it above the slowest process's compile time skew (30-60 s).
        env: optional base environment (default: this process's).
        cwd: optional working directory of the processes.
        tail_lines: the lines of each process's output kept in its result.
        echo: whether to copy every line of output to this process's stdout as it comes, as "[pI] line": True
            (every process's), False, or the ids of the processes whose output to copy.
        check: raise `LaunchError` (with every process's exit and output) unless every process exits 0.

    Returns:
        `[ProcessResult]`, by process id.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1. Received: {num_processes}")
    addresses = [f"{host}:{port}" for port in free_ports(num_processes, host)]
    started = time.monotonic()
    procs, tails, readers = [], [], []
    ended = {}  # process id -> (returncode, seconds, killed_by_launcher)
    echo_lock = threading.Lock()

    def read(index, stream, tail):
        for line in iter(stream.readline, ""):
            tail.append(line.rstrip("\n"))
            if echo is True or (not isinstance(echo, bool) and index in echo):
                with echo_lock:
                    sys.stdout.write(f"[p{index}] {line}")
                    sys.stdout.flush()
        stream.close()

    def kill_group(proc):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    if shutil.which("timeout") is None:
        raise RuntimeError("keras_adascale.launch runs every process under `timeout -k` (GNU coreutils), which is "
                           "not on the PATH here.")
    restore_sigterm = _raise_on_sigterm()
    try:
        for index in range(num_processes):
            proc = subprocess.Popen(
                ["timeout", "-k", str(kill_after), str(timeout), *command],
                env=job_environment(index, addresses, cpu_devices=cpu_devices,
                                    collective_timeout=collective_timeout, base=env),
                cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                start_new_session=True,  # its own process group: `timeout`, Python and whatever it starts
            )
            procs.append(proc)
            tails.append(collections.deque(maxlen=tail_lines))
            readers.append(threading.Thread(target=read, args=(index, proc.stdout, tails[-1]), daemon=True))
            readers[-1].start()
        first_failure = None
        deadline = started + timeout + kill_after + 30  # `timeout` ends them before this; a backstop
        while len(ended) < num_processes:
            now = time.monotonic()
            for index, proc in enumerate(procs):
                if index in ended or not _exited(proc.pid):
                    continue
                kill_group(proc)  # what it left behind: the exited leader keeps its group id reserved
                ended[index] = (proc.wait(), now - started, False)
                if ended[index][0] != 0 and first_failure is None:
                    first_failure = now
            if (first_failure is not None and now - first_failure > grace) or now > deadline:
                for index, proc in enumerate(procs):
                    if index not in ended:
                        kill_group(proc)
                        ended[index] = (proc.wait(), time.monotonic() - started, True)
            time.sleep(0.05)
    finally:
        for index, proc in enumerate(procs):
            if index not in ended:
                kill_group(proc)
                ended[index] = (proc.wait(), time.monotonic() - started, True)
        for reader in readers:
            reader.join(timeout=5)
        restore_sigterm()
    results = []
    for index, proc in enumerate(procs):
        code, seconds, by_launcher = ended[index]
        timed_out = code in (124, 137) or (code != 0 and not by_launcher and seconds >= timeout)
        results.append(ProcessResult(index, code, seconds, "\n".join(tails[index]), proc.pid, by_launcher,
                                     timed_out))
    if check and not all(result.ok for result in results):
        raise LaunchError(failure_message(results), results)
    return results


def failure_message(results):
    """What a failed job's `LaunchError` says: which process failed first, then each one's exit and output."""
    failed = sorted((result for result in results if not result.ok), key=lambda result: result.seconds)
    first = failed[0]
    lines = ["; ".join([f"process {first.process_id} of {len(results)} failed first ({first.describe()})"]
                       + [f"process {result.process_id}: {result.describe()}"
                          for result in results if result is not first])]
    for result in results:
        lines.append(f"--- process {result.process_id} ({result.describe()}), its last lines:")
        lines.extend(f"    {line}" for line in result.output.splitlines())
    return "\n".join(lines)


def _exited(pid):
    """Whether child `pid` has exited, without reaping it (its process group id stays reserved until then)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _raise_on_sigterm():
    """In the main thread: SIGTERM raises SystemExit(143), so that `launch`'s cleanup runs; returns a function
    that restores the handler before it."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, terminate)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class Job(NamedTuple):
    """This process's place in a job: its id, the job's process count, and the coordinator's address."""

    process_id: int
    num_processes: int
    coordinator: Optional[str]


def job_from_environment(environ=None):
    """The job that Keras's distribution variables describe (None where they are not set)."""
    environ = os.environ if environ is None else environ
    if NUM_PROCESSES not in environ and JOB_ADDRESSES not in environ:
        return None
    missing = [name for name in (JOB_ADDRESSES, NUM_PROCESSES, PROCESS_ID) if not environ.get(name)]
    if missing:
        raise ValueError(f"A process of a job needs {JOB_ADDRESSES}, {NUM_PROCESSES} and {PROCESS_ID}; "
                         f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set.")
    addresses = environ[JOB_ADDRESSES].split(",")
    num_processes, process_id = int(environ[NUM_PROCESSES]), int(environ[PROCESS_ID])
    if len(addresses) not in (1, num_processes) or not 0 <= process_id < num_processes:
        raise ValueError(f"{JOB_ADDRESSES}={environ[JOB_ADDRESSES]!r} ({len(addresses)} addresses), "
                         f"{NUM_PROCESSES}={num_processes} and {PROCESS_ID}={process_id} do not agree: give one "
                         "address per process (or the coordinator's alone) and an id from 0 to the count - 1.")
    return Job(process_id, num_processes, addresses[0])


def join(*, seed=None, heartbeat_timeout=10, shutdown_timeout=30, initialization_timeout=120,
         collective_timeout=60):
    """Joins this process to the job that `launch` (or Keras's distribution variables) describes; returns its `Job`.

    Call it first, before anything else uses JAX: it starts JAX's distributed runtime
    (`jax.distributed.initialize`, with the coordinator the first of `KERAS_DISTRIBUTION_JOB_ADDRESSES`),
    after which `keras.distribution.list_devices()` lists the devices of every process. Then every process
    takes the same Keras random seed (`keras.utils.set_random_seed`): `seed`, or one that process 0 draws.
    Without the variables (a plain run of the same script), it only sets `seed` if given and returns
    `Job(0, 1, None)`.

    The timeouts make a broken job fail within seconds instead of minutes: a process whose peer died aborts
    after `heartbeat_timeout` without the peer's heartbeat (JAX's default 100 s); one whose peer raised
    stops waiting for it at shutdown after `shutdown_timeout` (300 s); a CPU collective raises after
    `collective_timeout` without its peers (XLA's `--xla_cpu_collective_timeout_seconds`, default: none).
    XLA reads XLA_FLAGS once, as JAX's backend starts, which is after `jax.distributed.initialize` (importing
    JAX or Keras does not start it): `join` adds the flag to XLA_FLAGS where it is not there already (`launch`
    puts it in each process's environment). A timeout shorter than the time one process may run behind the
    others (compiling, on a loaded machine) fails good jobs: 30-60 s for the collectives on 2 busy cores.

    Args:
        seed: optional int, the Keras random seed of every process (default: one drawn by process 0).
        heartbeat_timeout, shutdown_timeout, initialization_timeout, collective_timeout: seconds (see above;
            `initialization_timeout`: how long to wait for every process to connect).

    Returns:
        `Job(process_id, num_processes, coordinator)`.
    """
    job = job_from_environment()
    if job is None:
        if seed is not None:
            import keras

            keras.utils.set_random_seed(int(seed))
        return Job(0, 1, None)
    if collective_timeout and COLLECTIVE_TIMEOUT_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = with_xla_flag(os.environ.get("XLA_FLAGS"), COLLECTIVE_TIMEOUT_FLAG,
                                                int(collective_timeout))
    import jax

    jax.distributed.initialize(
        coordinator_address=job.coordinator, num_processes=job.num_processes, process_id=job.process_id,
        initialization_timeout=int(initialization_timeout), heartbeat_timeout_seconds=int(heartbeat_timeout),
        shutdown_timeout_seconds=int(shutdown_timeout),
    )
    import keras
    import numpy as np
    from jax.experimental import multihost_utils

    drawn = random.SystemRandom().randint(1, 10**9) if seed is None else int(seed)
    # Process 0's seed everywhere (Keras's initialize sums each process's instead: the same on all of them).
    agreed = int(multihost_utils.broadcast_one_to_all(np.asarray(drawn, np.int32)))
    keras.utils.set_random_seed(agreed)
    return job


def save_model(model, filepath):
    """`model.save(filepath)` in every process of a job: process 0 writes `filepath`; returns once it is written.

    Keras's `.keras` saving has no multi-process coordination, and under a `keras.distribution` across
    processes it is collective all the same: as it saves, Keras makes reference objects whose variables are
    placed on every process's devices (in Keras 3.15, an `Optimizer(1.0)` in the first save), which JAX checks
    against the other processes' (`device_put`), so a save in process 0 alone fails or hangs. Every process
    calls this instead: the others save to a scratch file they delete, and all wait until process 0's file is
    written (a barrier), so that any of them may load it next. Each process holds the whole model under
    `DataParallel` (its variables replicated), which is what is written; a variable sharded over processes
    (a `ModelParallel` layout across hosts) cannot be saved this way. Elsewhere (one process, another
    backend) it is `model.save(filepath)`."""
    import keras

    if keras.backend.backend() != "jax":
        model.save(filepath)
        return
    import jax

    if jax.process_count() == 1:
        model.save(filepath)
        return
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        model.save(filepath)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            model.save(os.path.join(scratch, os.path.basename(str(filepath))))
    multihost_utils.sync_global_devices("keras_adascale.launch.save_model")
