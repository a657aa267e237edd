"""AdaScaleCallback: stop at tau >= T_SI and log gain, tau and learning rate."""

import keras

from keras_adascale.optimizer import AdaScaleSGD
from keras_adascale.schedules import ScaleInvariantSchedule


class AdaScaleCallback(keras.callbacks.Callback):
    """Logs AdaScale's state and stops training once tau >= T_SI.

    Adds `gain`, `scale_invariant_iterations`, `effective_learning_rate`
    (the gain times the scheduled rate, as used by the last update) and
    `skipped_updates` (updates skipped for NaN or Inf gradients),
    `gradient_noise_scale` (sigma^2 / mu^2 in baseline batches, see
    `AdaScaleSGD.gradient_noise_scale`) and `scaling_efficiency` (gain / S:
    the share of the S-fold batch that turns into progress) to the
    batch and epoch logs, so they appear in the progress bar, in `History` and,
    when `keras.callbacks.TensorBoard` comes after this callback in the list,
    in TensorBoard. Sets `model.stop_training` once tau reaches `total_steps`.

    With `AdaScaleSGD(non_finite="raise")` it also raises after a batch whose
    update was skipped: inside an XLA-compiled step (`jit_compile=True`) the
    optimizer's own check cannot fail the step, so this is where it fails.

    Args:
        total_steps: optional number, T_SI. Defaults to the `total_steps` of
            the optimizer's `ScaleInvariantSchedule`, if it has one; with
            neither, training is not stopped.

    References:
        Johnson et al., 2020, Algorithm 1 (the loop `while tau < T_SI`).
    """

    def __init__(self, total_steps=None):
        super().__init__()
        if total_steps is not None and not total_steps > 0:
            raise ValueError(f"Argument `total_steps` must be > 0. Received: total_steps={total_steps}")
        self.total_steps = total_steps

    def _optimizer(self):
        optimizer = self.model.optimizer
        # LossScaleOptimizer (mixed precision) wraps the optimizer.
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        if not isinstance(optimizer, AdaScaleSGD):
            raise ValueError(
                "AdaScaleCallback needs a model compiled with an AdaScaleSGD "
                f"optimizer. Received: {type(optimizer).__name__}"
            )
        return optimizer

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
        if total_steps is not None and float(optimizer.scale_invariant_iterations) >= total_steps:
            self.model.stop_training = True

    def _log(self, logs):
        optimizer = self._optimizer()
        tau = float(optimizer.scale_invariant_iterations)
        if logs is not None:
            logs["gain"] = float(optimizer.gain)
            logs["scale_invariant_iterations"] = tau
            logs["effective_learning_rate"] = float(optimizer.effective_learning_rate)
            logs["skipped_updates"] = int(optimizer.skipped_updates)
            logs["gradient_noise_scale"] = float(optimizer.gradient_noise_scale)
            logs["scaling_efficiency"] = float(optimizer.gain) / float(optimizer.scale)
        total_steps = self._resolved_total_steps(optimizer)
        if total_steps is not None and tau >= total_steps:
            self.model.stop_training = True

    def on_train_batch_end(self, batch, logs=None):
        self._log(logs)
        optimizer = self._optimizer()
        skipped = int(optimizer.skipped_updates)
        if skipped > self._skipped and optimizer.non_finite == "raise":
            raise FloatingPointError(
                f"AdaScaleSGD skipped an update for NaN or Inf gradients at batch {batch} "
                "(non_finite='raise'); weights, tau and the averages are as before it."
            )
        self._skipped = skipped

    def on_epoch_end(self, epoch, logs=None):
        self._log(logs)
