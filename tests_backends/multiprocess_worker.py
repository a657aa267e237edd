"""One process of a multi-process JAX job that tests_backends/test_multiprocess.py starts (keras_adascale.launch).

    python multiprocess_worker.py train OUT [extras]   the reference runs (and with `extras`: the full batch fed
                                                       in every process, fit's batch checks, AutoScale, a save
                                                       and resume)
    python multiprocess_worker.py kill OUT VICTIM BATCH a long fit, in which process VICTIM SIGKILLs itself
                                                       at batch BATCH

Every process writes OUT/p<process id>.json: what it saw, for the test to compare with the NumPy reference and
with the other processes'. Each process feeds its own part of every global batch: the global batch of a
micro-step is R x BATCH rows (R devices on the batch axis), of which this process's devices take
`local_devices` x BATCH contiguous rows, sample i of an update being the i-th block of BATCH rows as in the
reference (tests/problems.py).
"""

import json
import os
import pathlib
import signal
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("KERAS_BACKEND", "jax")

from keras_adascale import launch  # noqa: E402 (imports Keras and JAX; JAX starts in join)

JOB = launch.join()  # the Keras seed: process 0's, in every process

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_adascale  # noqa: E402
from keras_adascale.model import AdaScaleTrainStep  # noqa: E402
from problems import BATCH, LeastSquares, Recorder, UpdateRecorder  # noqa: E402

SCENARIO, OUT = sys.argv[1], pathlib.Path(sys.argv[2])
(OUT / f"pid{JOB.process_id}").write_text(str(os.getpid()))
DEVICES = keras.distribution.list_devices()
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=DEVICES, auto_shard_dataset=False))
REPLICAS = len(DEVICES)
LOCAL_DEVICES = jax.local_device_count()
GLOBAL = REPLICAS * BATCH  # rows of a global micro-batch
PROBLEM = LeastSquares(num_examples=64 * BATCH, seed=3)  # the same data in every process (a fixed seed)


def this_process_block():
    """`(first, count)`: the rows of every global micro-batch that this process's devices hold."""
    mesh = keras.distribution.distribution().device_mesh.backend_mesh
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    slices = sorted(index[0].start for index in sharding.addressable_devices_indices_map((GLOBAL,)).values())
    assert slices == list(range(slices[0], slices[0] + BATCH * len(slices), BATCH)), slices  # contiguous
    return slices[0], BATCH * len(slices)


FIRST, COUNT = this_process_block()


def local(array, start, stop, full=False):
    """This process's part of the global rows [start, stop), micro-batch by micro-batch (all of them with `full`)."""
    if full:
        return array[start:stop]
    return np.concatenate([array[m + FIRST:m + FIRST + COUNT] for m in range(start, stop, GLOBAL)])


# The global batch of every traced step, as the step sees it: a process feeding the full batch instead of its
# part makes Keras build a batch of R x BATCH x processes rows (duplicated rows: a mean loss would not tell).
EXPECTED_ROWS = [GLOBAL]
SEEN = []
_train_step = AdaScaleTrainStep.train_step


def checked_train_step(self, *args):
    rows = int(keras.tree.flatten(args[-1])[0].shape[0])
    SEEN.append(rows)
    if rows != EXPECTED_ROWS[0]:
        raise AssertionError(f"the train step got a global batch of {rows} rows, not {EXPECTED_ROWS[0]} "
                             f"(R = {REPLICAS} devices x {BATCH})")
    return _train_step(self, *args)


AdaScaleTrainStep.train_step = checked_train_step


def model():
    inputs = keras.Input((PROBLEM.dim,))
    built = keras_adascale.AdaScaleModel(inputs, keras.layers.Dense(1)(inputs))
    built.set_weights([PROBLEM.initial[:-1].reshape(-1, 1), PROBLEM.initial[-1:]])
    return built


def history(records):
    return [[weights.tolist(), gain, tau] for weights, gain, tau in records]


