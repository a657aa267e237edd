"""RunRecorder: per-update and per-evaluation metrics as JSON lines, a progress bar, stopping."""

import json
import math
import sys
import time

import keras

from keras_adascale.autoscale import updates_done
from keras_adascale.base import AdaScaleBase
from keras_adascale.callbacks import AdaScaleCallback
from keras_adascale.experiments.rundirs import read_jsonl


# AdaScale's smoothed statistics, recorded per update for `keras-adascale advise`.
_STATISTICS = ("gradient_variance", "gradient_sqr_norm", "gradient_noise_scale")


class _Progress:
    """A Keras progress bar on a terminal; a line per tenth of the run elsewhere (logs, CI)."""

    def __init__(self, target, label):
        self.target = target
        self.interactive = sys.stdout.isatty()
        self.bar = keras.utils.Progbar(target, unit_name="step", interval=0.5) if self.interactive else None
        self.label = label
        self.next_report = target / 10

    def update(self, position, values):
        position = min(position, self.target)
        if self.bar is not None:
            self.bar.update(position, values)
        elif position >= self.next_report or position >= self.target:
            shown = " - ".join(f"{name}: {value:.4g}" for name, value in values)
            print(f"{self.label}: {100 * position / self.target:5.1f}% ({position:.0f}/{self.target} "
                  f"scale-invariant steps) - {shown}", flush=True)
            while self.next_report <= position:
                self.next_report += self.target / 10


