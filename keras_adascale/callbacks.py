"""AdaScaleCallback: stop at tau >= T_SI and log gain, tau and learning rate; AutoScale: S chosen during training."""

import inspect
import os
import sys
import time
import warnings

import keras
from absl import logging

from keras_adascale import autoscale, validation
from keras_adascale.base import AdaScaleBase
from keras_adascale.schedules import ScaleInvariantSchedule


# Every statistic of `snapshot()`: with log_dir all go to TensorBoard as update_<name>.
STATISTICS = ("gain", "scale_invariant_iterations", "effective_learning_rate", "skipped_updates",
              "gradient_variance", "gradient_sqr_norm", "gradient_noise_scale", "scaling_efficiency",
              "scale", "accumulation_steps")
# What AdaScaleCallback adds to the logs by default: what a user watches in the progress bar.
DEFAULT_LOGGED = ("gain", "scale_invariant_iterations", "effective_learning_rate", "scale")


def print_message(message):
    """Prints as Keras's callbacks do: to stdout, or to absl's log where interactive logging is off
    (`keras.config.disable_interactive_logging()`)."""
    if keras.config.is_interactive_logging_enabled():
        sys.stdout.write(f"{message}\n")
        sys.stdout.flush()
    else:
        logging.info(message)


def _number(value):
    """`value` as a message shows it: at most two decimals, no trailing zeros (300, 301.5)."""
    return f"{float(value):.2f}".rstrip("0").rstrip(".")


def _logged_names(logged):
    if logged == "all":
        return STATISTICS
    if isinstance(logged, str):
        logged = (logged,)
    names = tuple(logged)
    unknown = [name for name in names if name not in STATISTICS]
    if unknown:
        raise ValueError(
            f"Argument `logged` must be 'all' or names among {', '.join(STATISTICS)}. Received: {unknown}"
        )
    return names


def _adascale_optimizer(model, who):
    optimizer = model.optimizer
    # LossScaleOptimizer (mixed precision) wraps the optimizer.
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if not isinstance(optimizer, AdaScaleBase):
        raise ValueError(
            f"{who} needs a model compiled with an AdaScale optimizer (AdaScaleSGD or "
            f"AdaScaleAdam). Received: {type(optimizer).__name__}"
        )
    return optimizer


