"""Experiment configs: the schema, defaults, validation, `--set` overrides and per-run merging."""

import copy
import dataclasses
import difflib
import json
import pathlib

import yaml

from keras_adascale import validation
from keras_adascale.experiments import models

OPTIMIZERS = ("adascale", "sgd", "lsr", "lsr_warmup", "adascale_adam", "adam", "adam_fixed", "adam_sqrt", "adam_linear")
# The AdaScale optimizers: their updates hold N gradient samples and their schedule follows tau.
ADASCALE_OPTIMIZERS = ("adascale", "adascale_adam")
STATISTICS = ("raw", "preconditioned")
# tf.distribute strategies (TensorFlow) and data_parallel, keras.distribution.DataParallel (JAX).
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu", "data_parallel")
# The strategies whose `devices` key is their replica count, known before they run.
LOCAL_STRATEGIES = ("mirrored", "data_parallel")
MODELS = tuple(models.REGISTRY)
SCHEDULES = ("constant", "piecewise_constant", "cosine")


NUMBER = (int, float)
# optimizer.scale: a number, or "auto" (AdaScale chooses S during training; see the autoscale section).
SCALE_KIND = (int, float, str)
AUTO = "auto"
OBJECTIVES = ("budget", "efficiency", "goodput")
_KIND_NAMES = {
    int: "an integer", float: "a number", NUMBER: "a number", bool: "true or false", str: "a string",
    list: "a list", SCALE_KIND: "a number or 'auto'",
}


