"""Input pipelines of the experiment runner, through tensorflow-datasets."""

import contextlib
import difflib
import json
import logging

import tensorflow as tf
import tensorflow_datasets as tfds

import keras_adascale.datasets  # noqa: F401  (registers the bundled builders with tfds)
from keras_adascale.experiments.config import ConfigError


class _NoUnpreparedVariantWarning(logging.Filter):
    """Drops tfds's "Variant folder ... has no dataset_info.json": `prepare` says what to do instead."""

    def filter(self, record):
        return "has no dataset_info.json" not in record.getMessage()


@contextlib.contextmanager
def _quiet_unprepared():
    logger, quiet = logging.getLogger("absl"), _NoUnpreparedVariantWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _is_prepared(builder):
    with _quiet_unprepared():
        return builder.is_prepared()


def _builder(config):
    name = config["name"]
    try:
        return tfds.builder(name, data_dir=config["data_dir"])
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ConfigError(f"dataset.name: tensorflow-datasets has no dataset '{name}'{_suggestions(name)}") from error


def _suggestions(name):
    """'; did you mean ...?': first the close names that ship offline with this package, then tfds's others."""
    base = name.split(":")[0].split("/")[0]
    builders = tfds.list_builders()
    offline = [builder.name for builder in (keras_adascale.datasets.BundledMnist, keras_adascale.datasets.PythonChars)]
    here = [b for b in offline if base in b or b in difflib.get_close_matches(base, offline, n=2, cutoff=0.4)]
    others = [b for b in difflib.get_close_matches(base, builders, n=3) if b not in here]
    parts = []
    if here:
        parts.append(f"{' or '.join(map(repr, here))} (ships offline with keras-adascale)")
    if others:
        parts.append(f"{' or '.join(map(repr, others))}" + (" (tfds; needs a download unless prepared)" if here else ""))
    return f"; did you mean {', or '.join(parts)}?" if parts else ""


def _ships_offline(builder):
    """True for the builders of `keras_adascale.datasets`, whose data comes with an installed package."""
    return type(builder).__module__.startswith("keras_adascale.datasets.")


def _is_token_sequence(feature):
    return (isinstance(feature, tfds.features.Tensor) and len(feature.shape) == 1
            and feature.shape[0] is not None and feature.tf_dtype.is_integer)


def _features(config):
    """`(builder, input feature, target feature)` as the config's `input_feature` / `target_feature` name them."""
    builder = _builder(config)
    features = builder.info.features
    chosen = []
    for key in ("input_feature", "target_feature"):
        if config[key] not in features:
            raise ConfigError(f"dataset.{key}: '{config['name']}' has no feature '{config[key]}'; "
                              f"it has {', '.join(features)}")
        chosen.append(features[config[key]])
    return builder, *chosen


def is_language_model(config):
    """True for a token-sequence task: inputs are token ids, targets one token id per input position.

    The runner then evaluates bits per character: the test loss (nats per
    token) over ln 2.
    """
    _, inputs, targets = _features(config)
    return _is_token_sequence(inputs) and _is_token_sequence(targets) and inputs.shape == targets.shape


def describe(config):
    """Reads what the model needs to know about a dataset, without preparing it.

    Two tasks are known: an image (`tfds.features.Image`) with a
    `ClassLabel` target, and a language model, whose input and target are
    integer token sequences of one length (targets = inputs shifted by one)
    and whose vocabulary the dataset's metadata names (`vocabulary_size`).

    Args:
        config: the `dataset` section of a resolved config.

    Returns:
        `(input_shape, num_classes)` of the model's input and output: for a
        language model `((sequence_length,), vocabulary_size)`.

    Raises:
        ConfigError: if the dataset or a feature is unknown, the features fit
            neither task, or it has images of varying size and no `image_size`.
    """
    builder, inputs, targets = _features(config)
    name = config["name"]
    if is_language_model(config):
        vocabulary = builder.info.metadata.get("vocabulary_size") if builder.info.metadata else None
        if vocabulary is None:
            raise ConfigError(f"dataset.name: '{name}' has token sequences but no 'vocabulary_size' in its metadata")
        for key in ("image_size", "augment"):
            if config[key]:
                raise ConfigError(f"dataset.{key}: only for images; '{name}' holds token sequences")
        return tuple(inputs.shape), vocabulary
    if not isinstance(inputs, tfds.features.Image) or not isinstance(targets, tfds.features.ClassLabel):
        raise ConfigError(
            f"dataset: '{name}' features '{config['input_feature']}' and '{config['target_feature']}' are "
            "neither an image and a class label nor token sequences of one length"
        )
    height, width, channels = inputs.shape
    if config["image_size"] is not None:
        height = width = config["image_size"]
    if height is None or width is None:
        raise ConfigError(f"dataset.image_size: '{name}' has images of varying size; set a size")
    return (height, width, channels), targets.num_classes


def prepare(config):
    """Prepares a bundled dataset, or checks that another one is prepared already.

    The runner never downloads: offline, tfds's download retries for minutes
    and leaves partial folders behind. Other datasets are prepared beforehand
    with `tfds build NAME --data_dir DIR` (or `download_and_prepare()`).

    Raises:
        ConfigError: if the dataset is not prepared in its data_dir, or lacks
            a split the config names.
    """
    builder = _builder(config)
    if _ships_offline(builder):
        try:
            builder.download_and_prepare()
        except ValueError as error:  # e.g. prepared from another version of the package it reads
            raise ConfigError(f"dataset.name: {error}") from error
    elif not _is_prepared(builder):
        name, root = config["name"], builder.data_dir_root
        raise ConfigError(
            f"dataset.name: '{name}' is not prepared in the tfds data_dir {root} (no {builder.data_dir}), "
            f"and the runner does not download. Prepare it on a machine with internet access: "
            f"`tfds build {name} --data_dir {root}` (or `tfds.builder('{name}', data_dir='{root}')"
            ".download_and_prepare()`), then copy that folder here or set dataset.data_dir to it."
        )
    for split in (config["train_split"], config["test_split"]):
        if split.split("[")[0] not in builder.info.splits:
            raise ConfigError(
                f"dataset: '{config['name']}' has no split '{split}'; it has {', '.join(builder.info.splits)}"
            )