class AdaScaleCallback(keras.callbacks.Callback):
    """Logs AdaScale's state and stops training once tau >= T_SI.

    Adds to the batch and epoch logs, so that they appear in the progress
    bar, in `History` and, when `keras.callbacks.TensorBoard` comes after this
    callback in the list, in TensorBoard (per epoch by default), the
    statistics named in `logged`. By default what a user watches: `gain`,
    `scale_invariant_iterations` (tau), `effective_learning_rate` (the gain's
    factor times the scheduled rate, as used by the last update) and `scale`
    (S of the next update). `logged="all"` adds the rest too:
    `skipped_updates` (updates skipped for NaN or Inf gradients),
    `gradient_variance` and `gradient_sqr_norm` (the smoothed sigma^2 and mu^2),
    `gradient_noise_scale` (sigma^2 / mu^2 in baseline batches, see
    `AdaScaleSGD.gradient_noise_scale`), `scaling_efficiency` (gain / S:
    the share of the S-fold batch that turns into progress) and
    `accumulation_steps` (k of the next update). `optimizer.snapshot()`
    reads all of them at any time, and `log_dir` writes all of them. Sets
    `model.stop_training` once tau reaches `total_steps`.

    Keras's `TensorBoard(update_freq="batch")` indexes its `batch_*` scalars by
    `model.fit` step, which under `gradient_accumulation_steps` is a
    micro-batch, not an update. With `log_dir`, this callback writes
    `update_<name>` for each of those values once per
    update, at step `optimizer.iterations` (the update count, as Keras's own
    `evaluation_*_vs_iterations`), into the `train` run of that log directory.

    A `fit` that starts with tau already at `total_steps` (a resumed run that had
    finished) runs no batch: the callback prints why (`verbose=1`) and `fit`
    returns an empty `History`.

    With `non_finite="raise"` on the optimizer it also raises after a batch whose
    update was skipped: inside an XLA-compiled step (`jit_compile=True`) the
    optimizer's own check cannot fail the step, so this is where it fails.

    Args:
        total_steps: optional number, T_SI. Defaults to the `total_steps` of
            the optimizer's `ScaleInvariantSchedule`, if it has one; with
            neither, training is not stopped.
        log_dir: optional path; the `log_dir` of a `keras.callbacks.TensorBoard`
            to add the per-update scalars to (every statistic, whatever `logged`
            says). Needs the `tensorboard` package.
        logged: the statistics added to the logs: a tuple of names (default: gain,
            tau, learning rate and S), or `"all"`.
        verbose: 0 or 1 (default), whether to print why `fit` runs no batch when
            tau is already at `total_steps` as it starts.

    References:
        Johnson et al., 2020, Algorithm 1 (the loop `while tau < T_SI`).
    """

    def __init__(self, total_steps=None, log_dir=None, logged=DEFAULT_LOGGED, verbose=1):
        super().__init__()
        self.verbose = verbose
        self._saved_initial_epoch = None
        self.total_steps = validation.optional(validation.positive, total_steps, "total_steps")
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.logged = _logged_names(logged)
        self._writer = None
        self._warned = False

    def _optimizer(self):
        return _adascale_optimizer(self.model, type(self).__name__)

    def _resolved_total_steps(self, optimizer):
        if self.total_steps is not None:
            return self.total_steps
        schedule = optimizer._learning_rate
        if isinstance(schedule, ScaleInvariantSchedule):
            return schedule.total_steps
        return None

    def on_train_begin(self, logs=None):
        optimizer = self._optimizer()
        self._skipped = int(optimizer.skipped_updates)
        total_steps = self._resolved_total_steps(optimizer)
        if total_steps is None and not self._warned:
            # Once per callback, not once per process: warnings.warn's registry would silence the
            # same warning from a second callback in the same session.
            self._warned = True
            warnings.warn_explicit(
                "AdaScaleCallback has no T_SI to stop at: the optimizer's learning rate is not a "
                "ScaleInvariantSchedule with total_steps, and no total_steps was given, so training runs "
                "every epoch passed to fit. Give T_SI as AdaScaleCallback(total_steps=...) or "
                "ScaleInvariantSchedule(..., total_steps=...).",
                UserWarning, __file__, inspect.currentframe().f_lineno, module=__name__, registry={},
            )
        self._saved_initial_epoch = None
        tau = float(optimizer.scale_invariant_iterations)
        if total_steps is not None and tau >= total_steps:
            self._stop_before_any_batch(tau, total_steps)
        if self.log_dir is not None:
            # The same folder as keras.callbacks.TensorBoard's training scalars: one run in TensorBoard.
            # tf.summary writes TensorBoard's files on every backend, as keras.callbacks.TensorBoard does.
            import tensorflow as tf

            self._summary = tf.summary
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))
            self._logged_update = autoscale.updates_done(optimizer)

    def _stop_before_any_batch(self, tau, total_steps):
        """tau is at T_SI before `fit`'s first batch: no epoch runs (Keras checks `stop_training` only
        after a batch), and why is printed, as EarlyStopping says why it stopped."""
        self.model.stop_training = True
        # The epoch fit starts from, as BackupAndRestore sets it: fit's `epochs`, past its last, so that none runs.
        # Put back at the end of fit, where Keras would leave it for the next fit to start from.
        self._saved_initial_epoch = (self.model._initial_epoch,)
        self.model._initial_epoch = self.params.get("epochs", 0)
        if self.verbose:
            print_message(
                f"AdaScaleCallback: tau {_number(tau)} >= total_steps {_number(total_steps)}: training is "
                "complete, so fit runs no batch. To train further, give a larger total_steps."
            )

    def on_train_end(self, logs=None):
        if self._saved_initial_epoch is not None:
            (self.model._initial_epoch,) = self._saved_initial_epoch
            self._saved_initial_epoch = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _log(self, logs):
        """Adds the optimizer's snapshot to `logs` (one state read), stops at T_SI; returns the snapshot."""
        optimizer = self._optimizer()
        snapshot = optimizer.snapshot()
        if logs is not None:
            logs.update({name: snapshot[name] for name in self.logged})
        total_steps = self._resolved_total_steps(optimizer)
        if total_steps is not None and snapshot["scale_invariant_iterations"] >= total_steps:
            self.model.stop_training = True
        return snapshot

    def _write_update(self, optimizer, snapshot):
        update = autoscale.updates_done(optimizer)
        if update == self._logged_update:
            return  # a micro-batch of gradient accumulation: no update yet
        self._logged_update = update
        with self._writer.as_default(step=update):
            for name in STATISTICS:
                self._summary.scalar(f"update_{name}", snapshot[name])

    def on_train_batch_end(self, batch, logs=None):
        snapshot = self._log(logs)
        optimizer = self._optimizer()
        if self._writer is not None:
            self._write_update(optimizer, snapshot)
        skipped = snapshot["skipped_updates"]
        if skipped > self._skipped and optimizer.non_finite == "raise":
            raise FloatingPointError(
                f"{type(optimizer).__name__} skipped an update for NaN or Inf gradients at batch {batch} "
                "(non_finite='raise'); weights, tau and the averages are as before it."
            )
        self._skipped = skipped

    def on_epoch_end(self, epoch, logs=None):
        self._log(logs)


