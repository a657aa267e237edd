"""MultiWorkerMirroredStrategy: 2 real worker processes on 127.0.0.1, a strategy.run loop, vs the reference."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import LeastSquares, read_jsonl, reference_history
from reference import AdaScaleAdamReference, AdaScaleReference

WORKERS, UPDATES, ROWS = 2, 3, 128

# Worker i's k-th batch is rows [(k * 2 + i) * 8, +8), from data made with a fixed seed.
COMMON = r"""
import json, os, sys
import numpy as np, tensorflow as tf, keras
import keras_adascale
strategy = tf.distribute.MultiWorkerMirroredStrategy()
task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
rng = np.random.RandomState(0)
x = rng.randn(128, 3).astype("float32")
y = (x @ rng.randn(3, 1) + rng.randn(128, 1)).astype("float32")

def rows(k, worker):
    return np.arange((k * 2 + worker) * 8, (k * 2 + worker) * 8 + 8)

def report(model, optimizer):
    weights = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    print("RESULT " + json.dumps({"weights": weights.tolist(), "tau": float(optimizer.scale_invariant_iterations),
                                  "gain": float(optimizer.gain), "scale": optimizer.scale}), flush=True)
"""

CUSTOM_LOOP = COMMON + r"""
with strategy.scope():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9)
    optimizer.build(model.trainable_variables)

@tf.function
def step(k):
    def replica_fn(x_local, y_local):
        with tf.GradientTape() as tape:
            per_example = tf.reduce_mean(tf.square(model(x_local) - y_local), axis=-1)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=16)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
    local = tf.range((k * 2 + task) * 8, (k * 2 + task) * 8 + 8)
    strategy.run(replica_fn, args=(tf.gather(x, local), tf.gather(y, local)))

for k in range(3):
    step(tf.constant(k))
report(model, optimizer)
"""

# model.fit: ACCUMULATION micro-batches per update, so S = 2 workers x ACCUMULATION; AdaScaleSGD or AdaScaleAdam.
FIT = COMMON + r"""
accumulation = int(sys.argv[1])
with strategy.scope():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    steps = accumulation if accumulation > 1 else None
    if sys.argv[2] == "adam":
        optimizer = keras_adascale.AdaScaleAdam(0.05, statistics="preconditioned", gradient_accumulation_steps=steps)
    else:
        optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=steps)
    model.compile(optimizer=optimizer, loss="mse")

def dataset_fn(context):
    local = np.concatenate([rows(k, context.input_pipeline_id) for k in range(3 * accumulation)])
    return tf.data.Dataset.from_tensor_slices((x[local], y[local])).batch(8)

model.fit(strategy.distribute_datasets_from_function(dataset_fn), epochs=1, steps_per_epoch=3 * accumulation,
          verbose=0)
report(model, optimizer)
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_workers(command, procs):
    """Starts WORKERS processes of `command` on 127.0.0.1, appending them to `procs` as they start."""
    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(WORKERS)]}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for index in range(WORKERS):
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
            PYTHONPATH=os.pathsep.join([repo, os.path.join(repo, "tests")]),
            TF_CPP_MIN_LOG_LEVEL="2",
        )
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))


def kill_all(procs):
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def run_workers(script, args=(), timeout=150, command=None):
    procs = []
    try:
        start_workers(command or [sys.executable, "-c", script, *args], procs)
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        kill_all(procs)
    if command:
        return outputs
    results = []
    for output in outputs:
        lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
        assert lines, f"a worker printed no result:\n{output[-3000:]}"
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results