class ConfigError(ValueError):
    """A config that cannot run: the message names the key and what is allowed."""


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: its default, what it accepts and what it means."""

    default: object
    help: str
    kind: type | tuple = object
    choices: tuple = ()
    minimum: float | None = None
    nullable: bool = False


def _section(**keys):
    return keys


SCHEMA = {
    "name": Key(None, "experiment name; defaults to the config file's stem", str, nullable=True),
    "seed": Key(0, "random seed of the weights and the data order", int, minimum=0),
    "total_steps": Key(
        1000, "T_SI: length of the single-batch (S = 1) schedule, in scale-invariant steps", int, minimum=1
    ),
    "jit_compile": Key(False, "compile the train step with XLA (helps on GPU/TPU; slower on CPU); TensorFlow only: "
                       "on JAX the step is always compiled (jax.jit), as without it JAX runs it op by op", bool),
    "evaluations": Key(10, "how many times the test split is evaluated during training", int, minimum=1),
    "dataset": _section(
        name=Key("bundled_mnist", "tensorflow-datasets name (bundled_mnist and python_chars ship offline)", str),
        data_dir=Key(None, "tfds data_dir; default: tfds's own (~/tensorflow_datasets)", str, nullable=True),
        train_split=Key("train", "tfds split to train on", str),
        test_split=Key("test", "tfds split to evaluate on", str),
        input_feature=Key("image", "the feature the model reads: an image, or token ids (language model)", str),
        target_feature=Key("label", "the feature it predicts: a class label, or the next token at each "
                           "position (language model: test bits per character are recorded too)", str),
        batch_size=Key(32, "B: examples per gradient sample (per replica and micro-batch)", int, minimum=1),
        image_size=Key(None, "resize images to this square size (e.g. 224 for imagenet2012)", int,
                       minimum=1, nullable=True),
        augment=Key(False, "random crop (4-pixel padding) and horizontal flip while training", bool),
        shuffle_buffer=Key(10000, "shuffle window, in examples: each pass over the split is shuffled anew, "
                           "this many examples at a time (all at once when the split is smaller)", int, minimum=1),
        cache=Key(True, "cache the decoded training split in memory (small datasets only)", bool),
    ),
    "model": _section(
        name=Key("small_cnn", "architecture", str, choices=MODELS),
        hidden_units=Key([512, 512], "mlp only: widths of the hidden layers", list),
    ),
    "strategy": _section(
        name=Key("default", "where a run trains: one device (default); tf.distribute's mirrored, multi_worker or "
                 "tpu (KERAS_BACKEND=tensorflow); data_parallel, keras.distribution.DataParallel with "
                 "keras_adascale.AdaScaleModel (KERAS_BACKEND=jax)", str, choices=STRATEGIES),
        devices=Key(1, "mirrored and data_parallel: replicas; on a machine without GPUs, CPU devices", int,
                    minimum=1),
        tpu=Key("", "tpu only: TPUClusterResolver address ('' = the attached/Colab TPU)", str),
    ),
    "schedule": _section(
        name=Key("piecewise_constant", "single-batch learning-rate schedule, in scale-invariant steps",
                 str, choices=SCHEDULES),
        learning_rate=Key(0.1, "single-batch (S = 1) learning rate", float, minimum=0.0),
        decay_at=Key([0.5, 0.75], "piecewise_constant: fractions of total_steps where the rate drops", list),
        decay_factor=Key(0.1, "piecewise_constant: factor applied at each drop", float, minimum=0.0),
    ),
    "optimizer": _section(
        name=Key("adascale", "adascale | sgd (single-batch schedule, T updates of S*B examples) | "
                 "lsr (linear scaling rule: lr x S, T/S updates) | lsr_warmup (lsr with gradual warm-up) | "
                 "adascale_adam | adam (as sgd) | adam_fixed (T/S updates, nothing scaled) | "
                 "adam_sqrt (square-root rule at kappa = S: lr x sqrt(S), 1 - beta x S, epsilon / sqrt(S), "
                 "T/S updates) | adam_linear (lr x S, T/S updates)",
                 str, choices=OPTIMIZERS),
        scale=Key(1, "S: examples per update / baseline_batch_size (int or float); the gradient samples "
                  "per update are N = S x baseline_batch_size / dataset.batch_size = replicas x accumulation "
                  "steps. 'auto' (adascale, adascale_adam): AdaScale chooses S during training, as the "
                  "autoscale section says", SCALE_KIND, minimum=1),
        baseline_batch_size=Key(None, "B0: the batch the single-batch (S = 1) recipe was tuned for; "
                                "default dataset.batch_size (S = N)", int, minimum=1, nullable=True),
        momentum=Key(0.9, "SGD momentum (adascale, sgd, lsr, lsr_warmup)", float, minimum=0.0),
        nesterov=Key(False, "Nesterov momentum", bool),
        weight_decay=Key(None, "decoupled weight decay (Keras semantics)", float, minimum=0.0, nullable=True),
        smoothing=Key(None, "adascale and adascale_adam: theta of the moving averages; default max(1 - S/1000, 0)",
                      float, minimum=0.0, nullable=True),
        beta_1=Key(0.9, "Adam's first-moment decay at S = 1 (adascale_adam, adam*)", float, minimum=0.0),
        beta_2=Key(0.999, "Adam's second-moment decay at S = 1 (adascale_adam, adam*)", float, minimum=0.0),
        epsilon=Key(1e-7, "Adam's epsilon at S = 1 (adascale_adam, adam*)", float, minimum=0.0),
        statistics=Key("raw", "adascale_adam only: raw | preconditioned, what the gain measures", str,
                       choices=STATISTICS),
        groups=Key(1, "adascale and adascale_adam on JAX: gradient samples from each device's batch of groups x "
                   "dataset.batch_size rows, in one backward pass (keras_adascale.AdaScaleModel's groups); "
                   "N = replicas x groups x accumulation steps", int, minimum=1),
        warmup_fraction=Key(0.05, "lsr_warmup only: warm-up length, as a fraction of the run's updates",
                            float, minimum=0.0),
    ),
    "autoscale": _section(
        objective=Key("budget", "optimizer.scale=auto: budget (fewest updates + examples / update_cost; "
                      "S = sqrt(noise scale x update_cost)) | efficiency (largest S with predicted "
                      "efficiency >= target_efficiency) | goodput (most tau per second, step times measured)",
                      str, choices=OBJECTIVES),
        update_cost=Key(1.0, "budget: the baseline batches of examples one update is worth", float, minimum=0.0),
        target_efficiency=Key(0.8, "efficiency: the least predicted gain / S", float, minimum=0.0),
        max_scale=Key(32, "the largest S; S takes the powers of two of the accumulation steps", NUMBER, minimum=1),
        warmup=Key(None, "tau before the first decision; default total_steps / 20", NUMBER, minimum=0,
                   nullable=True),
        threshold=Key(0.05, "a change needs a predicted improvement above this fraction", float, minimum=0.0),
        decisions=Key(40, "how many times S is re-decided: every (total_steps - warmup) / decisions of tau, at "
                      "any update (a change waits for an update boundary aligned with its count)",
                      int, minimum=1),
    ),
    "runs": Key(None, "list of variants to train, each {name: ..., <key>: <override>...}", list, nullable=True),
}


def _is_section(value):
    return isinstance(value, dict)


def defaults():
    """The config with every key at its default, as a plain dict."""

    def resolve(schema):
        return {
            name: resolve(entry) if _is_section(entry) else copy.deepcopy(entry.default)
            for name, entry in schema.items()
        }

    return resolve(SCHEMA)


def describe():
    """Every config key with its default and meaning, one per line (for `--help`)."""
    lines = []

    def walk(schema, prefix):
        for name, entry in schema.items():
            if _is_section(entry):
                walk(entry, f"{prefix}{name}.")
                continue
            allowed = f" (one of: {', '.join(entry.choices)})" if entry.choices else ""
            lines.append(f"  {prefix}{name} = {json.dumps(entry.default)}: {entry.help}{allowed}")

    walk(SCHEMA, "")
    return "\n".join(lines)


def _unknown(key, known):
    section, _, name = key.rpartition(".")
    close = difflib.get_close_matches(name, known, n=1)
    # The full key, as --set and the YAML's nesting spell it.
    hint = f"; did you mean '{section + '.' if section else ''}{close[0]}'?" if close else ""
    return f"unknown config key '{key}'{hint} Known keys here: {', '.join(sorted(known))}"


def _check_value(path, key, value):
    if value is None:
        if key.nullable:
            return None
        raise ConfigError(f"config key '{path}' must not be null")
    expected = key.kind
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is SCALE_KIND and isinstance(value, str):
        if value != AUTO:
            raise ConfigError(f"config key '{path}' must be a number >= 1 or 'auto'; got {value!r}")
        return value
    if expected is not object and (not isinstance(value, expected) or (
            expected in (int, NUMBER, SCALE_KIND) and isinstance(value, bool))):
        raise ConfigError(f"config key '{path}' must be {_KIND_NAMES[expected]}; got {value!r}")
    if key.choices and value not in key.choices:
        raise ConfigError(f"config key '{path}' must be one of {', '.join(key.choices)}; got {value!r}")
    if key.minimum is not None and not value >= key.minimum:  # NaN too
        raise ConfigError(f"config key '{path}' must be >= {key.minimum}; got {value!r}")
    return value


def _merge(base, update, schema, errors, prefix="", bad=None):
    """Deep-merges `update` into a copy of `base`, checking every key against `schema`.

    A bad key or value is added to `errors` and leaves the base value in place,
    so that the rest of the config is still checked.
    """
    merged = copy.deepcopy(base)
    if not isinstance(update, dict):
        errors.append(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping; got {update!r}")
        return merged
    for name, value in update.items():
        path = f"{prefix}{name}"
        if name not in schema:
            errors.append(_unknown(path, schema.keys()))
            continue
        entry = schema[name]
        if _is_section(entry):
            merged[name] = _merge(merged[name], value, entry, errors, f"{path}.", bad)
            continue
        try:
            merged[name] = _check_value(path, entry, value)
        except ConfigError as error:
            errors.append(str(error))
            if bad is not None:
                bad.add(path)
    return merged


_FRACTION = validation.Interval(0.0, 1.0, high_closed=True)


# The keys that the rule "S x B0 is a whole number of samples over the replicas" reads: with a bad
# value in one of them the rule would judge the default left in its place, a value never given.
_BATCH_RULE_KEYS = {"optimizer.scale", "optimizer.name", "optimizer.baseline_batch_size", "dataset.batch_size",
                    "strategy.name", "strategy.devices", "autoscale.max_scale"}


def _run_errors(run, bad=frozenset()):
    """The cross-key rules one resolved run breaks, as messages; `bad`: keys whose given value was refused."""
    errors = []
    optimizer, strategy, schedule = run["optimizer"], run["strategy"], run["schedule"]
    if optimizer["scale"] == AUTO and optimizer["name"] not in ADASCALE_OPTIMIZERS:
        errors.append(f"optimizer.scale=auto needs an AdaScale optimizer ({', '.join(ADASCALE_OPTIMIZERS)}); "
                      f"got optimizer.name={optimizer['name']}")
    elif optimizer["scale"] != AUTO and optimizer["scale"] not in validation.SCALE:
        errors.append(f"optimizer.scale must be a finite number >= 1; got {optimizer['scale']}")
    elif not bad & _BATCH_RULE_KEYS:
        # Multi-worker and TPU replica counts are known only at run time (`training.plan` checks
        # them there); a whole number of samples is needed everywhere.
        replicas = strategy["devices"] if strategy["name"] in LOCAL_STRATEGIES else 1
        try:
            batches_per_update(run, replicas, label="")
        except ConfigError as error:
            errors.append(str(error))
    # The optimizers' own rules (keras.optimizers.SGD's for momentum), in the config's words.
    for key, interval in (("smoothing", validation.SMOOTHING), ("momentum", validation.MOMENTUM),
                          ("beta_1", validation.BETA), ("beta_2", validation.BETA)):
        if optimizer[key] is not None and optimizer[key] not in interval:
            errors.append(f"optimizer.{key} must be in {interval}; got {optimizer[key]}")
    if optimizer["groups"] > 1 and optimizer["name"] not in ADASCALE_OPTIMIZERS:
        errors.append(f"optimizer.groups={optimizer['groups']} gives an AdaScale optimizer "
                      f"({', '.join(ADASCALE_OPTIMIZERS)}) several gradient samples of each device's batch; got "
                      f"optimizer.name={optimizer['name']}")
    if optimizer["warmup_fraction"] not in _FRACTION:
        errors.append(f"optimizer.warmup_fraction must be in {_FRACTION}; got {optimizer['warmup_fraction']}")
    decay_at = schedule["decay_at"]
    if not all(isinstance(x, (int, float)) and 0 < x < 1 for x in decay_at) or decay_at != sorted(decay_at):
        errors.append(f"schedule.decay_at must be increasing fractions in (0, 1); got {decay_at}")
    units = run["model"]["hidden_units"]
    if not units or not all(isinstance(u, int) and not isinstance(u, bool) and u > 0 for u in units):
        errors.append(f"model.hidden_units must be a non-empty list of positive ints; got {units}")
    return errors


def baseline_batch_size(run):
    """B0: the batch of the single-batch recipe (`optimizer.baseline_batch_size`, else the sample batch)."""
    return run["optimizer"]["baseline_batch_size"] or run["dataset"]["batch_size"]


def samples_per_step(run, replicas):
    """Gradient samples per `model.fit` step: the replicas, times `optimizer.groups` for an AdaScale optimizer."""
    return replicas * (run["optimizer"]["groups"] if run["optimizer"]["name"] in ADASCALE_OPTIMIZERS else 1)


def _per_step_words(run, replicas):
    groups = run["optimizer"]["groups"] if run["optimizer"]["name"] in ADASCALE_OPTIMIZERS else 1
    words = f"{replicas} replica{'s' if replicas != 1 else ''}"
    return words if groups == 1 else f"{words} x optimizer.groups={groups}"


def is_auto(run):
    """Whether AdaScale chooses the run's S during training (`optimizer.scale: auto`)."""
    return run["optimizer"]["scale"] == AUTO


