"""One run of an experiment: strategy, data, model, optimizer, `model.fit`, and its run folder."""

import dataclasses
import json
import math
import os
import pathlib
import shutil
import tempfile
import time

import keras
import tensorflow as tf

from keras_adascale import AdaScaleAdam, AdaScaleSGD, AutoScale
from keras_adascale.autoscale import updates_done
from keras_adascale.base import AdaScaleBase
from keras_adascale.experiments import config as config_lib
from keras_adascale.experiments import data, models, plots, strategies
from keras_adascale.experiments.config import ConfigError
from keras_adascale.experiments.recording import RunRecorder
from keras_adascale.experiments.rundirs import read_jsonl
from keras_adascale.schedules import LinearScalingSchedule, ScaleInvariantSchedule


def build_schedule(run):
    """The single-batch learning-rate schedule, a function of single-batch steps.

    Returns:
        A float (constant) or a `LearningRateSchedule`.
    """
    config, total_steps = run["schedule"], run["total_steps"]
    rate = config["learning_rate"]
    if config["name"] == "constant":
        return rate
    if config["name"] == "cosine":
        return keras.optimizers.schedules.CosineDecay(rate, decay_steps=total_steps)
    boundaries = [max(1, round(fraction * total_steps)) for fraction in config["decay_at"]]
    values = [rate * config["decay_factor"] ** index for index in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """How a run steps (see `plan`).

    Attributes:
        optimizer: a Keras optimizer, not built.
        schedule: what an optimizer other than AdaScale steps with, per
            update (None for AdaScale, which evaluates its own at tau).
        batch_size: global examples per `model.fit` step.
        accumulation: `model.fit` steps per update.
        tau_per_update: for optimizers other than AdaScale, the schedule
            steps one update covers (None for AdaScale: its gain).
        min_updates: the fewest updates the run can take.
        max_updates: the most (AdaScale's gain lies in [1, S]).
        autoscale: for `optimizer.scale: auto`, the `AutoScale` callback's arguments and
            `steps_per_epoch` (a multiple of every allowed count); else None.
    """

    optimizer: keras.optimizers.Optimizer
    schedule: object
    batch_size: int
    accumulation: int
    tau_per_update: object
    min_updates: int
    max_updates: int
    autoscale: dict | None = None


def plan(run, replicas):
    """How a run steps: its optimizer, batches and schedule.

    Args:
        run: a resolved run.
        replicas: `num_replicas_in_sync` of its strategy.

    Returns:
        A `RunPlan`.
    """
    config, total_steps = run["optimizer"], run["total_steps"]
    name, scale = config["name"], config["scale"]
    batch_size, accumulation = config_lib.batches_per_update(run, replicas)
    per_step = config_lib.samples_per_step(run, replicas)
    single_batch = build_schedule(run)
    adam = name.startswith("adam") or name == "adascale_adam"
    if adam:
        common = {"beta_1": config["beta_1"], "beta_2": config["beta_2"], "epsilon": config["epsilon"]}
    else:
        common = {"momentum": config["momentum"], "nesterov": config["nesterov"]}
    common["weight_decay"] = config["weight_decay"]
    if name in config_lib.ADASCALE_OPTIMIZERS:
        extra = {"statistics": config["statistics"]} if adam else {}
        auto = _autoscale_plan(run, replicas) if config_lib.is_auto(run) else None
        if auto is not None:
            scale = auto["scale_per_step"] * accumulation
        # Where S = N the scale is left to default, so that the saved model loads at
        # any other N (elastic resume).
        optimizer = (AdaScaleAdam if adam else AdaScaleSGD)(
            ScaleInvariantSchedule(single_batch, total_steps=total_steps),
            scale=None if scale == per_step * accumulation else scale,
            smoothing=config["smoothing"],
            # An auto run accumulates from the start, so that its count can change.
            gradient_accumulation_steps=accumulation if accumulation > 1 or auto else None,
            **common,
            **extra,
        )
        largest = run["autoscale"]["max_scale"] if auto else scale
        return RunPlan(
            optimizer=optimizer, schedule=None, batch_size=batch_size, accumulation=accumulation,
            tau_per_update=None, min_updates=math.ceil(total_steps / largest), max_updates=total_steps,
            autoscale=auto,
        )
    if name in ("sgd", "adam"):
        schedule, tau_per_update = single_batch, 1
    else:
        updates = math.ceil(total_steps / scale)
        warmup = round(config["warmup_fraction"] * updates) if name == "lsr_warmup" else 0
        rate_factor = {"adam_fixed": 1, "adam_sqrt": math.sqrt(scale)}.get(name, scale)
        schedule = LinearScalingSchedule(single_batch, scale, warmup_steps=warmup, rate_factor=rate_factor)
        tau_per_update = scale
        if name == "adam_sqrt":  # Malladi et al. 2022's square-root rule at kappa = S
            common.update(
                beta_1=1.0 - min(1.0, scale * (1.0 - common["beta_1"])),
                beta_2=1.0 - min(1.0, scale * (1.0 - common["beta_2"])),
                epsilon=common["epsilon"] / math.sqrt(scale),
            )
    updates = math.ceil(total_steps / tau_per_update)
    optimizer = (keras.optimizers.Adam if adam else keras.optimizers.SGD)(schedule, **common)
    return RunPlan(
        optimizer=optimizer, schedule=schedule, batch_size=batch_size,
        accumulation=1, tau_per_update=tau_per_update, min_updates=updates, max_updates=updates,
    )


def _autoscale_plan(run, replicas):
    """The `AutoScale` arguments of an auto-scale run, and its epoch length in `model.fit` steps.

    Decisions come every (T_SI - warmup) / `autoscale.decisions` of tau, at any update boundary, and a
    change waits for a boundary where the micro-batches done are a multiple of the new count (`align`).
    Every allowed count divides the epoch, so each epoch ends on an update boundary and a backup resumes
    exactly, with no epoch per decision: the epochs are as many as a fixed run's (`evaluations`, sized by
    the micro-batches the run would take at its least S with perfect scaling, the fewest it can take).
    """
    settings = run["autoscale"]
    scale_per_step, allowed = config_lib.auto_steps(run, replicas)
    least_scale = scale_per_step * allowed[0]
    micro_batches = run["total_steps"] / least_scale * allowed[0]  # the fewest: at the least S, gain = S
    aligned = math.lcm(*allowed)
    steps_per_epoch = aligned * max(1, math.ceil(micro_batches / run["evaluations"] / aligned))
    warmup = settings["warmup"] if settings["warmup"] is not None else run["total_steps"] / 20
    return {
        "scale_per_step": scale_per_step,
        "steps_per_epoch": steps_per_epoch,
        "callback": {
            "objective": settings["objective"],
            "interval": max(run["total_steps"] - warmup, 0.0) / settings["decisions"], "warmup": float(warmup),
            "min_steps": allowed[0], "max_steps": allowed[-1], "allowed_steps": allowed,
            "threshold": settings["threshold"], "update_cost": settings["update_cost"],
            "target_efficiency": settings["target_efficiency"], "every": "update", "align": True, "verbose": 0,
        },
    }


def _describe_update(run, replicas, steps):
    """One line on what an update holds: S, N and the batches."""
    scale, batch = run["optimizer"]["scale"], run["dataset"]["batch_size"]
    baseline = config_lib.baseline_batch_size(run)
    if steps.autoscale:
        per_step = steps.autoscale["scale_per_step"]
        allowed = steps.autoscale["callback"]["allowed_steps"]
        return (f"S = auto ({run['autoscale']['objective']}): S = {per_step:g} x k for k in "
                f"{', '.join(map(str, allowed))} accumulation steps of {replicas} replicas"
                f"{' x ' + str(run['optimizer']['groups']) + ' groups' if run['optimizer']['groups'] > 1 else ''}"
                f" x {batch} examples "
                f"(baseline batch {baseline}), re-decided every {steps.autoscale['callback']['interval']:g} of tau "
                f"after a warm-up of {steps.autoscale['callback']['warmup']:g}")
    if run["optimizer"]["name"] in config_lib.ADASCALE_OPTIMIZERS:
        groups = run["optimizer"]["groups"]
        samples = replicas * groups * steps.accumulation
        grouped = f" x {groups} groups" if groups > 1 else ""
        return (f"S = {scale:g} baseline batches of {baseline} per update: N = {samples} gradient samples "
                f"of {batch} examples ({replicas} replicas{grouped} x {steps.accumulation} accumulation steps)")
    return f"S = {scale:g}: one global batch of {steps.batch_size} examples per update ({replicas} replicas)"


def _worker_suffix(strategy):
    """'' on the chief; '.worker<i>' on the other workers of a multi-worker strategy, and '.process<i>' on the
    processes but the first of a JAX job of several (`keras_adascale.launch`), which train the same model but
    must not write into the chief's run folder."""
    if keras.backend.backend() == "jax":
        import jax

        return f".process{jax.process_index()}" if jax.process_index() else ""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return ""
    if resolver.task_type in (None, "chief") or (resolver.task_type == "worker" and resolver.task_id == 0
                                                 and "chief" not in resolver.cluster_spec().jobs):
        return ""
    return f".{resolver.task_type}{resolver.task_id}"


class _ChiefBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Every worker restores from the chief's backup and only the chief writes it.

    Keras 3's callback would let every worker of a multi-worker job write and
    delete the same files, and workers killed at different moments would
    restore different epochs and deadlock; the weights are the same on every
    worker. A save is also atomic here (see `_save_model`).
    """

    def __init__(self, backup_dir, is_chief):
        super().__init__(backup_dir)
        self.is_chief = is_chief
        # In a JAX job of several processes a save is collective (Keras makes variables as it saves, which JAX
        # checks across the processes): every process saves, the others into a scratch file they delete.
        self.saves_everywhere = keras.backend.backend() == "jax" and _process_count() > 1

    def on_train_begin(self, logs=None):
        metadata = pathlib.Path(self._training_metadata_path)
        named = json.loads(metadata.read_text()).get("weights") if metadata.exists() else None
        if named:  # written by `_save_model` below (Keras's own layout has only latest.weights.h5)
            self._weights_path = str(pathlib.Path(self.backup_dir) / named)
        try:
            super().on_train_begin(logs)
        except OSError as error:  # h5py's, for a backup cut short (a run killed while it was written)
            raise ConfigError(
                f"cannot resume from {self._weights_path}: the backup is unreadable ({error}). Delete "
                f"{pathlib.Path(self.backup_dir).parent} to train the run from the start"
            ) from error

    def _save_model(self):
        # Keras writes the weights, then the metadata, in place: a process killed between the
        # two resumes the new weights at the old epoch (and that epoch's data). Here the metadata
        # is the commit: each save writes its weights under a new name, then atomically replaces
        # the metadata that names them, then deletes the older weights.
        if not self.is_chief:
            with tempfile.TemporaryDirectory() as scratch:
                self.model.save_weights(str(pathlib.Path(scratch) / "scratch.weights.h5"), overwrite=True)
            return
        backup = pathlib.Path(self.backup_dir)
        backup.mkdir(parents=True, exist_ok=True)
        weights = f"epoch{self._current_epoch}_batch{self._last_batch_seen}.weights.h5"
        self.model.save_weights(str(backup / weights), overwrite=True)
        staged = backup / "training_metadata.json.staged"
        staged.write_text(json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen,
                                      "weights": weights}))
        os.replace(staged, self._training_metadata_path)
        for older in backup.glob("*.weights.h5"):
            if older.name != weights:
                older.unlink()

    def on_epoch_end(self, epoch, logs=None):
        if self.is_chief or self.saves_everywhere:
            super().on_epoch_end(epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        if self.is_chief or self.saves_everywhere:
            super().on_train_batch_end(batch, logs)

    def on_train_end(self, logs=None):
        if self.is_chief:  # the chief deletes its backup once the run is complete
            super().on_train_end(logs)


def _process_count():
    import jax

    return jax.process_count()


def _epochs_done(backup_dir):
    """Epochs that `keras.callbacks.BackupAndRestore` saved in `backup_dir` (0 if none)."""
    path = backup_dir / "training_metadata.json"
    return json.loads(path.read_text())["epoch"] if path.exists() else 0


def _flatten(config, prefix=""):
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _config_differences(run_dir, run):
    """The keys whose values differ between `run` and the config saved in `run_dir`, as text ('' if none)."""
    path = run_dir / "config.json"
    if not path.exists():
        return "no config.json"
    saved, wanted = _flatten(json.loads(path.read_text())), _flatten(run)
    missing = object()
    return ", ".join(
        f"{key}: {json.dumps(saved.get(key))} there, {json.dumps(wanted.get(key))} now"
        for key in sorted(set(saved) | set(wanted))
        if saved.get(key, missing) != wanted.get(key, missing)
    )


def finished_run(run, output_root):
    """The finished folder of `run` under `output_root` if it was trained from this same config, else None.

    A study uses it to keep the runs it has already trained: nothing that
    `train` would write differently is kept, since every key of the resolved
    run is compared with the `config.json` the folder was trained from.
    """
    final_dir = pathlib.Path(output_root) / run["name"] / run["run"]
    if (final_dir / "final.json").exists() and not _config_differences(final_dir, run):
        return final_dir
    return None


@dataclasses.dataclass(frozen=True)
class _RunFolders:
    """Where a run is written: `work` (`<run>.incomplete`) while it trains, `final` once finished."""

    final: pathlib.Path
    work: pathlib.Path
    backup: pathlib.Path  # the chief's BackupAndRestore folder, which every worker restores from
    is_chief: bool
    stale: bool  # `work` holds an interrupted run of another config, to be discarded


def _run_folders(run, strategy, output_root, overwrite):
    """The run's folders, once it is clear that training may write them (nothing is written here).

    Raises:
        ConfigError: if the finished folder exists and `overwrite` is false, or an
            interrupted run with a different config is in the way.
    """
    suffix = _worker_suffix(strategy)
    final_dir = output_root / run["name"] / (run["run"] + suffix)
    work_dir = final_dir.with_name(final_dir.name + ".incomplete")
    if final_dir.exists() and not overwrite:
        raise ConfigError(f"{final_dir} exists; pass --overwrite to train it again")
    differences = _config_differences(work_dir, run) if work_dir.exists() else ""
    if differences and not overwrite:
        raise ConfigError(
            f"{work_dir} holds an interrupted run with another config ({differences}); pass --overwrite "
            "to discard it, or train the config it was started with to resume it"
        )
    return _RunFolders(
        final=final_dir, work=work_dir, backup=output_root / run["name"] / (run["run"] + ".incomplete") / "backup",
        is_chief=not suffix, stale=bool(differences),
    )


def _compiled_model(run, placement):
    """The run's model and plan, compiled where `placement` says after its dataset has been checked.

    On JAX an AdaScale run's model is an `AdaScaleModel`, whose train step gives the optimizer each
    replica's gradient statistics under a `keras.distribution` (on one device it is Keras's own step).

    Raises:
        ConfigError: if the dataset cannot be used, or the model is not for its task.
    """
    input_shape, num_classes = data.describe(run["dataset"])
    language_model = data.is_language_model(run["dataset"])
    model_name = run["model"]["name"]
    if (model_name in models.LANGUAGE_MODELS) != language_model:
        has = "token sequences" if language_model else "images"
        raise ConfigError(
            f"model.name: '{model_name}' does not fit dataset '{run['dataset']['name']}', which has {has}"
        )
    data.prepare(run["dataset"])
    keras.utils.set_random_seed(run["seed"])
    with placement.build_scope():
        steps = plan(run, placement.replicas)
        model = models.build(run["model"], input_shape, num_classes)
        if keras.backend.backend() == "jax" and isinstance(steps.optimizer, AdaScaleBase):
            model = models.per_replica(model, groups=run["optimizer"]["groups"])
        model.compile(
            optimizer=steps.optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            # JAX's step is always jitted (config.SCHEMA's jit_compile): Keras's False runs it op by op there.
            jit_compile=run["jit_compile"] or keras.backend.backend() == "jax",
        )
    return model, steps


def _test_split_problem(run):
    """Why the run's strategy cannot evaluate its test split, or None: `data_parallel` splits every batch
    evenly over its devices (the last, smaller one too)."""
    if run["strategy"]["name"] != "data_parallel":
        return None
    replicas, split = run["strategy"]["devices"], run["dataset"]["test_split"]
    examples = data.split_size(run["dataset"], split)
    if examples % replicas == 0:
        return None
    return (f"dataset.test_split: '{split}' holds {examples} examples, which strategy.name=data_parallel cannot "
            f"split evenly over {replicas} devices (keras.distribution splits every batch evenly); choose a test "
            f"split of a multiple of {replicas} examples, e.g. '{split.split('[')[0]}[:{examples - examples % replicas}]'")


def check_test_splits(runs):
    """Checks, before any run trains, that each run's strategy can evaluate its test split.

    Raises:
        ConfigError: naming each test split that `data_parallel` cannot split evenly over its devices.
    """
    problems = sorted({problem for problem in map(_test_split_problem, runs) if problem})
    if problems:
        raise ConfigError("; ".join(problems))


def _test_batch_size(run, steps, placement):
    """The test split's batch: at least 256 examples; under a `keras.distribution` a multiple of the replicas.

    Raises:
        ConfigError: if the strategy cannot split the test split evenly over the replicas.
    """
    problem = _test_split_problem(run)
    if problem:
        raise ConfigError(problem)
    size = max(steps.batch_size, 256)
    if placement.distribution is None:
        return size
    replicas = placement.replicas
    if _process_count() > 1:
        # Keras cuts every batch into the processes' parts of a fixed size (the full batch's share), so a smaller
        # last batch would give the processes unequal parts, which JAX joins into a wrong global batch without a
        # word: here every batch is full, the largest multiple of the replicas up to `size` that divides the split.
        examples = data.split_size(run["dataset"], run["dataset"]["test_split"])
        return next(batch for batch in range(size - size % replicas, 0, -replicas) if examples % batch == 0)
    return -(-size // replicas) * replicas


def _open_work_dir(folders, run):
    """Creates `<run>.incomplete` (afresh for a stale one) holding the run's `config.json`."""
    if folders.stale:
        shutil.rmtree(folders.work)
    folders.work.mkdir(parents=True, exist_ok=True)
    (folders.work / "config.json").write_text(json.dumps(run, indent=2) + "\n")