def reference(scale, optimizer="sgd"):
    """Algorithm 1 on the workers' data: update u averages the blocks of 8 rows u * scale .. u * scale + scale - 1."""
    rng = np.random.RandomState(0)
    x = rng.randn(ROWS, 3).astype(np.float32)
    y = (x @ rng.randn(3, 1) + rng.randn(ROWS, 1)).astype(np.float32)
    problem = LeastSquares.from_arrays(x, y, np.zeros(4))
    if optimizer == "adam":
        adam = AdaScaleAdamReference(problem.initial, 0.05, scale=scale, statistics="preconditioned")
        reference, _ = reference_history(problem, scale, UPDATES, reference=adam)
    else:
        reference, _ = reference_history(problem, scale, UPDATES, learning_rate=0.05, momentum=0.9)
    return reference


@pytest.fixture(scope="module", params=[(CUSTOM_LOOP, (), WORKERS), (FIT, ("1", "sgd"), WORKERS),
                                        (FIT, ("2", "sgd"), 2 * WORKERS), (FIT, ("2", "adam"), 2 * WORKERS)],
                ids=["strategy_run_loop", "model_fit", "model_fit_accumulation_2", "adam_model_fit_accumulation_2"])
def two_workers(request):
    """`(each worker's result, S, optimizer)` of a 2-worker job: a strategy.run loop, model.fit, model.fit
    accumulating 2, and AdaScaleAdam's model.fit accumulating 2."""
    script, args, scale = request.param
    return run_workers(script, args), scale, (args[1:] or ("sgd",))[0]


def test_two_workers_agree_with_each_other(two_workers):
    results = two_workers[0]
    assert results[0]["weights"] == results[1]["weights"] and results[0]["tau"] == results[1]["tau"]


def test_two_workers_match_the_reference(two_workers):
    results, scale, optimizer = two_workers
    expected = reference(scale, optimizer)
    for result in results:
        assert result["scale"] == scale
        np.testing.assert_allclose(result["weights"], expected.params, rtol=2e-5, atol=1e-6)
        assert result["gain"] == pytest.approx(expected.gain, rel=1e-5)
        assert result["tau"] == pytest.approx(expected.tau, rel=1e-5)
    assert 1.0 < expected.gain < scale


def runner_config(tfds_data_dir, total_steps, evaluations):
    return {
        "total_steps": total_steps, "evaluations": evaluations,
        "dataset": {"train_split": "train[:2%]", "test_split": "test[:5%]", "batch_size": 16,
                    "data_dir": str(tfds_data_dir)},
        "model": {"name": "mlp", "hidden_units": [16]},
        "schedule": {"name": "constant", "learning_rate": 0.1},
        "optimizer": {"scale": 2},
        "strategy": {"name": "multi_worker"},
    }


def runner_command(config_path, output):
    return [sys.executable, "-m", "keras_adascale", "train", str(config_path), "--output-dir", str(output)]


def test_the_runner_trains_one_run_on_two_workers(tfds_data_dir, tmp_path):
    (tmp_path / "mw.json").write_text(json.dumps(runner_config(tfds_data_dir, total_steps=24, evaluations=1)))
    outputs = run_workers(None, timeout=200, command=runner_command(tmp_path / "mw.json", tmp_path))
    chief, other = tmp_path / "mw" / "adascale", tmp_path / "mw" / "adascale.worker1"
    assert (chief / "final.json").exists() and (other / "final.json").exists(), outputs[0][-3000:]
    finals = [json.loads((path / "final.json").read_text()) for path in (chief, other)]
    assert finals[0]["replicas"] == 2 and finals[0]["scale"] == 2
    for key in ("updates", "tau", "test_accuracy"):  # the workers trained one model together
        assert finals[0][key] == finals[1][key]
    assert "run  optimizer" in outputs[0] and "run  optimizer" not in outputs[1]


