"""Choosing S during training: the pure policy (`decide`) and its stateful driver (`ScalePolicy`).

AdaScale's gain model says what an update at scale S is worth: with b the gradient noise scale in
baseline batches (`gradient_noise_scale`), an update at S advances tau by r(S) = (b + 1) / (b / S + 1).
So per unit of tau, a run at S takes 1 / r(S) = (b / S + 1) / (b + 1) updates and spends
S / r(S) = (b + S) / (b + 1) baseline batches of examples (one at S = 1). Every objective here ranks the
accumulation counts k (S = S_per_step x k) by that model, from the optimizer's current statistics:

- "budget": the fewest updates for the examples spent. Minimizing updates + lambda x examples per unit
  of tau, (b / S + 1) / (b + 1) + lambda (b + S) / (b + 1), gives d/dS = (lambda - b / S^2) / (b + 1) = 0,
  so S* = sqrt(b / lambda): S grows as the square root of the noise scale. `update_cost` is 1 / lambda,
  the baseline batches of examples one update is worth: an update's fixed cost (all-reduce, apply,
  a step's latency) in units of one baseline batch's computation. At b >> S the examples spent over
  the S = 1 run grow by about (S - 1) / b per unit of tau.
- "efficiency": the largest k whose predicted efficiency r(S) / S = (b + 1) / (b + S) stays at or
  above a target e, i.e. S <= (b + 1) / e - b: S grows in proportion to b.
- "goodput": the k with the most tau per second, r(S(k)) / t(k), with t(k) = alpha + beta k fitted to
  the seconds per update measured at each k run so far (Pollux's throughput model, without its
  network terms); with one k measured, alpha is half its time (Pollux's prior), and the decision's
  reason says so. In a JAX job of several processes, the processes' mean times (`agreed_seconds`), so
  that every process decides alike.

A change is made only when the chosen k is predicted better than the current one by more than
`threshold` (AdaptDL's 5%), so that noise in the statistics does not make k flicker; under
"efficiency", the current k is left for a smaller one only when its predicted efficiency falls below
the target x (1 - threshold), for the same reason on the way down.
"""

import math
from typing import NamedTuple

from keras_adascale import validation

OBJECTIVES = ("budget", "efficiency", "goodput")


class Decision(NamedTuple):
    """What `decide` chose.

    Attributes:
        steps: the accumulation count k to use (the current one where nothing pays enough).
        scale: S at that k.
        changed: whether `steps` differs from the current count.
        improvement: the predicted gain of `steps` over the current count, as a fraction
            (0.1 = 10% better by the objective), 0 when unchanged.
        reason: one sentence on why, for the log.
    """

    steps: int
    scale: float
    changed: bool
    improvement: float
    reason: str


def gain(noise_scale, scale):
    """r(S) = (b + 1) / (b / S + 1) for noise scale b (baseline batches); S when b is infinite."""
    if math.isinf(noise_scale):
        return float(scale)
    return (noise_scale + 1.0) / (noise_scale / scale + 1.0)


def updates_per_tau(noise_scale, scale):
    """1 / r(S): updates per scale-invariant iteration."""
    return 1.0 / gain(noise_scale, scale)


def examples_per_tau(noise_scale, scale):
    """S / r(S): baseline batches of examples per scale-invariant iteration (1 at S = 1)."""
    return scale / gain(noise_scale, scale)


def budget_scale(noise_scale, update_cost):
    """S* = sqrt(b x update_cost), the S with the fewest updates + examples / update_cost per unit of tau."""
    return math.sqrt(noise_scale * update_cost) if not math.isinf(noise_scale) else math.inf


ONE_COUNT_PRIOR = "half of the one measured step time assumed fixed (Pollux's prior)"