def _fit(run, model, steps, folders, test_data, replicas):
    """`model.fit` until tau >= T_SI, resuming from the backup of an interrupted run.

    Returns:
        The seconds `model.fit` took in this process.
    """
    if steps.autoscale:
        steps_per_epoch = steps.autoscale["steps_per_epoch"]
        largest = steps.autoscale["callback"]["max_steps"]
        epochs = math.ceil(steps.max_updates * largest / steps_per_epoch) + 1
    else:
        updates_per_epoch = max(1, math.ceil(steps.min_updates / run["evaluations"]))
        steps_per_epoch = updates_per_epoch * steps.accumulation
        epochs = math.ceil(steps.max_updates / updates_per_epoch) + 1
    epochs_done = _epochs_done(folders.backup)
    if epochs_done:
        done = (f"{epochs_done * steps_per_epoch} micro-batches" if steps.autoscale
                else f"{epochs_done} epochs, {epochs_done * updates_per_epoch} updates")
        print(f"resuming {run['name']}/{run['run']} from epoch {epochs_done} (after {done})", flush=True)
    # BackupAndRestore resumes at the start of the interrupted epoch; the seeded stream
    # of batches is the same in every process, so starting it after the batches of the
    # finished epochs puts the data where the uninterrupted run had it.
    train_data = data.train_dataset(run["dataset"], steps.batch_size, seed=run["seed"],
                                    skip_batches=epochs_done * steps_per_epoch)
    recorder = RunRecorder(
        folders.work, run["total_steps"], steps.tau_per_update, steps.schedule,
        steps.batch_size, test_data, run["evaluations"], label=run["run"],
        bits_per_character=data.is_language_model(run["dataset"]),
        replicas=config_lib.samples_per_step(run, replicas),  # gradient samples per micro-batch
    )
    auto = [AutoScale(**steps.autoscale["callback"])] if steps.autoscale else []
    start = time.perf_counter()
    model.fit(
        train_data,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        callbacks=[_ChiefBackupAndRestore(str(folders.backup), is_chief=folders.is_chief), *auto,
                   *recorder.callbacks(model.optimizer)],
        shuffle=False,  # the dataset shuffles itself
        verbose=0,
    )
    return time.perf_counter() - start


