"""S and the accumulation count k: the one state machine that stores, changes and restores them.

An AdaScale optimizer keeps its setting in two variables: the counters (int64) and the scales
(statistics dtype). This module owns their layout, the rule that reads them (`resolve`) and every
transition (`change_steps`, `change_scale`, `complete`). Each function is written once, over either
Python/NumPy numbers (callbacks read the setting after every batch, where a dozen eager TensorFlow
ops would cost more than a small model's step) or tensors (the compiled step), through
`numerics.NUMBERS` or `numerics.TENSORS`: so the eager view and the compiled step cannot disagree.

The setting describes two updates: the one in progress (`steps`, `scale`) and the ones after it
(`next_steps`, `next_scale`). A change made between two micro-batches of one update waits for that
update to finish; between updates it applies to the next one at once.

A checkpoint restored into an optimizer made with another configuration (another `scale`,
`gradient_accumulation_steps` or replica count) keeps the update count and the micro-batches already
accumulated, and takes this optimizer's own S and k: the update in progress completes once it holds
at least k micro-batches, as the mean of all it holds, at S in the configured ratio to its samples.
"""

from typing import NamedTuple

import numpy as np

from keras_adascale.numerics import NUMBERS, TENSORS  # noqa: F401 (the `ops` of the functions below)

# The layout of the two variables. The configuration the setting was made under is stored with it, so
# that a restore into an optimizer made with another one is recognized.
COUNTERS = ("steps", "next_steps", "update_start", "updates", "configured_steps", "replicas")
SCALES = ("scale", "next_scale", "configured_scale")


class Configuration(NamedTuple):
    """What an optimizer was made with (Python numbers, fixed for its lifetime).

    Attributes:
        steps: `gradient_accumulation_steps`, 0 without gradient accumulation.
        replicas: the strategy's `num_replicas_in_sync`.
        scale: the requested `scale`, 0.0 for the default S = N.
    """

    steps: int
    replicas: int
    scale: float

    @property
    def initial_steps(self):
        """k at the start: the configured count, 1 without accumulation."""
        return self.steps or 1

    @property
    def initial_scale(self):
        """S at the start: the requested scale, else N = replicas x k."""
        return self.scale or float(self.replicas * self.initial_steps)


class ScaleSetting(NamedTuple):
    """S and k as the compiled step and the callbacks see them (numbers or tensors).

    Attributes:
        steps: k of the update in progress: it completes once it holds at least this many micro-batches.
        next_steps: k of the updates after it.
        update_start: the micro-step (`optimizer._iterations`) the update in progress began at.
        updates: the updates completed (`optimizer.iterations`).
        scale: S of the update in progress, for `steps` micro-batches.
        next_scale: S of the updates after it.
    """

    steps: object
    next_steps: object
    update_start: object
    updates: object
    scale: object
    next_scale: object


def initial_values(config):
    """The two variables' initial values: `(counters, scales)` as Python lists."""
    steps, scale = config.initial_steps, config.initial_scale
    return [steps, steps, 0, 0, config.steps, config.replicas], [scale, scale, float(config.scale)]


def resolve(counters, scales, config, ops):
    """The setting in effect, from the two variables' values (NumPy arrays with `NUMBERS`, tensors with `TENSORS`).

    The stored setting, unless it was made under another configuration: then the stored update count
    and the update in progress's start (its micro-batches are kept), with this configuration's S and k.
    The configured scale is compared in the dtype it is stored in (float32 under `TPUStrategy`).

    Returns:
        `(setting, same)`: a `ScaleSetting`, and whether the stored configuration is this one.
    """
    stored_configuration = counters[4:6]
    configured = ops.like([config.steps, config.replicas], counters)
    same = ops.logical_and(ops.all_equal(stored_configuration, configured),
                           scales[2] == ops.like(config.scale, scales))
    steps = ops.like(config.initial_steps, counters)
    scale = ops.like(config.initial_scale, scales)
    return ScaleSetting(
        steps=ops.where(same, counters[0], steps),
        next_steps=ops.where(same, counters[1], steps),
        update_start=counters[2],
        updates=counters[3],
        scale=ops.where(same, scales[0], scale),
        next_scale=ops.where(same, scales[1], scale),
    ), same


