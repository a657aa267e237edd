"""Devices and `tf.distribute` strategies of the experiment runner (and of the benchmarks)."""

import tensorflow as tf

from keras_adascale.experiments.config import ConfigError

_STRATEGIES = {}


def configure_devices(runs):
    """Splits the CPU into logical devices for mirrored runs on a machine without GPUs.

    Must run before TensorFlow initializes its devices (the first op or
    strategy); the runner calls it right after reading the config.

    Args:
        runs: resolved runs (see `config.resolve`).

    Raises:
        ConfigError: if there are fewer GPUs than `strategy.devices`, or the
            devices were already initialized with too few CPUs.
    """
    wanted = max((run["strategy"]["devices"] for run in runs if run["strategy"]["name"] == "mirrored"), default=0)
    if wanted == 0:
        return
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if len(gpus) < wanted:
            raise ConfigError(f"strategy.devices={wanted} but this machine has {len(gpus)} GPUs")
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
            raise ConfigError(f"strategy.devices={config['devices']} but only {len(devices)} {kind} devices exist")
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