def _summary(run, replicas, steps, model, work_dir, fit_seconds):
    """`final.json`: what the run was and where it ended."""
    rows = read_jsonl(work_dir / "metrics.jsonl")
    last = read_jsonl(work_dir / "evaluations.jsonl")[-1]  # at tau >= T_SI
    bits = {"test_bits_per_character": last["test_bits_per_character"]} if "test_bits_per_character" in last else {}
    adascale = run["optimizer"]["name"] in config_lib.ADASCALE_OPTIMIZERS
    baseline = config_lib.baseline_batch_size(run)
    accumulation = model.optimizer.accumulation_steps if adascale else steps.accumulation
    auto = {}
    if steps.autoscale:
        scales = [row["scale"] for row in rows]
        # S of an auto run: its mean over updates (what advise and compare read), then the details.
        auto = {"scale_setting": config_lib.AUTO, "autoscale": run["autoscale"], "final_scale": scales[-1],
                "max_scale_used": max(scales), "min_scale_used": min(scales)}
    return {
        "experiment": run["name"],
        "run": run["run"],
        "optimizer": run["optimizer"]["name"],
        "scale": sum(row["scale"] for row in rows) / len(rows) if steps.autoscale else run["optimizer"]["scale"],
        **auto,
        "samples": config_lib.samples_per_step(run, replicas) * accumulation if adascale else 1,
        "batch_size": run["dataset"]["batch_size"],
        "baseline_batch_size": baseline,
        "replicas": replicas,
        "groups": run["optimizer"]["groups"] if adascale else 1,
        "accumulation": accumulation,
        "updates": updates_done(model.optimizer),
        "tau": rows[-1]["tau"],
        "examples": rows[-1]["examples"],
        "baseline_batches": rows[-1]["examples"] / baseline,
        "mean_gain": sum(row["gain"] for row in rows) / len(rows),
        "final_train_loss": rows[-1]["loss"],
        "test_loss": last["test_loss"],
        "test_accuracy": last["test_accuracy"],
        **bits,
        "wall_time": rows[-1]["wall_time"],
        "fit_seconds_this_session": fit_seconds,
    }


