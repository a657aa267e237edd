"""Devices, and where a run trains: a `tf.distribute` strategy on TensorFlow, a `keras.distribution` on JAX.

The runner trains on Keras's TensorFlow backend (strategies `default`, `mirrored`, `multi_worker`, `tpu`) and
on its JAX backend (`default`, `data_parallel`); its input pipeline is tf.data on both.
"""

import contextlib
import dataclasses
import os
import re

import keras
import tensorflow as tf

from keras_adascale.experiments.config import ConfigError

_STRATEGIES = {}

# The strategies each backend trains with (`default`: one device, on any).
BACKEND_STRATEGIES = {
    "tensorflow": ("default", "mirrored", "multi_worker", "tpu"),
    "jax": ("default", "data_parallel"),
}


def check_backend(runs, backend=None):
    """Checks that every run's strategy trains on Keras's backend.

    Args:
        runs: resolved runs (see `config.resolve`).
        backend: the Keras backend's name (default: the one Keras runs on).

    Raises:
        ConfigError: naming the backend the runner needs, or the runs whose strategy is another backend's.
    """
    backend = backend or keras.backend.backend()
    if backend not in BACKEND_STRATEGIES:
        raise ConfigError(
            f"the experiment runner trains on Keras's TensorFlow or JAX backend, but Keras runs on its "
            f"{backend!r} backend: set KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax"
        )
    grouped = [run["run"] for run in runs if run["optimizer"]["groups"] > 1]
    if grouped and backend != "jax":
        raise ConfigError(
            f"optimizer.groups > 1 ({'run' if len(grouped) == 1 else 'runs'} {', '.join(repr(r) for r in grouped)}) "
            f"splits each device's batch into gradient samples on Keras's JAX backend only (KERAS_BACKEND=jax), but "
            f"Keras runs on {backend}: on {backend}, use optimizer.groups=1 (N from the replicas and accumulation)")
    wrong = {}
    for run in runs:
        name = run["strategy"]["name"]
        if name not in BACKEND_STRATEGIES[backend]:
            wrong.setdefault(name, []).append(run["run"])
    if not wrong:
        return
    problems = []
    for name, names in wrong.items():
        needs = next(other for other, allowed in BACKEND_STRATEGIES.items() if name in allowed)
        instead = "data_parallel" if backend == "jax" else "mirrored"
        problems.append(
            f"strategy.name={name} ({'run' if len(names) == 1 else 'runs'} {', '.join(repr(run) for run in names)}) trains on Keras's {needs} backend "
            f"(KERAS_BACKEND={needs}), but Keras runs on {backend}: on {backend}, use strategy.name="
            f"{instead} or default")
    raise ConfigError("; ".join(problems))


def configure_devices(runs):
    """Splits the CPU into devices for multi-replica runs on a machine without accelerators.

    On TensorFlow (`mirrored`): logical CPU devices, which must be set before TensorFlow initializes its
    devices (the first op or strategy). On JAX (`data_parallel`): `jax_num_cpu_devices` (unless XLA_FLAGS
    asks for enough host devices already), before JAX initializes its backends; TensorFlow, which only
    reads the data there, is kept off the GPUs. The runner calls it right after reading the config.

    Args:
        runs: resolved runs (see `config.resolve`).

    Raises:
        ConfigError: if there are fewer GPUs than `strategy.devices`, or the
            devices were already initialized with too few CPUs.
    """
    if keras.backend.backend() == "jax":
        _configure_jax_devices(runs)
        return
    wanted = max((run["strategy"]["devices"] for run in runs if run["strategy"]["name"] == "mirrored"), default=0)
    if wanted == 0:
        return
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if len(gpus) < wanted:
            raise ConfigError(
                f"strategy.devices={wanted} but this machine has {len(gpus)} GPU{'s' if len(gpus) != 1 else ''}")
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * wanted)
    except RuntimeError as error:  # TensorFlow is already initialized
        have = len(tf.config.list_logical_devices("CPU"))
        if have < wanted:
            raise ConfigError(
                f"strategy.devices={wanted} needs {wanted} logical CPU devices, but TensorFlow "
                f"was initialized with {have}"
            ) from error


def _forced_host_devices():
    """The host device count XLA_FLAGS forces (--xla_force_host_platform_device_count), or 0."""
    found = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(found.group(1)) if found else 0