def as_numbers(setting):
    """A `ScaleSetting` of NumPy scalars (as `resolve` gives with `NUMBERS`) as Python ints and floats."""
    return ScaleSetting(
        steps=int(setting.steps), next_steps=int(setting.next_steps), update_start=int(setting.update_start),
        updates=int(setting.updates), scale=float(setting.scale), next_scale=float(setting.next_scale),
    )


def from_0_2_0(counters, scales, iterations):
    """0.2.0's stored setting in this layout: `(counters, scales)` NumPy arrays, or None if not 0.2.0's.

    0.2.0 kept S of the update in progress and the configured S, and took the next update's S from the
    count change still pending when the update completed (S x next k / k); this layout keeps that S
    between them. Without accumulation 0.2.0 never wrote the update count, which is `iterations` there.
    """
    if scales.shape != (2,):
        return None
    scale, configured = scales
    counters = counters.copy()
    steps, next_steps = counters[COUNTERS.index("steps")], counters[COUNTERS.index("next_steps")]
    scales = np.asarray([scale, scale * next_steps / steps, configured], scales.dtype)
    if counters[COUNTERS.index("configured_steps")] == 0:
        counters[COUNTERS.index("update_start")] = iterations
        counters[COUNTERS.index("updates")] = iterations
    return counters, scales


def values(setting, config, ops, counters_like, scales_like):
    """The two variables' values that hold `setting` made under `config`: `(counters, scales)` lists."""
    counters = [ops.like(value, counters_like) for value in (
        setting.steps, setting.next_steps, setting.update_start, setting.updates, config.steps, config.replicas)]
    scales = [ops.like(value, scales_like) for value in (setting.scale, setting.next_scale, config.scale)]
    return counters, scales


def in_update(setting, iterations):
    """Whether micro-batches of an update are accumulated but not yet applied."""
    return iterations != setting.update_start


def accumulated(setting, iterations):
    """The micro-batches the update in progress holds after the micro-step `iterations` (counted from 0)."""
    return iterations - setting.update_start + 1


def is_update_step(setting, iterations):
    """Whether the micro-step `iterations` completes the update in progress."""
    return accumulated(setting, iterations) >= setting.steps


def update_scale(setting, micro_batches, ops):
    """S of the update that completes with `micro_batches` micro-batches: `scale`, in its ratio to the samples.

    Equal to `scale` unless a restore into another configuration left more micro-batches in the update
    than its k.
    """
    scaled = setting.scale * ops.like(micro_batches, setting.scale) / ops.like(setting.steps, setting.scale)
    # `scale` itself where the update holds its k (S x k / k may differ from S in the last bit).
    return ops.where(micro_batches == setting.steps, setting.scale, scaled)


def complete(setting, iterations, ops):
    """The setting after the update in progress completes at the micro-step `iterations`."""
    return setting._replace(
        steps=setting.next_steps,
        update_start=iterations + ops.like(1, iterations),
        updates=setting.updates + ops.like(1, setting.updates),
        scale=setting.next_scale,
    )


def change_steps(setting, steps, iterations):
    """`set_accumulation_steps(steps)` between steps (numbers): S keeps its ratio to k.

    Mid-update, the change waits for the update in progress (a change still pending is replaced).
    """
    next_scale = float(setting.next_scale) * steps / int(setting.next_steps)
    if in_update(setting, iterations):
        return setting._replace(next_steps=steps, next_scale=next_scale)
    return setting._replace(steps=steps, next_steps=steps, scale=next_scale, next_scale=next_scale)


def change_scale(setting, scale, iterations):
    """`set_scale(scale)` between steps (numbers): from the next update on."""
    if in_update(setting, iterations):
        return setting._replace(next_scale=float(scale))
    return setting._replace(scale=float(scale), next_scale=float(scale))


def check(replicas, steps, scale, argument):
    """Raises `ValueError` for a setting whose updates see one gradient sample at S > 1."""
    if replicas * steps == 1 and scale > 1:
        raise ValueError(
            f"Argument `{argument}` would give S = {scale:g} with one gradient sample per update "
            "(one replica, one micro-batch): the gain needs at least two samples to see the "
            "gradient variance. Accumulate >= 2 micro-batches or use >= 2 replicas."
        )