def auto_steps(run, replicas, label=None):
    """The accumulation counts an auto-scale run may use on `replicas` replicas.

    Returns:
        `(scale_per_step, allowed)`: S per accumulation step (replicas x B / B0) and the allowed
        counts, the powers of two from the least that gives two gradient samples up to `max_scale`.

    Raises:
        ConfigError: if not even the least count fits under `autoscale.max_scale`.
    """
    label = f"run '{run['run']}': " if label is None else label
    words, replicas = _per_step_words(run, replicas), samples_per_step(run, replicas)
    scale_per_step = replicas * run["dataset"]["batch_size"] / baseline_batch_size(run)
    least = 1 if replicas >= 2 else 2
    allowed = []
    steps = least
    while scale_per_step * steps <= run["autoscale"]["max_scale"] + 1e-9:
        allowed.append(steps)
        steps *= 2
    if not allowed:
        raise ConfigError(
            f"{label}autoscale.max_scale={run['autoscale']['max_scale']} is below the least S = "
            f"{scale_per_step * least:g} ({words} x {least} accumulation steps x "
            f"dataset.batch_size / baseline batch)"
        )
    return scale_per_step, allowed


def batches_per_update(run, replicas, label=None):
    """How a run's update is made of batches on `replicas` replicas.

    AdaScale takes N = S x B0 / B gradient samples of B examples per update,
    N / replicas of them accumulated on each replica; the other optimizers
    take one global batch of S x B0 examples per update.

    Args:
        run: a resolved run.
        replicas: `num_replicas_in_sync` of its strategy.
        label: what error messages start with (default: the run's name).

    Returns:
        `(global_batch, accumulation)`: examples per `model.fit` step and steps per update.

    Raises:
        ConfigError: if S x B0 is not a whole number of samples that splits over the replicas.
    """
    label = f"run '{run['run']}': " if label is None else label
    if is_auto(run):
        _, allowed = auto_steps(run, replicas, label)
        return samples_per_step(run, replicas) * run["dataset"]["batch_size"], allowed[0]
    words, per_step = _per_step_words(run, replicas), samples_per_step(run, replicas)
    scale, batch, baseline = run["optimizer"]["scale"], run["dataset"]["batch_size"], baseline_batch_size(run)
    examples = scale * baseline
    if run["optimizer"]["name"] not in ADASCALE_OPTIMIZERS:
        if examples != round(examples) or round(examples) % replicas:
            raise ConfigError(
                f"{label}the global batch optimizer.scale x baseline batch = {scale} x {baseline} = "
                f"{examples:g} must be a whole number that splits evenly over {replicas} "
                f"replica{'s' if replicas != 1 else ''}"
            )
        return round(examples), 1
    samples = examples / batch
    if samples != round(samples) or round(samples) % per_step:
        raise ConfigError(
            f"{label}optimizer.scale={scale} with baseline batch {baseline} means {examples:g} examples "
            f"per update, i.e. N = {samples:g} gradient samples of dataset.batch_size={batch}; N must be a "
            f"whole multiple of the {words} (N = replicas x {'groups x ' if per_step != replicas else ''}"
            f"accumulation steps, S = N x {batch} / {baseline})"
        )
    return per_step * batch, round(samples) // per_step