def agreed_seconds(seconds_by_steps):
    """{k: seconds per update} that every process of a job agrees on: in a JAX job of several processes (a
    multi-host `keras.distribution`), the mean over the processes of each one's own measurement (one small
    collective), elsewhere `seconds_by_steps` itself.

    Each process times its own updates, so their clocks differ; decisions made from them could differ too,
    and a process that changes its accumulation while another does not leaves the job's collectives out of
    step. Every process calls it at the same update (a decision point is a tau, the same everywhere) with
    the same counts k (the updates timed are the same)."""
    import keras

    if keras.backend.backend() != "jax":
        return seconds_by_steps
    import jax

    if jax.process_count() == 1:
        return seconds_by_steps
    import numpy as np
    from jax.experimental import multihost_utils

    steps = sorted(seconds_by_steps)
    mine = np.asarray([seconds_by_steps[k] for k in steps], np.float32)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), len(steps))
    return {k: float(seconds) for k, seconds in zip(steps, every.mean(axis=0), strict=True)}


def fit_step_time(seconds_by_steps):
    """(alpha, beta) of t(k) = alpha + beta k, least squares over {k: seconds per update}.

    With one k measured, alpha is half its time (Pollux's prior: optimistic about larger k; a decision
    made on it says so, `ONE_COUNT_PRIOR`). Both are kept >= 0.
    """
    points = sorted(seconds_by_steps.items())
    if not points:
        raise ValueError("fit_step_time needs at least one measured accumulation count.")
    if len(points) == 1:
        ((steps, seconds),) = points
        return seconds / 2.0, seconds / (2.0 * steps)
    count = len(points)
    mean_k = sum(k for k, _ in points) / count
    mean_t = sum(t for _, t in points) / count
    spread = sum((k - mean_k) ** 2 for k, _ in points)
    beta = max(sum((k - mean_k) * (t - mean_t) for k, t in points) / spread, 0.0)
    alpha = max(mean_t - beta * mean_k, 0.0)
    return alpha, beta


def _scores(objective, noise_scale, scales, steps, update_cost, target_efficiency, step_time):
    """A score per candidate (higher is better) and whether it is allowed."""
    if objective == "budget":
        lam = 1.0 / update_cost
        return [-(updates_per_tau(noise_scale, s) + lam * examples_per_tau(noise_scale, s)) for s in scales]
    if objective == "efficiency":
        # Updates saved, among the counts that keep the target; the rest are not allowed.
        return [gain(noise_scale, s) if gain(noise_scale, s) / s >= target_efficiency else -math.inf
                for s in scales]
    alpha, beta = step_time
    return [gain(noise_scale, s) / (alpha + beta * k) for s, k in zip(scales, steps)]