def check(configs):
    """`describe` and `prepare` for several `dataset` sections, reporting every problem at once.

    The runner checks all its runs' datasets before it trains the first.

    Args:
        configs: `dataset` sections of resolved configs (repeats are checked once).

    Raises:
        ConfigError: listing each dataset that cannot be used.
    """
    errors = []
    for config in {json.dumps(config, sort_keys=True): config for config in configs}.values():
        try:
            describe(config)
            prepare(config)
        except ConfigError as error:
            errors.append(str(error))
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} datasets cannot be used:\n" + "\n".join(f"  {error}" for error in errors))


def _load(config, split, **kwargs):
    """`(inputs, targets)` of a split, converted for the model: images to floats in [0, 1], tokens to int32."""
    dataset = tfds.load(config["name"], split=split, data_dir=config["data_dir"],
                        download=False, **kwargs)  # prepare() did what may be done
    input_key, target_key, size = config["input_feature"], config["target_feature"], config["image_size"]
    tokens = is_language_model(config)

    def convert(example):
        inputs, targets = example[input_key], example[target_key]
        if tokens:
            return tf.cast(inputs, tf.int32), tf.cast(targets, tf.int32)
        inputs = tf.cast(inputs, tf.float32) / 255.0
        if size is not None:
            inputs = tf.image.resize(inputs, (size, size))
        return inputs, targets

    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def split_size(config, split):
    """How many examples `split` (slices such as 'train[:2%]' included) of the dataset holds."""
    return _builder(config).info.splits[split].num_examples


def _fold(key, value):
    """A new stateless random key from `key` and the integer `value`."""
    return tf.random.experimental.stateless_fold_in(key, value)


def _augment(example, key):
    """Random crop (4-pixel padding) and horizontal flip, drawn from `key` alone (stateless)."""
    image, label = example
    crop, flip = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    height, width = image.shape[0], image.shape[1]
    image = tf.image.resize_with_crop_or_pad(image, height + 8, width + 8)
    image = tf.image.stateless_random_crop(image, (height, width, image.shape[2]), seed=crop)
    return tf.image.stateless_random_flip_left_right(image, seed=flip), label


def _shuffled(window, key):
    """`window` (a batch of examples) in a random order drawn from `key`."""
    order = tf.argsort(tf.random.stateless_uniform(tf.shape(tf.nest.flatten(window)[0])[:1], seed=key))
    return tf.nest.map_structure(lambda values: tf.gather(values, order), window)


def _with_sharding(dataset):
    options = tf.data.Options()
    # Every worker reads the whole split and keeps its own share of each batch:
    # correct for any number of files, which FILE sharding is not.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    options.deterministic = True
    return dataset.with_options(options)


def train_dataset(config, global_batch_size, seed, skip_batches=0):
    """The endless, shuffled training stream, in batches of `global_batch_size`.

    Pass p over the split is shuffled in windows of `shuffle_buffer`
    examples (the whole pass when the split is smaller), and augmented,
    with stateless random numbers from (seed, p, position) alone, so every
    iterator of the stream yields the same batches. (`tf.data`'s own
    reshuffling draws each iterator's order from one generator shared by
    all iterators of the dataset; under a tf.distribute strategy Keras's
    `fit` reads a batch from an iterator it drops while it still
    prefetches, and a resumed run trained on other batches.)

    Args:
        config: the `dataset` section of a resolved config.
        global_batch_size: examples per `model.fit` step, over all replicas.
        seed: the seed of the file order, the shuffle and the augmentation.
        skip_batches: start after this many batches (a resumed run). The
            passes before the one it starts in are not read at all.

    Returns:
        A `tf.data.Dataset` of `(inputs, targets)`; `model.fit` distributes it.
    """
    examples = _load(config, config["train_split"], shuffle_files=True,
                     read_config=tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=False))
    if config["cache"]:
        examples = examples.cache()

    def one_pass(index):
        shuffle_key, augment_key = (_fold(tf.constant([seed, use], tf.int64), index) for use in (0, 1))
        windows = examples.batch(config["shuffle_buffer"]).enumerate()
        shuffled = windows.map(lambda position, window: _shuffled(window, _fold(shuffle_key, position))).unbatch()
        if not config["augment"]:
            return shuffled
        return shuffled.enumerate().map(lambda position, example: _augment(example, _fold(augment_key, position)),
                                        num_parallel_calls=tf.data.AUTOTUNE)

    first_pass, offset = divmod(skip_batches * global_batch_size, split_size(config, config["train_split"]))
    dataset = tf.data.Dataset.counter(start=first_pass).flat_map(one_pass).skip(offset)
    dataset = dataset.batch(global_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return _with_sharding(dataset)


def test_dataset(config, global_batch_size):
    """The whole test split, once, in batches of `global_batch_size` (the last one smaller).

    Returns:
        `(dataset, steps)`: pass `steps` to `model.evaluate`, which cannot
        count the batches of a distributed dataset itself.
    """
    examples = split_size(config, config["test_split"])
    dataset = _load(config, config["test_split"])
    dataset = _with_sharding(dataset.batch(global_batch_size).cache().prefetch(tf.data.AUTOTUNE))
    return dataset, -(-examples // global_batch_size)