def test_a_job_with_a_killed_worker_restarts_and_ends_where_an_uninterrupted_job_ends(tfds_data_dir, tmp_path):
    import time

    import keras

    (tmp_path / "job.json").write_text(json.dumps(runner_config(tfds_data_dir, total_steps=160, evaluations=8)))
    outputs = run_workers(None, timeout=200, command=runner_command(tmp_path / "job.json", tmp_path / "straight"))
    assert (tmp_path / "straight" / "job" / "adascale" / "model.keras").exists(), outputs[0][-3000:]

    backup = tmp_path / "killed" / "job" / "adascale.incomplete" / "backup" / "training_metadata.json"
    procs = []
    try:
        start_workers(runner_command(tmp_path / "job.json", tmp_path / "killed"), procs)
        deadline = time.monotonic() + 200
        while not (backup.exists() and json.loads(backup.read_text())["epoch"] >= 2):
            assert time.monotonic() < deadline, "the job never reached its second epoch"
            time.sleep(0.05)
        procs[1].kill()  # a worker dies mid-epoch; the chief cannot go on without it
        procs[1].wait()
        time.sleep(1)
    finally:
        kill_all(procs)  # the job is restarted as a whole
    outputs = run_workers(None, timeout=200, command=runner_command(tmp_path / "job.json", tmp_path / "killed"))
    assert (tmp_path / "killed" / "job" / "adascale" / "model.keras").exists(), outputs[0][-3000:]

    finished = [tmp_path / name / "job" / "adascale" for name in ("straight", "killed")]
    straight, restarted = (keras.models.load_model(path / "model.keras") for path in finished)
    for a, b in zip(straight.get_weights() + straight.optimizer.variables,
                    restarted.get_weights() + restarted.optimizer.variables, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    rows = [read_jsonl(path / "metrics.jsonl") for path in finished]
    assert [row["update"] for row in rows[1]] == [row["update"] for row in rows[0]]
    assert [row["loss"] for row in rows[1]] == pytest.approx([row["loss"] for row in rows[0]], rel=1e-4)


# model.fit whose accumulation count changes between updates (1 -> 2 -> 3), as AutoScale changes it:
# S = 2 workers x k at each update.
CHANGING_FIT = COMMON + r"""
from change_steps import ChangeSteps  # tests/ is on the workers' PYTHONPATH

with strategy.scope():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    optimizer = keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=1)
    model.compile(optimizer=optimizer, loss="mse")

def dataset_fn(context):
    local = np.concatenate([rows(k, context.input_pipeline_id) for k in range(8)])
    return tf.data.Dataset.from_tensor_slices((x[local], y[local])).batch(8)

model.fit(strategy.distribute_datasets_from_function(dataset_fn), epochs=1, steps_per_epoch=8, verbose=0,
          callbacks=[ChangeSteps({1: 2, 3: 3})])
report(model, optimizer)
print("UPDATES " + str(int(optimizer.iterations)), flush=True)
"""


def test_two_workers_with_a_changing_accumulation_count_match_the_reference():
    """Micro-step m of the job averages blocks 2m and 2m + 1 (one per worker); update u holds its k_u micro-steps."""
    results = run_workers(CHANGING_FIT)
    assert results[0]["weights"] == results[1]["weights"] and results[0]["tau"] == results[1]["tau"]
    rng = np.random.RandomState(0)
    x = rng.randn(ROWS, 3).astype(np.float32)
    y = (x @ rng.randn(3, 1) + rng.randn(ROWS, 1)).astype(np.float32)
    problem = LeastSquares.from_arrays(x, y, np.zeros(4))
    expected = AdaScaleReference(problem.initial, scale=2, learning_rate=0.05, momentum=0.9)
    block = 0
    for k in (1, 2, 2, 3):
        expected.scale = WORKERS * k
        expected.step([problem.gradient(expected.params, (block + i) * 8, (block + i + 1) * 8)
                       for i in range(WORKERS * k)])
        block += WORKERS * k
    assert block * 8 == ROWS
    for result in results:
        assert result["scale"] == WORKERS * 3
        np.testing.assert_allclose(result["weights"], expected.params, rtol=2e-5, atol=1e-6)
        assert result["tau"] == pytest.approx(expected.tau, rel=1e-5)