class AutoScale(keras.callbacks.Callback):
    """Chooses S during `model.fit`: the accumulation count follows the gradient noise scale.

    The gradient noise scale grows through training, so the S that pays is
    small early and large late. Every `interval` scale-invariant iterations
    (after `warmup`), this callback asks `keras_adascale.autoscale.decide`
    for the accumulation count k that its objective prefers, from the
    optimizer's current statistics, and calls
    `optimizer.set_accumulation_steps(k)` when that k is predicted better by
    more than `threshold` (S keeps its ratio to N, so with R replicas
    S = R x k by default). tau keeps the single-batch schedule, so nothing
    else changes. The objectives ("budget", "efficiency", "goodput") and
    their parameters are `keras_adascale.autoscale.ScalePolicy`'s; "goodput"
    times each update here: its micro-batches' steps only (from this
    callback's batch begin to its batch end), not what runs between them
    (callbacks listed after this one, epoch ends), and neither the first
    update of a `fit` nor the first after a change (they may hold a trace).

    Adds `scale` and `accumulation_steps` to the batch and epoch logs (the
    progress bar, `History`, and TensorBoard when `keras.callbacks.TensorBoard`
    comes after it), prints each change once with its reason (`verbose=1`),
    and keeps them in `changes`. To cost little per step, it reads the
    optimizer where an update completes (not after every micro-batch), and
    its statistics only where a decision may be due: a change that another
    callback makes shows in the logs from the next completed update. The optimizer must be made with
    `gradient_accumulation_steps` (the count to start from, 1 allowed).

    Args:
        objective: "budget" (default), "efficiency" or "goodput"; see `ScalePolicy`.
        interval: scale-invariant iterations between decisions (0: at every
            chance); see `ScalePolicy`.
        warmup: tau before the first decision; see `ScalePolicy`.
        min_steps: the least accumulation count k; see `ScalePolicy`.
        max_steps: the largest k. Defaults to 32.
        threshold: the predicted improvement a change needs. Defaults to 0.05.
        update_cost: "budget": the baseline batches of examples one update is
            worth; see `ScalePolicy`.
        target_efficiency: "efficiency": the least predicted gain / S; see
            `ScalePolicy`.
        allowed_steps: optional list of the counts k allowed (e.g. powers of two).
        every: "update" (default): a decision may come after any update, when
            `interval` is due; "epoch": only at the start of an epoch (with
            `interval=0`, at every epoch, as AdaptDL decides once per pass).
            With "epoch" and a `steps_per_epoch` that every allowed k divides,
            each epoch ends at an update boundary, so that
            `keras.callbacks.BackupAndRestore` resumes exactly.
        align: apply each change only at an update boundary where the micro-batches done are a
            multiple of the new count (see `ScalePolicy`): with `every="update"` and a
            `steps_per_epoch` that every allowed k divides, each epoch still ends on an update
            boundary, and `BackupAndRestore` resumes exactly without an epoch per decision.
        verbose: 0 or 1, whether to print each change.
    """

    def __init__(self, objective="budget", *, interval=100.0, warmup=None, min_steps=None, max_steps=32,
                 threshold=0.05, update_cost=1.0, target_efficiency=0.8, allowed_steps=None, every="update",
                 align=False, verbose=1):
        super().__init__()
        if every not in ("update", "epoch"):
            raise ValueError(f"Argument `every` must be 'update' or 'epoch'. Received: every={every!r}")
        self.policy = autoscale.ScalePolicy(
            objective, interval=interval, warmup=warmup, min_steps=min_steps, max_steps=max_steps,
            threshold=threshold, update_cost=update_cost, target_efficiency=target_efficiency, align=align,
        )
        self.policy.allowed_steps = None if allowed_steps is None else sorted(allowed_steps)
        self.every = every
        self.verbose = verbose
        self._clock = time.perf_counter  # the goodput objective's clock (tests give a fake one)

    @property
    def changes(self):
        """Each change made: update, tau, from_steps, steps, scale, noise_scale, reason."""
        return self.policy.changes

    def on_train_begin(self, logs=None):
        optimizer = _adascale_optimizer(self.model, type(self).__name__)
        if not optimizer.gradient_accumulation_steps:
            raise ValueError(
                "AutoScale changes the accumulation steps: compile the model with an optimizer made with "
                "`gradient_accumulation_steps=k` (the count to start from; 1 is allowed). Received: "
                f"{type(optimizer).__name__} without gradient accumulation."
            )
        self._setting = optimizer._setting_numbers()
        self._update = self._setting.updates
        # The setting is read where an update completes, not after every micro-batch: after a completed
        # update the next one holds `steps` micro-batches (a change made mid-update waits for the next
        # one), so it is read again after that many. Until the first completion is seen (a fit may start
        # in the middle of an update), and after a change, after every micro-batch.
        self._until_read = 1
        # "goodput" times the updates only: from this callback's batch begin to its batch end, summed over
        # an update's micro-batches, so that what runs between steps (evaluations in callbacks after this
        # one, epoch ends, backups) is not charged to the next update. The first update of a fit (the
        # trace) and the first after a change of k are not timed.
        self._update_seconds = 0.0
        self._untimed = True
        self._batch_started = None

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_started = self._clock()

    def on_train_batch_end(self, batch, logs=None):
        optimizer = _adascale_optimizer(self.model, type(self).__name__)
        if self._batch_started is not None:
            self._update_seconds += self._clock() - self._batch_started
            self._batch_started = None
        self._until_read -= 1
        if self._until_read > 0:  # in the middle of an update: nothing read, the update's S and k logged
            self._log(self._setting, logs)
            return
        setting = optimizer._setting_numbers()
        self._until_read = 1
        if setting.updates != self._update:
            seconds = None if self._untimed else self._update_seconds / (setting.updates - self._update)
            self._update, self._update_seconds, self._untimed = setting.updates, 0.0, False
            self._until_read = setting.steps
            if self.every == "update":
                if self._decide(optimizer, seconds, setting):
                    setting = optimizer._setting_numbers()
                    self._until_read = 1
            elif seconds is not None:
                self.policy.record_time(setting.next_steps, seconds)
        self._setting = setting
        self._log(setting, logs)

    def on_epoch_begin(self, epoch, logs=None):
        if self.every == "epoch":
            optimizer = _adascale_optimizer(self.model, type(self).__name__)
            if self._decide(optimizer, None):
                self._setting, self._until_read = optimizer._setting_numbers(), 1

    def _decide(self, optimizer, seconds, setting=None):
        """Asks the policy (with the setting just read after an update, if any); returns whether it changed k."""
        changes = len(self.policy.changes)
        self.policy._step(optimizer, seconds, setting)
        changed = len(self.policy.changes) > changes
        if changed:
            self._untimed = True  # the next update's time may hold a retrace: not timed
        if self.verbose and len(self.policy.changes) > changes:
            change = self.policy.changes[-1]
            # After a progress bar's line (fit's verbose=1 or "auto"), on a line of its own.
            newline = "\n" if self.params.get("verbose") in (1, "auto") else ""
            print_message(
                f"{newline}AutoScale: update {change['update']} (tau {change['scale_invariant_iterations']:.0f}): "
                f"k {change['from_steps']} -> {change['steps']}, S = {change['scale']:g}. {change['reason']}."
            )
        return changed

    def on_epoch_end(self, epoch, logs=None):
        self._setting = _adascale_optimizer(self.model, type(self).__name__)._setting_numbers()
        self._log(self._setting, logs)

    @staticmethod
    def _log(setting, logs):
        """S and k of the next update into the logs, from one read of the setting."""
        if logs is not None:
            logs["scale"] = setting.next_scale
            logs["accumulation_steps"] = setting.next_steps
