"""Learning-rate schedules: ScaleInvariantSchedule (keyed on tau) and the linear scaling rule it is compared with."""

import keras
from keras import ops

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
        with keras.name_scope(self.name):
            if isinstance(self.schedule, float):
                return ops.convert_to_tensor(self.schedule, dtype=keras.config.floatx())
            return self.schedule(step)

    def get_config(self):
        schedule = self.schedule
        if isinstance(schedule, LearningRateSchedule):
            schedule = keras.optimizers.schedules.serialize(schedule)
        return {"schedule": schedule, "total_steps": self.total_steps, "name": self.name}


@keras.saving.register_keras_serializable(package="keras_adascale")
class LinearScalingSchedule(LearningRateSchedule):
    """A single-batch schedule scaled by the linear scaling rule for batch scale S.

    At update t: `lr_t = S * schedule(S * t)`, so the schedule runs S times
    faster and T single-batch steps take T / S updates. With `warmup_steps`
    W > 0, the multiplier rises linearly from 1 to S over the first W updates
    (gradual warm-up):

    ```python
    lr_t = schedule(S * t) * (1 + (S - 1) * min(t / W, 1))
    ```

    Another `rate_factor` k takes the place of S as the multiplier (the
    square-root rule for Adam: k = sqrt(S); k = 1 runs the same rates in
    T / S updates); the schedule still runs S times faster.

    Args:
        schedule: float or `LearningRateSchedule`, the single-batch rate.
        scale: number >= 1, S.
        warmup_steps: int >= 0, W, in updates. Defaults to `0` (no warm-up).
        rate_factor: optional number >= 1, k, the learning rate's multiplier.
            Defaults to S.
        name: optional string.

    References:
        Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in
        1 Hour", 2017, sections 2.1-2.2.
    """

    def __init__(self, schedule, scale, warmup_steps=0, rate_factor=None, name=None):
        if not isinstance(schedule, LearningRateSchedule):
            schedule = validation.rate(schedule, "schedule")
        self.schedule = schedule
        self.scale = validation.scale(scale)
        self.warmup_steps = validation.count(warmup_steps, "warmup_steps")
        self.rate_factor = validation.optional(validation.scale, rate_factor, "rate_factor")
        self.name = name

    def __call__(self, step):
        step = ops.cast(step, "float32")
        if isinstance(self.schedule, LearningRateSchedule):
            rate = ops.cast(self.schedule(step * self.scale), "float32")
        else:
            rate = ops.convert_to_tensor(self.schedule, "float32")
        factor = self.scale if self.rate_factor is None else self.rate_factor
        if self.warmup_steps == 0:
            return rate * factor
        progress = ops.minimum(step / self.warmup_steps, 1.0)
        return rate * (1.0 + (factor - 1) * progress)

    def get_config(self):
        schedule = self.schedule
        if isinstance(schedule, LearningRateSchedule):
            schedule = keras.saving.serialize_keras_object(schedule)
        return {"schedule": schedule, "scale": self.scale, "warmup_steps": self.warmup_steps,
                "rate_factor": self.rate_factor, "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["schedule"], dict):
            config["schedule"] = keras.saving.deserialize_keras_object(config["schedule"])
        return cls(**config)