def _finish(folders, model, final):
    """Writes the model, `final.json` and the plots, then renames `<run>.incomplete` to `<run>`."""
    model.save(folders.work / "model.keras")
    (folders.work / "final.json").write_text(json.dumps(final, indent=2) + "\n")
    plots.plot_run(folders.work)
    if folders.final.exists():
        shutil.rmtree(folders.final)
    folders.work.rename(folders.final)


def train(run, output_root, overwrite=False):
    """Trains one run and writes its folder `output_root/<experiment>/<run>`.

    The data, model and optimizer are built before the folder is created,
    so a run that fails on its config leaves nothing behind. The run is
    written into `<run>.incomplete` and renamed when it has finished, so a
    folder without the suffix is always complete. An interrupted run with
    the same config resumes from its last epoch
    (`keras.callbacks.BackupAndRestore`), with the data stream at the same
    batch as in an uninterrupted run.

    Under a multi-worker strategy the chief writes the run folder and every
    other worker writes `<run>.<task_type><task_id>` beside it (in a JAX job
    of several processes, `<run>.process<i>`). On JAX the run trains under
    the `keras.distribution` its strategy names (see `strategies.place`).

    Args:
        run: a resolved run (see `config.resolve`).
        output_root: `pathlib.Path` under which run folders are written.
        overwrite: replace an existing finished run instead of failing.

    Returns:
        The `pathlib.Path` of the finished run folder.

    Raises:
        ConfigError: if the dataset cannot be used, the finished folder exists
            and `overwrite` is false, an interrupted run with a different
            config is in the way (the message lists the keys that differ), or
            the backup of an interrupted run cannot be read.
    """
    placement = strategies.place(run["strategy"])
    folders = _run_folders(run, placement.strategy, output_root, overwrite)
    with placement.run_scope():
        model, steps = _compiled_model(run, placement)
        replicas = placement.replicas
        print(f"  {_describe_update(run, replicas, steps)}", flush=True)
        test_data = data.test_dataset(run["dataset"], _test_batch_size(run, steps, placement))
        _open_work_dir(folders, run)
        fit_seconds = _fit(run, model, steps, folders, test_data, replicas)
        _finish(folders, model, _summary(run, replicas, steps, model, folders.work, fit_seconds))
    return folders.final