def resolve(raw, name):
    """Validates a raw config and expands it into its runs.

    Args:
        raw: the parsed config (a dict).
        name: experiment name to use when the config has none.

    Returns:
        A list of dicts, one per run, each with every key of `SCHEMA` resolved
        and a `run` key holding the run's name.

    Raises:
        ConfigError: naming every bad key or value of the config at once.
    """
    errors, run_errors = [], {}  # run_errors: {message: [names of the runs it is about]}
    base_bad = set()
    base = _merge(defaults(), raw, SCHEMA, errors, bad=base_bad)
    base["name"] = base["name"] or name
    variants = base.pop("runs") or [{"name": base["optimizer"]["name"]}]
    runs, seen = [], set()
    for index, variant in enumerate(variants):
        if not isinstance(variant, dict) or not isinstance(variant.get("name"), str) or not variant["name"]:
            errors.append(f"runs[{index}] must be a mapping with a non-empty string 'name'; got {variant!r}")
            continue
        overrides = {key: value for key, value in variant.items() if key != "name"}
        if "runs" in overrides:
            errors.append(f"runs[{index}] ('{variant['name']}') must not hold 'runs'")
            continue
        if variant["name"] in seen:
            errors.append(f"runs[{index}]: the run name '{variant['name']}' is used twice")
        seen.add(variant["name"])
        problems = []
        run_bad = set(base_bad)
        run = _merge({**base, "runs": None}, overrides, SCHEMA, problems, bad=run_bad)
        del run["runs"]
        run["run"] = variant["name"]
        for message in problems + _run_errors(run, run_bad):
            run_errors.setdefault(message, []).append(variant["name"])
        runs.append(run)
    # A top-level value that breaks a rule breaks it in every run: one message names them all.
    for message, names in run_errors.items():
        label = f"run '{names[0]}'" if len(names) == 1 else "runs " + ", ".join(f"'{name}'" for name in names)
        errors.append(f"{label}: {message}")
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"the config has {len(errors)} errors:\n" + "\n".join(f"  {error}" for error in errors))
    return runs


