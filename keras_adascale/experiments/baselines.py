"""The linear scaling rule (with optional gradual warm-up): the baseline AdaScale is compared with."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="keras_adascale")
class LinearScalingSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A single-batch schedule scaled by the linear scaling rule for batch scale S.

    At update t: `lr_t = S * schedule(S * t)`, so the schedule runs S times
    faster and T single-batch steps take T / S updates. With `warmup_steps`
    W > 0, the multiplier rises linearly from 1 to S over the first W updates
    (gradual warm-up):

    ```python
    lr_t = schedule(S * t) * (1 + (S - 1) * min(t / W, 1))
    ```

    Args:
        schedule: float or `LearningRateSchedule`, the single-batch rate.
        scale: number >= 1, S.
        warmup_steps: int >= 0, W, in updates. Defaults to `0` (no warm-up).
        name: optional string.

    References:
        Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in
        1 Hour", 2017, sections 2.1-2.2.
    """

    def __init__(self, schedule, scale, warmup_steps=0, name=None):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1 <= scale < float("inf"):
            raise ValueError(f"Argument `scale` must be a finite number >= 1. Received: scale={scale!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Argument `warmup_steps` must be an int >= 0. Received: warmup_steps={warmup_steps}")
        self.schedule = schedule
        self.scale = scale
        self.warmup_steps = warmup_steps
        self.name = name

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        if isinstance(self.schedule, keras.optimizers.schedules.LearningRateSchedule):
            rate = tf.cast(self.schedule(step * self.scale), tf.float32)
        else:
            rate = tf.constant(self.schedule, tf.float32)
        if self.warmup_steps == 0:
            return rate * self.scale
        progress = tf.minimum(step / self.warmup_steps, 1.0)
        return rate * (1.0 + (self.scale - 1) * progress)

    def get_config(self):
        schedule = self.schedule
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            schedule = keras.saving.serialize_keras_object(schedule)
        return {"schedule": schedule, "scale": self.scale, "warmup_steps": self.warmup_steps, "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["schedule"], dict):
            config["schedule"] = keras.saving.deserialize_keras_object(config["schedule"])
        return cls(**config)