def make_optimizer(name, steps, **options):
    accumulation = {"gradient_accumulation_steps": steps} if steps > 1 else {}
    if name == "adam":
        return keras_adascale.AdaScaleAdam(0.05, beta_1=0.9, beta_2=0.99, **accumulation, **options)
    return keras_adascale.AdaScaleSGD(0.05, momentum=0.9, **accumulation, **options)


def reference_run(name, steps, updates=4):
    """`updates` updates of N = R x `steps` samples from the first rows; (weights, gain, tau) after each."""
    trained = model()
    optimizer = make_optimizer(name, steps)
    assert optimizer.samples_per_update == REPLICAS * steps
    trained.compile(optimizer=optimizer, loss="mse")
    recorder = Recorder(every=steps)
    stop = updates * steps * GLOBAL
    trained.fit(local(PROBLEM.x, 0, stop), local(PROBLEM.y, 0, stop), batch_size=COUNT, shuffle=False,
                callbacks=[recorder], verbose=0)
    return history(recorder.history)


def full_batch_fed():
    """Every process feeding the whole global batch: the step's check must refuse it. Returns its message."""
    trained = model()
    trained.compile(optimizer=keras_adascale.AdaScaleSGD(0.0), loss="mse")
    try:
        trained.fit(local(PROBLEM.x, 0, GLOBAL, full=True), local(PROBLEM.y, 0, GLOBAL, full=True),
                    batch_size=GLOBAL, shuffle=False, verbose=0)
    except AssertionError as error:
        return str(error)
    return None


def batch_checks():
    """`fit`'s checks before training, per process: returns what each call did (None: it trained)."""
    trained = model()
    trained.compile(optimizer=keras_adascale.AdaScaleSGD(0.0), loss="mse")
    outcomes = {}
    calls = {
        # a per-process batch its devices split, though the global batch's size per process would not divide by R
        "per_process_batch": (LOCAL_DEVICES * 3, LOCAL_DEVICES * 3),
        "indivisible_per_process_batch": (LOCAL_DEVICES * 3 + 1, LOCAL_DEVICES * 3 + 1),
        "rows_differ": (LOCAL_DEVICES * (4 if JOB.process_id == 0 else 2), LOCAL_DEVICES * 2),
    }
    for name, (rows, batch_size) in calls.items():
        EXPECTED_ROWS[0] = batch_size * JOB.num_processes
        try:
            trained.fit(PROBLEM.x[:rows], PROBLEM.y[:rows], batch_size=batch_size, shuffle=False, verbose=0)
            outcomes[name] = None
        except ValueError as error:
            outcomes[name] = str(error)
    EXPECTED_ROWS[0] = GLOBAL
    return outcomes


def autoscale_run():
    """AutoScale over two epochs of all rows, as tests_backends/test_model.py's single-process test."""
    trained = model()
    optimizer = keras_adascale.AdaScaleSGD(0.01, momentum=0.9, gradient_accumulation_steps=2)
    trained.compile(optimizer=optimizer, loss="mse")
    callback = keras_adascale.AutoScale(interval=0, warmup=0, update_cost=4096.0, max_steps=8, verbose=0)
    recorder = UpdateRecorder()
    rows = len(PROBLEM.x)
    trained.fit(local(PROBLEM.x, 0, rows), local(PROBLEM.y, 0, rows), batch_size=COUNT, shuffle=False, epochs=2,
                verbose=0, callbacks=[callback, recorder])
    changes = [{key: (float(value) if isinstance(value, (float, np.floating)) else value)
                for key, value in change.items() if key in ("update", "from_steps", "steps", "scale")}
               for change in callback.changes]
    return {"changes": changes, "updates": [list(update) for update in recorder.updates],
            "history": history(recorder.history), "steps": optimizer.accumulation_steps,
            "samples_per_update": optimizer.samples_per_update}


