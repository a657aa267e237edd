"""`keras-adascale advise`: how far scaling pays, replayed from a run's recorded AdaScale statistics."""

import dataclasses
import json
import math

import numpy as np
from matplotlib.figure import Figure  # not pyplot: no backend is chosen or changed for the caller

from keras_adascale.experiments.config import ADASCALE_OPTIMIZERS, ConfigError
from keras_adascale.experiments.rundirs import read_jsonl

DEFAULT_SCALES = tuple(2**k for k in range(11))  # 1 .. 1024
CRITICAL_EFFICIENCY = 0.5


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What a run at scale S' is predicted to take to reach the same T_SI."""

    scale: float
    updates: int
    examples: int
    efficiency: float  # (T_SI / updates) / S': the share of the S'-fold batch turned into progress
    step_seconds: float
    step_time_measured: bool  # from --step-time, else the run's own time per update (ideal scaling)

    @property
    def wall_seconds(self):
        return self.updates * self.step_seconds


@dataclasses.dataclass(frozen=True)
class Advice:
    """A run's trajectory replayed at other scales."""

    run: str
    scale: float
    baseline_batch_size: int
    total_steps: float
    actual_updates: int
    noise_scale: float  # B_simple in baseline batches, averaged over tau
    predictions: list

    @property
    def critical_scale(self):
        """The first listed scale whose efficiency is below 50%, or None."""
        below = [p.scale for p in self.predictions if p.efficiency < CRITICAL_EFFICIENCY]
        return min(below) if below else None


def gain(scale, variance, sqr_norm):
    """AdaScale's gain r = (sigma2 + mu2) / (sigma2 / S + mu2), elementwise, 1 where both are 0."""
    variance, sqr_norm = np.asarray(variance, np.float64), np.asarray(sqr_norm, np.float64)
    total = variance + sqr_norm
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(total > 0, total / (variance / scale + sqr_norm), 1.0)
    return np.clip(ratio, 1.0, scale)


def predicted_updates(scale, taus, variances, sqr_norms, total_steps):
    """U(S') = integral over tau from 0 to T_SI of d tau / r(S', sigma2(tau), mu2(tau)).

    The recorded run gives the statistics piecewise: update k moved tau from
    tau_(k-1) to tau_k with the averages it recorded. At the run's own scale
    each piece contributes exactly one update; the piece that crosses T_SI is
    cut there, and the count rounded up (a run stops after the update that
    reaches T_SI).
    """
    taus = np.asarray(taus, np.float64)
    starts = np.concatenate([[0.0], taus[:-1]])
    ends = np.minimum(taus, total_steps)
    pieces = np.clip(ends - starts, 0.0, None)
    updates = float(np.sum(pieces / gain(scale, variances, sqr_norms)))
    return max(1, math.ceil(updates - 1e-6))


def advise(run_dir, scales=None, step_times=None):
    """Replays a finished AdaScale run at other scales.

    Args:
        run_dir: `pathlib.Path` of a finished run folder (`final.json`, `metrics.jsonl`).
        scales: the scales S' to predict (default: powers of 2 from 1 to 1024); the run's own S is added.
        step_times: optional {S': seconds per update measured at S'}; other scales assume ideal
            scaling, i.e. the run's own time per update.

    Returns:
        An `Advice`.

    Raises:
        ConfigError: if the folder is not a finished AdaScale run with recorded statistics.
    """
    final_path = run_dir / "final.json"
    if not final_path.is_file():
        raise ConfigError(f"{run_dir}: not a finished run folder (no final.json)")
    final = json.loads(final_path.read_text())
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if final["optimizer"] not in ADASCALE_OPTIMIZERS or not rows or "gradient_variance" not in rows[0]:
        raise ConfigError(
            f"{run_dir}: advise needs an AdaScale run whose metrics.jsonl records gradient_variance and "
            f"gradient_sqr_norm (this is a '{final['optimizer']}' run"
            + ("" if final["optimizer"] not in ADASCALE_OPTIMIZERS else ", recorded before they were; train it again")
            + ")"
        )
    config = json.loads((run_dir / "config.json").read_text())
    total_steps = config["total_steps"]
    baseline = final.get("baseline_batch_size") or final["batch_size"]
    taus = [row["tau"] for row in rows]
    variances = [row["gradient_variance"] for row in rows]
    sqr_norms = [row["gradient_sqr_norm"] for row in rows]
    own_step = final["wall_time"] / final["updates"]
    step_times = dict(step_times or {})
    wanted = sorted(set(scales or DEFAULT_SCALES) | {final["scale"]})
    predictions = []
    for scale in wanted:
        updates = predicted_updates(scale, taus, variances, sqr_norms, total_steps)
        measured = scale in step_times
        predictions.append(Prediction(
            scale=scale, updates=updates, examples=int(round(updates * scale * baseline)),
            efficiency=total_steps / updates / scale,
            step_seconds=step_times[scale] if measured else own_step, step_time_measured=measured,
        ))
    # B_simple averaged over the schedule (tau), as the run spent it.
    pieces = np.diff(np.concatenate([[0.0], np.minimum(taus, total_steps)]))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(np.asarray(sqr_norms) > 0, np.asarray(variances) / np.asarray(sqr_norms), np.inf)
    finite = np.isfinite(ratios)
    noise_scale = float(np.sum(ratios[finite] * pieces[finite]) / max(np.sum(pieces[finite]), 1e-300))
    return Advice(run=f"{final['experiment']}/{final['run']}", scale=final["scale"], baseline_batch_size=baseline,
                  total_steps=total_steps, actual_updates=final["updates"], noise_scale=noise_scale,
                  predictions=predictions)


