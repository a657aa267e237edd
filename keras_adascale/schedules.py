"""ScaleInvariantSchedule: a learning-rate schedule keyed on scale-invariant iterations (tau)."""

import keras
import tensorflow as tf

from keras_adascale import validation

LearningRateSchedule = keras.optimizers.schedules.LearningRateSchedule


@keras.saving.register_keras_serializable(package="keras_adascale")
class ScaleInvariantSchedule(LearningRateSchedule):
    """A single-batch learning-rate schedule, evaluated at floor(tau).

    `AdaScaleSGD` calls its learning-rate schedule with `floor(tau)`, the number
    of scale-invariant iterations done so far, instead of the update count.
    This class makes that explicit: it wraps a float or any Keras
    `LearningRateSchedule` written for single-batch training (S = 1), and
    carries `total_steps` (T_SI), the scale-invariant length of training at
    which `AdaScaleCallback` stops `model.fit`.

    Example:

    ```python
    schedule = keras_adascale.ScaleInvariantSchedule(
        keras.optimizers.schedules.PiecewiseConstantDecay([3000, 4500], [0.1, 0.01, 0.001]),
        total_steps=5000,
    )
    optimizer = keras_adascale.AdaScaleSGD(schedule, momentum=0.9)
    ```

    Args:
        schedule: float or `keras.optimizers.schedules.LearningRateSchedule`,
            the learning rate of single-batch training as a function of the
            iteration.
        total_steps: optional int > 0, T_SI: training stops once tau >= T_SI.
        name: optional string.

    References:
        Johnson et al., 2020, Algorithm 1 (`lr(floor(tau_t))`, `tau < T_SI`).
    """

    def __init__(self, schedule, total_steps=None, name=None):
        if isinstance(schedule, dict):
            schedule = keras.optimizers.schedules.deserialize(schedule)
        if not isinstance(schedule, LearningRateSchedule):
            schedule = validation.rate(schedule, "schedule")
        validation.optional(validation.positive, total_steps, "total_steps")
        self.schedule = schedule
        self.total_steps = total_steps
        self.name = name or "ScaleInvariantSchedule"

    def __call__(self, step):
        with tf.name_scope(self.name):
            if isinstance(self.schedule, float):
                return tf.constant(self.schedule, dtype=keras.config.floatx())
            return self.schedule(step)

    def get_config(self):
        schedule = self.schedule
        if isinstance(schedule, LearningRateSchedule):
            schedule = keras.optimizers.schedules.serialize(schedule)
        return {"schedule": schedule, "total_steps": self.total_steps, "name": self.name}