def _configure_jax_devices(runs):
    import jax

    from keras_adascale import launch

    try:  # tf.data reads the data; TensorFlow must not take the accelerators' memory from JAX
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow's devices are initialized already
        pass
    try:
        job = launch.job_from_environment()  # several processes (Keras's distribution variables), or None
    except ValueError as error:
        raise ConfigError(str(error)) from error
    processes = job.num_processes if job else 1
    wanted = max((run["strategy"]["devices"] for run in runs if run["strategy"]["name"] == "data_parallel"),
                 default=0)
    if wanted % processes:
        raise ConfigError(
            f"strategy.devices={wanted} cannot be split evenly over the job's {processes} processes (each process "
            f"gives the same number of its devices): use a multiple of {processes}")
    local = wanted // processes
    if local and _forced_host_devices() < local and jax.config.jax_num_cpu_devices < local:
        try:
            jax.config.update("jax_num_cpu_devices", local)  # the CPU backend's; accelerators are unchanged
        except RuntimeError:  # JAX's backends are initialized already; the count below says if that matters
            pass
    if job:
        launch.join()  # before anything else asks JAX for devices: every process's devices are listed after it
    if wanted == 0:
        return
    devices = jax.local_devices()
    if len(devices) < local:
        kind = devices[0].platform.upper()
        advice = ("" if kind != "CPU" else
                  f"; JAX was initialized before the runner could ask for {local} host devices: set "
                  f"XLA_FLAGS=--xla_force_host_platform_device_count={local}")
        plural = "s" if len(devices) != 1 else ""
        where = f" in each of its {processes} processes" if processes > 1 else ""
        raise ConfigError(f"strategy.devices={wanted} needs {local} device{'s' if local != 1 else ''}{where}, "
                          f"but JAX has {len(devices)} {kind} device{plural}{' here' if processes > 1 else ''}"
                          f"{advice}")


def make_strategy(config):
    """The `tf.distribute` strategy a `strategy` section names (one instance per kind, reused).

    Args:
        config: the `strategy` section of a resolved config.

    Returns:
        A `tf.distribute.Strategy`.
    """
    key = (config["name"], config["devices"], config["tpu"])
    if key in _STRATEGIES:
        return _STRATEGIES[key]
    name = config["name"]
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "mirrored":
        kind = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
        devices = [device.name for device in tf.config.list_logical_devices(kind)][: config["devices"]]
        if len(devices) < config["devices"]:
            raise ConfigError(f"strategy.devices={config['devices']} but only {len(devices)} {kind} "
                              f"{'device exists' if len(devices) == 1 else 'devices exist'}")
        # Strategies of different sizes in one process must not share collective group
        # keys (TensorFlow's own strategy_combinations offsets them the same way).
        tf.distribute.MirroredStrategy._collective_key_base = 1000 * config["devices"]
        strategy = tf.distribute.MirroredStrategy(devices)
    elif name == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=config["tpu"])
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        strategy = tf.distribute.TPUStrategy(resolver)
    _STRATEGIES[key] = strategy
    return strategy


def make_distribution(config):
    """The `keras.distribution` a `strategy` section names on JAX: `DataParallel` over its first
    `devices` devices for `data_parallel`, None (one device) for `default`.

    Raises:
        ConfigError: if JAX has fewer devices than `strategy.devices`.
    """
    if config["name"] == "default":
        return None
    import jax

    devices = keras.distribution.list_devices()
    if len(devices) < config["devices"]:
        plural = "s" if len(devices) != 1 else ""
        raise ConfigError(f"strategy.devices={config['devices']} but JAX has only {len(devices)} device{plural}")
    if jax.process_count() == 1:
        return keras.distribution.DataParallel(devices=devices[: config["devices"]])
    # Several processes (a multi-host job): the same number of devices from each, every process's first ones.
    # Keras shards the run's tf.data pipeline over the processes (auto_shard_dataset): each reads its part of
    # every global batch.
    local = config["devices"] // jax.process_count()
    chosen = [device for index in range(jax.process_count())
              for device in [d for d in jax.devices() if d.process_index == index][:local]]
    return keras.distribution.DataParallel(devices=[f"{d.platform}:{d.id}" for d in chosen])


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run trains: a `tf.distribute` strategy (TensorFlow) or a `keras.distribution` (JAX).

    Attributes:
        replicas: the gradient samples one `model.fit` step gives (replicas in sync).
        strategy: the `tf.distribute.Strategy` on TensorFlow, else None.
        distribution: the `keras.distribution.Distribution` on JAX (None on one device).
    """

    replicas: int
    strategy: object = None
    distribution: object = None

    def build_scope(self):
        """Where the model and optimizer are made: the strategy's scope on TensorFlow."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def run_scope(self):
        """Where the whole run happens: the distribution's scope on JAX (its fit and evaluation need it)."""
        return self.distribution.scope() if self.distribution is not None else contextlib.nullcontext()


def place(config):
    """The `Placement` of a `strategy` section on Keras's backend (see `check_backend`)."""
    if keras.backend.backend() == "jax":
        distribution = make_distribution(config)
        replicas = 1 if distribution is None else len(distribution.device_mesh.devices.flatten())
        return Placement(replicas=replicas, distribution=distribution)
    strategy = make_strategy(config)
    return Placement(replicas=strategy.num_replicas_in_sync, strategy=strategy)