def parse_override(text):
    """Parses one `--set key.path=value` into (["key", "path"], value); the value is YAML."""
    key, separator, value = text.partition("=")
    if not separator or not key.strip():
        raise ConfigError(f"--set expects key.path=value; got {text!r}")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {key}: the value {value!r} is not valid YAML: {error}") from error
    return key.strip().split("."), parsed


def apply_overrides(raw, overrides):
    """Returns a copy of `raw` with each `--set` applied (before validation).

    Args:
        raw: the parsed config.
        overrides: strings `key.path=value`; `runs.<name>.key=value` changes one run.
    """
    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        target = raw
        if path[0] == "runs" and len(path) > 2:
            matches = [run for run in raw.get("runs") or [] if isinstance(run, dict) and run.get("name") == path[1]]
            if not matches:
                names = [run.get("name") for run in raw.get("runs") or [] if isinstance(run, dict)]
                raise ConfigError(f"--set {text}: no run named '{path[1]}'; runs: {names}")
            target, path = matches[0], path[2:]
        for part in path[:-1]:
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: '{part}' is not a section")
            target = child
        target[path[-1]] = value
    return raw


def load(path, overrides=()):
    """Reads, overrides and validates a YAML or JSON config file.

    Args:
        path: the config file (`.yaml`, `.yml` or `.json`).
        overrides: `--set` strings, applied before validation.

    Returns:
        The list of resolved runs (see `resolve`).

    Raises:
        ConfigError: for a missing or unparsable file, or a bad key or value.
    """
    return resolve(apply_overrides(load_raw(path), overrides), name=pathlib.Path(path).stem)


def load_raw(path):
    """Reads a YAML or JSON config file without validating it.

    Returns:
        The parsed mapping.

    Raises:
        ConfigError: for a missing or unparsable file, or a top level that is not a mapping.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from error
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    return raw