class RunRecorder(keras.callbacks.Callback):
    """Writes one JSON line per update and per test evaluation, shows progress, stops the run.

    For an AdaScale optimizer, `callbacks()` puts an `AdaScaleCallback` before
    it: that callback stops the run at tau >= T_SI and puts the optimizer's
    statistics into the batch logs, which this one records. For the other
    optimizers it stops the run itself, once `update * tau_per_update`
    reaches T_SI.

    The test split is evaluated each time tau passes another
    `total_steps / evaluations`, so runs at every scale are evaluated at the
    same points of the single-batch schedule.

    Per update (`metrics.jsonl`): `update`, `tau` (position on the single-batch
    schedule: AdaScale's scale-invariant iterations, `update * S` under the
    linear scaling rule, `update` for plain SGD), `gain`, `learning_rate`,
    `loss` and `accuracy` of that update's examples, `examples` seen and
    `wall_time` in seconds; for AdaScale also `gradient_variance` (sigma^2,
    of one baseline batch), `gradient_sqr_norm` (mu^2) and
    `gradient_noise_scale` (B_simple = sigma^2 / mu^2, in baseline batches),
    the smoothed estimates after the update, which `keras-adascale advise`
    replays. Per epoch (`evaluations.jsonl`): `update`, `tau`,
    `test_loss`, `test_accuracy` (per character for a language model), for a
    language model `test_bits_per_character` (test_loss / ln 2), and
    `wall_time` (evaluation time excluded).

    Keras reports running means since the metrics were last reset; the value
    of the k-th batch since then is recovered as
    `k * mean_k - (k - 1) * mean_(k-1)` (all batches have the same size).
    The metrics are reset after each evaluation, which shares them. On resume (`BackupAndRestore` placed before this callback),
    rows past the restored update are dropped, so none is counted twice.

    Args:
        run_dir: `pathlib.Path` of the run folder.
        total_steps: T_SI, the length of the run in scale-invariant steps.
        tau_per_update: for optimizers other than AdaScale, the schedule
            steps one update covers (S for the linear scaling rule, else 1).
        schedule: for optimizers other than AdaScale, the learning-rate
            schedule (called with the update index) or a float.
        examples_per_batch: global batch size of one `model.fit` step.
        test_data: `(dataset, steps)` to evaluate on.
        evaluations: how many evaluations over the run.
        label: the run's name, for the progress lines.
        bits_per_character: record `test_bits_per_character` (a language model,
            whose loss is in nats per character).
        replicas: the strategy's replicas (each row's N is replicas x accumulation steps).
    """

    def __init__(self, run_dir, total_steps, tau_per_update, schedule, examples_per_batch, test_data,
                 evaluations, label, bits_per_character=False, replicas=1):
        super().__init__()
        self.metrics_path = run_dir / "metrics.jsonl"
        self.evaluations_path = run_dir / "evaluations.jsonl"
        self.total_steps = total_steps
        self.tau_per_update = tau_per_update
        self.schedule = schedule
        self.examples_per_batch = examples_per_batch
        self.test_data = test_data
        self.evaluation_period = total_steps / evaluations
        self.label = label
        self.bits_per_character = bits_per_character
        self.replicas = replicas

    def callbacks(self, optimizer):
        """The callbacks to pass to `model.fit` for a run with `optimizer`: this one, after
        an `AdaScaleCallback` for an AdaScale optimizer."""
        self.adascale = isinstance(optimizer, AdaScaleBase)
        return [AdaScaleCallback(logged="all"), self] if self.adascale else [self]

    def _truncate(self, path, update):
        rows = [row for row in read_jsonl(path) if row["update"] <= update]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return rows

    def on_train_begin(self, logs=None):
        self.update = updates_done(self.model.optimizer)
        rows = self._truncate(self.metrics_path, self.update)
        evaluations = self._truncate(self.evaluations_path, self.update)
        self.next_evaluation = (len(evaluations) + 1) * self.evaluation_period
        self.wall_offset = rows[-1]["wall_time"] if rows else 0.0
        self.examples = rows[-1]["examples"] if rows else 0
        self.start = time.perf_counter()
        self.progress = _Progress(self.total_steps, self.label)
        if not self.adascale and self.update * self.tau_per_update >= self.total_steps:
            self.model.stop_training = True

    def _reset_means(self):
        self.previous_means = {}
        self.batches_since_reset = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._reset_means()  # model.fit resets the metrics at each epoch
        self.pending = []

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        values = {}
        self.batches_since_reset += 1
        k = self.batches_since_reset
        for name in ("loss", "accuracy"):
            mean = float(logs[name])
            values[name] = k * mean - (k - 1) * self.previous_means.get(name, 0.0)
            self.previous_means[name] = mean
        self.pending.append(values)
        self.examples += self.examples_per_batch
        update = updates_done(self.model.optimizer)
        if update == self.update:
            return  # a micro-batch of gradient accumulation
        self.update = update
        if self.adascale:  # from AdaScaleCallback, which ran before this callback
            # S and N of the update that just ran: its micro-batches, and S in its ratio to N (the logs' S and
            # k are the next update's, which a change made at this update's end already shows).
            samples = self.replicas * len(self.pending)
            scale_per_sample = logs["scale"] / (self.replicas * logs["accumulation_steps"])
            row = {"update": update, "tau": logs["scale_invariant_iterations"], "gain": logs["gain"],
                   "learning_rate": logs["effective_learning_rate"], "scale": scale_per_sample * samples,
                   "samples": samples}
            row.update({name: logs[name] for name in _STATISTICS})
        else:
            schedule = self.schedule
            row = {"update": update, "tau": float(update * self.tau_per_update), "gain": 1.0,
                   "learning_rate": float(schedule(update - 1) if callable(schedule) else schedule)}
            if row["tau"] >= self.total_steps:
                self.model.stop_training = True
        for name in ("loss", "accuracy"):
            row[name] = sum(values[name] for values in self.pending) / len(self.pending)
        row["examples"] = self.examples
        row["wall_time"] = self.wall_offset + time.perf_counter() - self.start
        self.pending = []
        with self.metrics_path.open("a") as stream:
            stream.write(json.dumps(row) + "\n")
        shown = [("loss", row["loss"]), ("gain", row["gain"])] + ([("S", row["scale"])] if "scale" in row else [])
        self.progress.update(row["tau"], shown)
        if row["tau"] >= self.next_evaluation - 1e-6:
            self._evaluate(row)

    def _evaluate(self, row):
        paused = time.perf_counter()
        dataset, steps = self.test_data
        test_loss, test_accuracy = self.model.evaluate(dataset, steps=steps, verbose=0)
        self.model.reset_metrics()  # evaluate left the test values in the shared metrics
        self._reset_means()
        self.start += time.perf_counter() - paused  # evaluation is not training time
        evaluation = {
            "update": row["update"],
            "tau": row["tau"],
            "test_loss": float(test_loss),
            "test_accuracy": float(test_accuracy),
        }
        if self.bits_per_character:
            evaluation["test_bits_per_character"] = float(test_loss) / math.log(2)
        evaluation["wall_time"] = row["wall_time"]
        with self.evaluations_path.open("a") as stream:
            stream.write(json.dumps(evaluation) + "\n")
        while self.next_evaluation <= row["tau"] + 1e-6:
            self.next_evaluation += self.evaluation_period