def _duration(seconds):
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def table(advice):
    """The advice as text: one row per scale, then the noise scale and the critical scale."""
    header = ("S", "updates", "examples", "efficiency", "step time", "wall time")
    rows = []
    for p in advice.predictions:
        own = " (this run: {} updates)".format(advice.actual_updates) if p.scale == advice.scale else ""
        rows.append((f"{p.scale:g}", f"{p.updates}", f"{p.examples:,}", f"{100 * p.efficiency:.0f}%",
                     f"{1000 * p.step_seconds:.1f} ms" + ("" if p.step_time_measured else " *"),
                     _duration(p.wall_seconds) + own))
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    lines = [
        f"Advice from {advice.run} (S = {advice.scale:g}, baseline batch B0 = {advice.baseline_batch_size}, "
        f"T_SI = {advice.total_steps:g}): updates a run at S needs to reach T_SI, replayed from this run's "
        "gradient statistics.",
        "",
        "  ".join(h.rjust(w) for h, w in zip(header, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines += [
        "",
        "* this run's time per update (ideal scaling: S replicas take as long as this run's); "
        "pass --step-time S=SECONDS for measured ones.",
        f"gradient noise scale B_simple = {advice.noise_scale:.3g} baseline batches "
        f"= {advice.noise_scale * advice.baseline_batch_size:,.0f} examples (mean over tau)",
    ]
    critical = advice.critical_scale
    if critical is None:
        lines.append(f"critical scale: none listed; every scale keeps >= {100 * CRITICAL_EFFICIENCY:.0f}% efficiency")
    else:
        lines.append(f"critical scale: S = {critical:g} is the first listed scale below "
                     f"{100 * CRITICAL_EFFICIENCY:.0f}% efficiency; beyond it more examples buy few updates")
    return "\n".join(lines)


def plot(advice, output):
    """Writes the efficiency and the predicted updates against S to `output` (PNG)."""
    scales = np.array([p.scale for p in advice.predictions])
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.plot(scales, [100 * p.efficiency for p in advice.predictions], "o-", label="predicted")
    left.axhline(100 * CRITICAL_EFFICIENCY, color="grey", linestyle=":", label="50%")
    if advice.critical_scale is not None:
        left.axvline(advice.critical_scale, color="tab:red", linestyle="--",
                     label=f"critical scale S = {advice.critical_scale:g}")
    left.plot([advice.scale], [100 * advice.total_steps / advice.actual_updates / advice.scale], "k*",
              markersize=12, label="this run (actual)")
    left.set(xscale="log", xlabel="scale S", ylabel="scaling efficiency (%)", ylim=(0, 105),
             title="gain / S: progress per example vs. S = 1")
    right.plot(scales, [p.updates for p in advice.predictions], "o-", label="predicted updates")
    right.plot(scales, advice.total_steps / scales, color="grey", linestyle=":", label="perfect scaling, T_SI / S")
    right.plot([advice.scale], [advice.actual_updates], "k*", markersize=12, label="this run (actual)")
    right.set(xscale="log", yscale="log", xlabel="scale S", ylabel="updates to reach T_SI",
              title=f"predicted updates (B_simple = {advice.noise_scale:.3g} baseline batches)")
    figure.suptitle(f"{advice.run} (S = {advice.scale:g}): replayed at other scales")
    for axes in (left, right):
        axes.set_xticks(scales, [f"{scale:g}" for scale in scales])
        axes.minorticks_off()
        axes.legend(fontsize=8)
        axes.grid(True, which="major", alpha=0.3)
    figure.savefig(output, dpi=110)