def decide(noise_scale, current_steps, scale_per_step, objective="budget", *, min_steps=1, max_steps=32,
           threshold=0.05, update_cost=1.0, target_efficiency=0.8, step_time=None, allowed_steps=None,
           assumption=None):
    """The accumulation count to use next, from the gradient noise scale.

    Args:
        noise_scale: b, the gradient noise scale in baseline batches (`optimizer.gradient_noise_scale`).
        current_steps: the current k.
        scale_per_step: S / k (S = N by default, so the replica count).
        objective: "budget", "efficiency" or "goodput" (see the module docstring).
        min_steps: the least k allowed.
        max_steps: the largest k allowed.
        threshold: the predicted improvement a change needs (0.05: 5%).
        update_cost: "budget": baseline batches of examples one update is worth (1 / lambda).
        target_efficiency: "efficiency": the least r(S) / S allowed.
        step_time: "goodput": (alpha, beta) of the seconds per update t(k) = alpha + beta k.
        allowed_steps: optional list of the counts allowed (e.g. powers of two), within the bounds.
        assumption: optional words on what the inputs assume, added to a change's reason.

    Returns:
        A `Decision`.

    Raises:
        ValueError: for a bad objective, goodput without `step_time`, or a NaN or negative noise scale
            (which no count can be ranked by).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"Argument `objective` must be one of {OBJECTIVES}. Received: objective={objective!r}")
    if objective == "goodput" and step_time is None:
        raise ValueError("The goodput objective needs `step_time`, (alpha, beta) of t(k) = alpha + beta k.")
    if not noise_scale >= 0.0:  # NaN, or negative
        raise ValueError(f"Argument `noise_scale` must be a number >= 0 (or inf). Received: noise_scale={noise_scale!r}")
    steps = [k for k in (allowed_steps or range(min_steps, max_steps + 1)) if min_steps <= k <= max_steps]
    if current_steps not in steps:
        steps = sorted(set(steps) | {min(max(current_steps, min_steps), max_steps)})
    scales = [scale_per_step * k for k in steps]
    scores = _scores(objective, noise_scale, scales, steps, update_cost, target_efficiency, step_time)
    current = min(max(current_steps, min_steps), max_steps)
    current_score = scores[steps.index(current)]
    if objective == "efficiency" and current_score == -math.inf:
        current_scale = scale_per_step * current
        efficiency = gain(noise_scale, current_scale) / current_scale
        if efficiency >= target_efficiency * (1.0 - threshold):
            # Hysteresis on the way down: within the threshold below the target, the count stays.
            scores[steps.index(current)] = gain(noise_scale, current_scale)
            current_score = scores[steps.index(current)]
        else:
            # Below the target by more than the threshold: the largest count that keeps it, else the smallest.
            allowed = [k for k, score in zip(steps, scores) if score > -math.inf]
            best = max(allowed) if allowed else min(steps)
            return _decision(best, scale_per_step, current_steps, 0.0,
                             f"efficiency r/S = {efficiency:.2f} at S = {current_scale:g} is below the target "
                             f"{target_efficiency:g} x (1 - {threshold:g}) (noise scale {noise_scale:.3g})")
    best_index = max(range(len(steps)), key=lambda i: (scores[i], -steps[i]))
    best, best_score = steps[best_index], scores[best_index]
    improvement = _improvement(best_score, current_score)
    if best != current and improvement > threshold:
        assumed = f" ({assumption})" if assumption else ""
        return _decision(best, scale_per_step, current_steps, improvement,
                         f"{objective}: S = {scale_per_step * best:g} is predicted {100 * improvement:.0f}% better "
                         f"than S = {scale_per_step * current:g} at noise scale {noise_scale:.3g}{assumed}")
    if current != current_steps:
        return _decision(current, scale_per_step, current_steps, 0.0, f"k = {current_steps} is outside the bounds")
    return _decision(current, scale_per_step, current_steps, 0.0,
                     f"{objective}: no S is predicted more than {100 * threshold:g}% better")


def _improvement(best, current):
    # Scores are costs (negative) for "budget", rates (positive) otherwise: improvement as a ratio.
    if current == best:
        return 0.0
    if best < 0 or current < 0:
        return current / best - 1.0 if best != 0 else math.inf
    return best / current - 1.0 if current > 0 else math.inf


def _decision(steps, scale_per_step, current_steps, improvement, reason):
    return Decision(steps, scale_per_step * steps, steps != current_steps, improvement, reason)


def updates_done(optimizer):
    """`optimizer.iterations` as an int, also where it is a `MirroredVariable` (whose `int()` raises)."""
    iterations = optimizer.iterations
    return int(iterations.numpy()) if hasattr(iterations, "numpy") else int(iterations)


class ScalePolicy:
    """Re-decides the accumulation count of an AdaScale optimizer during training (custom loops).

    Call `step(optimizer)` after each update; every `interval` scale-invariant
    iterations, once tau has passed `warmup`, it asks `decide` for the count
    that the objective prefers and calls `optimizer.set_accumulation_steps`
    when that count is predicted better by more than `threshold`. Each
    change is kept in `changes`. `keras_adascale.AutoScale` drives it from
    `model.fit`.

    Args:
        objective: "budget" (default), "efficiency" or "goodput" (see this module's docstring).
        interval: scale-invariant iterations between decisions; 0 decides at every
            call (the runner calls once per epoch, as AdaptDL decides once per pass).
            Defaults to 100.
        warmup: tau before the first decision, so that the averages mean something.
            Defaults to `interval`.
        min_steps: the least k. Defaults to the least that gives two gradient samples
            (2 on one replica, 1 on several).
        max_steps: the largest k. Defaults to 32.
        threshold: the predicted improvement a change needs. Defaults to 0.05.
        update_cost: "budget": the baseline batches of examples one update is worth
            (1 / lambda; S* = sqrt(noise scale x update_cost)). Defaults to 1.
        target_efficiency: "efficiency": the least predicted r(S) / S. Defaults to 0.8.
        align: apply a change only at an update boundary where the micro-batches done
            (where the next update starts) are a multiple of the new count, waiting for one otherwise: then
            epochs whose length every allowed count divides end on update boundaries whatever the
            changes, and a backup at an epoch end resumes exactly (the runner's auto runs). Where no
            such boundary can come (micro-batches done off every multiple of gcd(k, new k), as in a
            custom loop that started with a partial update), the change is made at once.

    Decisions come where tau crosses `warmup + j x interval`, a grid fixed by tau alone: when `step` runs
    after every update (as `AutoScale(every="update")` calls it), a policy made anew on a resumed run
    (whose tau, gain and statistics are restored) decides where the uninterrupted one would. Called less
    often (`every="epoch"`), a new policy may skip the decision pending since the last call.
    """

    def __init__(self, objective="budget", *, interval=100.0, warmup=None, min_steps=None, max_steps=32,
                 threshold=0.05, update_cost=1.0, target_efficiency=0.8, align=False):
        if objective not in OBJECTIVES:
            raise ValueError(f"Argument `objective` must be one of {OBJECTIVES}. Received: objective={objective!r}")
        self.objective = objective
        self.interval = validation.non_negative(interval, "interval")
        self.warmup = self.interval if warmup is None else validation.non_negative(warmup, "warmup")
        self.allowed_steps = None
        self.min_steps = None if min_steps is None else validation.accumulation_steps(min_steps, "min_steps")
        self.max_steps = validation.accumulation_steps(max_steps, "max_steps")
        if self.min_steps is not None and self.min_steps > self.max_steps:
            raise ValueError(f"Argument `min_steps` ({self.min_steps}) must be <= `max_steps` ({self.max_steps}).")
        self.threshold = validation.non_negative(threshold, "threshold")
        self.update_cost = float(validation.positive(update_cost, "update_cost"))
        if not 0.0 < target_efficiency <= 1.0:
            raise ValueError(f"Argument `target_efficiency` must be in (0, 1]. Received: {target_efficiency!r}")
        self.target_efficiency = float(target_efficiency)
        self.align = bool(align)
        self.changes = []
        self._seconds = {}  # k -> [total seconds, updates]
        self._next_decision = None
        self._pending = None  # (Decision, the change's record) waiting for an aligned boundary
        self._last_read = None  # (tau, updates, S) at the last read of the statistics, for `_step`

    def record_time(self, steps, seconds):
        """Adds one update's wall time at `steps` micro-batches (for "goodput")."""
        total = self._seconds.setdefault(steps, [0.0, 0])
        total[0] += seconds
        total[1] += 1

    def seconds_per_update(self):
        """{k: mean seconds per update} over the updates timed so far."""
        return {k: total / count for k, (total, count) in self._seconds.items() if count}

    def _grid_after(self, tau):
        """The first decision point after tau: `warmup`, then `warmup + j x interval`."""
        if tau < self.warmup:
            return self.warmup
        if self.interval == 0:
            return tau
        return self.warmup + self.interval * (math.floor((tau - self.warmup) / self.interval) + 1)

    def step(self, optimizer, seconds=None):
        """After an update: records its time, applies a change waiting for alignment, and re-decides when due.

        Returns the `Decision` made now, or None.
        """
        return self._step(optimizer, seconds, None)

    def _step(self, optimizer, seconds, setting):
        """`step`, given the optimizer's setting as just read after the update (`AutoScale` reads it anyway).

        With it, the statistics are read only where a decision may be due or a change waits: tau grows
        by at most S per update (the gain is clipped at S), so until the last tau read plus S per update
        since reaches the next decision, no read can find one. A read costs more than a small model's
        share of an update on a CPU.
        """
        if setting is not None and self._pending is None and self._last_read is not None:
            tau, updates, scale = self._last_read
            # A hair above S per update: the float32 gain of an S that float32 cannot hold may round up.
            reach = tau + (setting.updates - updates) * max(scale, setting.scale, setting.next_scale) * (1.0 + 1e-6)
            if reach < self._next_decision:
                if seconds is not None:
                    self.record_time(setting.next_steps, seconds)
                return None
        snapshot = optimizer.snapshot()
        if setting is not None:
            self._last_read = (snapshot["scale_invariant_iterations"], setting.updates,
                               max(setting.scale, setting.next_scale))
        steps = snapshot["accumulation_steps"]
        scale_per_step = snapshot["scale"] / steps  # S keeps its ratio to k through a change
        if seconds is not None:
            self.record_time(steps, seconds)
        tau = snapshot["scale_invariant_iterations"]
        if self._next_decision is None:
            # From the tau before the last update: where a policy that ran all along would decide next.
            before = tau - snapshot["gain"]
            self._next_decision = self.warmup if before < self.warmup else self._grid_after(before)
            if self.interval == 0 and before >= self.warmup:
                self._next_decision = tau
        if self._apply_pending(optimizer, tau):
            steps = self.changes[-1]["steps"]
        if tau < self._next_decision:
            return None
        self._next_decision = self._grid_after(tau)
        if math.isnan(snapshot["gradient_noise_scale"]):
            return None  # nothing to rank the counts by: no change
        replicas = optimizer.samples_per_update // steps
        min_steps = self.min_steps if self.min_steps is not None else max(1, -(-2 // replicas))
        step_time, assumption = None, None
        if self.objective == "goodput":
            measured = self.seconds_per_update()
            if not measured:
                return None
            measured = agreed_seconds(measured)
            step_time = fit_step_time(measured)
            assumption = ONE_COUNT_PRIOR if len(measured) == 1 else None
        decision = decide(
            snapshot["gradient_noise_scale"], steps, scale_per_step, self.objective,
            min_steps=min(min_steps, self.max_steps), max_steps=self.max_steps, threshold=self.threshold,
            update_cost=self.update_cost, target_efficiency=self.target_efficiency, step_time=step_time,
            allowed_steps=self.allowed_steps, assumption=assumption,
        )
        if decision.changed:
            self._pending = (decision, {"from_steps": steps, "noise_scale": snapshot["gradient_noise_scale"]})
            self._apply_pending(optimizer, tau)
        elif self._pending is not None:
            self._pending = None  # the count now preferred is the current one
        return decision

    def _apply_pending(self, optimizer, tau):
        """Makes the change waiting for alignment where it may be made now (after an update, at tau); returns
        whether it did."""
        if self._pending is None:
            return False
        decision, record = self._pending
        # After an update, the next one starts at the micro-batches done so far, which grow by the current
        # count k per update: a multiple of the new count k' comes only if gcd(k, k') divides them (a custom
        # loop may start its updates off that lattice). Where none ever comes, the change is made now.
        setting = optimizer._setting_numbers()
        if (self.align and setting.update_start % decision.steps
                and not setting.update_start % math.gcd(setting.steps, decision.steps)):
            return False
        self._pending = None
        optimizer.set_accumulation_steps(decision.steps)
        self.changes.append({"update": updates_done(optimizer), "scale_invariant_iterations": tau,
                             **record, "steps": decision.steps, "scale": decision.scale,
                             "reason": decision.reason})
        return True