def goodput_run():
    """AutoScale's goodput objective over two epochs: each process times its own updates; the decisions must be
    the same in every process (else the job's collectives fall out of step). And the agreement itself: each
    process's own (made-up) times in, every process's mean out."""
    from keras_adascale import autoscale

    agreed = autoscale.agreed_seconds({1: 0.1 * (JOB.process_id + 1), 2: 0.5 + JOB.process_id})
    trained = model()
    optimizer = keras_adascale.AdaScaleSGD(0.01, momentum=0.9, gradient_accumulation_steps=1)
    trained.compile(optimizer=optimizer, loss="mse")
    callback = keras_adascale.AutoScale("goodput", interval=0, warmup=0, max_steps=4, verbose=0)
    rows = len(PROBLEM.x)
    trained.fit(local(PROBLEM.x, 0, rows), local(PROBLEM.y, 0, rows), batch_size=COUNT, shuffle=False, epochs=2,
                verbose=0, callbacks=[callback])
    changes = [{key: value for key, value in change.items() if key in ("update", "from_steps", "steps")}
               for change in callback.changes]
    return {"agreed": {str(k): v for k, v in agreed.items()}, "changes": changes,
            "timed": {str(k): v for k, v in callback.policy.seconds_per_update().items()}}


def save_and_resume(path):
    """k = 2 (N = 2R): 5 micro-batches (the third update half done), saved (process 0 writes the file), loaded
    by every process, then 3 more: 4 updates in all."""
    trained = model()
    trained.compile(optimizer=make_optimizer("sgd", 2), loss="mse")
    first = UpdateRecorder()
    trained.fit(local(PROBLEM.x, 0, 5 * GLOBAL), local(PROBLEM.y, 0, 5 * GLOBAL), batch_size=COUNT,
                shuffle=False, verbose=0, callbacks=[first])
    # Every process saves (Keras's save is collective across processes), process 0 to `path`.
    launch.save_model(trained, path)
    loaded = keras.models.load_model(path)  # in every process: building its variables is collective
    second = UpdateRecorder()
    loaded.fit(local(PROBLEM.x, 5 * GLOBAL, 8 * GLOBAL), local(PROBLEM.y, 5 * GLOBAL, 8 * GLOBAL),
               batch_size=COUNT, shuffle=False, verbose=0, callbacks=[second])
    return {"history": history(first.history + second.history), "class": type(loaded).__name__,
            "samples_per_update": loaded.optimizer.samples_per_update}


class KillSelf(keras.callbacks.Callback):
    def __init__(self, victim, batch):
        super().__init__()
        self.victim, self.batch = victim, batch

    def on_train_batch_end(self, batch, logs=None):
        if JOB.process_id == self.victim and batch == self.batch:
            (OUT / "killed").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    report = {"process_id": JOB.process_id, "num_processes": JOB.num_processes, "replicas": REPLICAS,
              "local_devices": LOCAL_DEVICES, "rows_fed": COUNT,
              "random_draw": float(keras.random.uniform(()))}  # the same in every process: one Keras seed
    if SCENARIO == "kill":
        victim, batch = int(sys.argv[3]), int(sys.argv[4])
        trained = model()
        trained.compile(optimizer=make_optimizer("sgd", 1), loss="mse")
        rows = len(PROBLEM.x)
        trained.fit(local(PROBLEM.x, 0, rows), local(PROBLEM.y, 0, rows), batch_size=COUNT, shuffle=False,
                    epochs=1000, verbose=0, callbacks=[KillSelf(victim, batch)])
        report["finished"] = True  # never: the survivors must fail
    else:
        for name in ("sgd", "adam"):
            for steps in (1, 2):
                report[f"{name}_k{steps}"] = reference_run(name, steps)
        report["seen_rows"] = sorted(set(SEEN))  # every step of the reference runs
        if "extras" in sys.argv[3:]:
            report["full_batch_error"] = full_batch_fed()
            report["batch_checks"] = batch_checks()
            report["autoscale"] = autoscale_run()
            report["goodput"] = goodput_run()
            report["resumed"] = save_and_resume(OUT / "model.keras")
    (OUT / f"p{JOB.process_id}.json").write_text(json.dumps(report))


main()
