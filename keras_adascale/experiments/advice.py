"""`keras-adascale advise`: how far scaling pays, replayed from a run's recorded AdaScale statistics."""

import dataclasses
import json
import math
import textwrap

import numpy as np
from matplotlib.figure import Figure  # not pyplot: no backend is chosen or changed for the caller

from keras_adascale.experiments.config import ADASCALE_OPTIMIZERS, ConfigError
from keras_adascale.experiments.rundirs import read_jsonl

DEFAULT_SCALES = tuple(2**k for k in range(11))  # 1 .. 1024
CRITICAL_EFFICIENCY = 0.5
# The default table stops at the first scale below this efficiency: beyond it, S x more examples buy
# almost no fewer updates, and the rows would only repeat that.
NEGLIGIBLE_EFFICIENCY = 0.1
# How far the replay is known to be pessimistic (docs/benchmarks.md, sections 3 and 6): from an S = 4 MNIST run it
# predicted 40% more updates than real runs took at S = 16 and 80% more at S = 32 (means over 3 seeds; the
# noise scale a run measures grows with its own S). Rows at this multiple of the run's S or more carry the warning.
PESSIMISTIC_FROM = 4


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

    cut_at: float | None = None  # the default scales stopped after this one (negligible efficiency)
    step_seconds: float | None = None  # this run's own wall time per update
    # For a run that chose S during training (`optimizer.scale: auto`): its S over tau, as
    # (S, first tau, last tau, updates) per stretch at one S; `scale` is then its mean S over updates.
    scale_path: tuple = ()

    @property
    def auto(self):
        """Whether the run chose S during training (its rows are then for a fixed S, not its own)."""
        return bool(self.scale_path)

    @property
    def critical_scale(self):
        """The first listed scale whose efficiency is below 50%, or None."""
        below = [p.scale for p in self.predictions if p.efficiency < CRITICAL_EFFICIENCY]
        return min(below) if below else None

    @property
    def own_step_seconds(self):
        if self.step_seconds is not None:
            return self.step_seconds
        return next(p.step_seconds for p in self.predictions if p.scale == self.scale)

    @property
    def measured_step_times(self):
        return any(p.step_time_measured for p in self.predictions)

    def recommendation(self):
        """`(prediction, reason)`: the S to use and why, in words.

        With step times measured at two or more scales, the fastest of those (the only wall times that
        are not guesses); otherwise the largest listed S that keeps at least 50% efficiency, i.e. the
        most updates saved while most of every update's examples still turn into progress.
        """
        measured = [p for p in self.predictions if p.step_time_measured]
        if len(measured) >= 2:
            best = min(measured, key=lambda p: p.wall_seconds)
            return best, (f"the least predicted wall time ({_duration(best.wall_seconds)}) among the scales "
                          f"whose step time you measured ({', '.join(f'{p.scale:g}' for p in measured)})")
        efficient = [p for p in self.predictions if p.efficiency >= CRITICAL_EFFICIENCY]
        best = max(efficient, key=lambda p: p.scale)  # S = 1 always qualifies (efficiency 100%)
        reason = (f"the largest listed S that keeps at least {100 * CRITICAL_EFFICIENCY:.0f}% efficiency: "
                  f"{best.updates} updates, {100 * best.efficiency:.0f}% of its examples turn into progress")
        larger = [p for p in self.predictions if p.scale > best.scale]
        if larger:
            nxt = min(larger, key=lambda p: p.scale)
            reason += (f"; S = {nxt.scale:g} would save {best.updates - nxt.updates} more updates "
                       f"({100 * (1 - nxt.updates / best.updates):.0f}%) for {nxt.scale / best.scale:g}x the examples "
                       "per update")
        return best, reason


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
    auto = final.get("scale_setting") == "auto"
    # An auto run's S changed: its mean is no S anyone ran at, so no row of its own.
    own = set() if auto else {final["scale"]}
    wanted = sorted(set(scales or DEFAULT_SCALES) | own | set(step_times))
    predictions, cut_at = [], None
    for scale in wanted:
        updates = predicted_updates(scale, taus, variances, sqr_norms, total_steps)
        measured = scale in step_times
        predictions.append(Prediction(
            scale=scale, updates=updates, examples=int(round(updates * scale * baseline)),
            efficiency=total_steps / updates / scale,
            step_seconds=step_times[scale] if measured else own_step, step_time_measured=measured,
        ))
        if scales is None and predictions[-1].efficiency < NEGLIGIBLE_EFFICIENCY and scale >= final["scale"]:
            cut_at = scale if scale < wanted[-1] else None
            break
    # B_simple averaged over the schedule (tau), as the run spent it.
    pieces = np.diff(np.concatenate([[0.0], np.minimum(taus, total_steps)]))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(np.asarray(sqr_norms) > 0, np.asarray(variances) / np.asarray(sqr_norms), np.inf)
    finite = np.isfinite(ratios)
    noise_scale = float(np.sum(ratios[finite] * pieces[finite]) / max(np.sum(pieces[finite]), 1e-300))
    return Advice(run=f"{final['experiment']}/{final['run']}", scale=final["scale"], baseline_batch_size=baseline,
                  total_steps=total_steps, actual_updates=final["updates"], noise_scale=noise_scale,
                  predictions=predictions, cut_at=cut_at, step_seconds=own_step,
                  scale_path=scale_path(rows) if auto else ())


def scale_path(rows):
    """A run's S over tau from its per-update rows: `(S, first tau, last tau, updates)` per stretch at one S."""
    path = []
    previous_tau = 0.0
    for row in rows:
        if path and path[-1][0] == row["scale"]:
            scale, start, _, updates = path[-1]
            path[-1] = (scale, start, row["tau"], updates + 1)
        else:
            path.append((row["scale"], previous_tau, row["tau"], 1))
        previous_tau = row["tau"]
    return tuple(path)


def scale_text(scale):
    """S as people write it: 4, 16, 5.9 (not 5.91832)."""
    scale = float(scale)
    return f"{scale:g}" if scale.is_integer() else f"{scale:.1f}"


def _duration(seconds):
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _paragraph(text):
    return textwrap.fill(text, width=100, subsequent_indent="  ", break_on_hyphens=False)


def table(advice):
    """The advice as text: what the wall times assume, one row per scale, the noise scale, the critical
    scale, how far the rows can be trusted, and the recommended S with its reason."""
    header = ("S", "updates", "examples", "efficiency", "step time", "wall time")
    rows = []
    for p in advice.predictions:
        own = f" (this run: {advice.actual_updates} updates)" if p.scale == advice.scale and not advice.auto else ""
        rows.append((f"{p.scale:g}", f"{p.updates}", f"{p.examples:,}", f"{100 * p.efficiency:.0f}%",
                     f"{1000 * p.step_seconds:.1f} ms" + ("" if p.step_time_measured else " *"),
                     _duration(p.wall_seconds) + own))
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    if advice.auto:
        stretches = ", ".join(f"S = {scale_text(scale)} for tau {start:.0f}-{end:.0f} ({updates} updates)"
                              for scale, start, end, updates in advice.scale_path)
        lines = [
            _paragraph(f"Advice from {advice.run}, a run that chose S during training (baseline batch B0 = "
                       f"{advice.baseline_batch_size}, T_SI = {advice.total_steps:g}). It ran {stretches}: "
                       f"{advice.actual_updates} updates in all, at a mean S of {scale_text(advice.scale)} per "
                       "update. The rows are what a run at one fixed S all the way would need to reach T_SI, "
                       "replayed from this run's gradient statistics; compare them with its own count."),
            "",
        ]
    else:
        lines = [
            _paragraph(f"Advice from {advice.run} (S = {scale_text(advice.scale)}, baseline batch B0 = "
                       f"{advice.baseline_batch_size}, T_SI = {advice.total_steps:g}): updates a run at S needs "
                       "to reach T_SI, replayed from this run's gradient statistics."),
            "",
        ]
    if not advice.measured_step_times:
        lines += [
            _paragraph(f"WARNING: no step times given. The wall-time column assumes this run's "
                       f"{1000 * advice.own_step_seconds:.1f} ms per update at every S (*): a guess that is only "
                       "right if S replicas take as long per update as this run did. Measure a few updates at "
                       "each S you consider and pass --step-time S=SECONDS."),
            "",
        ]
    lines += [
        "  ".join(h.rjust(w) for h, w in zip(header, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.append("")
    if any(not p.step_time_measured for p in advice.predictions):
        lines.append("* this run's time per update, not measured at that S.")
    if advice.cut_at is not None:
        lines.append(f"(stopped at S = {advice.cut_at:g}: efficiency below {100 * NEGLIGIBLE_EFFICIENCY:.0f}%, "
                     "larger S buy almost no fewer updates; --scales lists any others)")
    lines.append(f"gradient noise scale B_simple = {advice.noise_scale:.3g} baseline batches "
                 f"= {advice.noise_scale * advice.baseline_batch_size:,.0f} examples (mean over tau)")
    critical = advice.critical_scale
    if critical is None:
        lines.append(f"critical scale: none listed; every scale keeps >= {100 * CRITICAL_EFFICIENCY:.0f}% efficiency")
    else:
        lines.append(f"critical scale: S = {critical:g} is the first listed scale below "
                     f"{100 * CRITICAL_EFFICIENCY:.0f}% efficiency; beyond it more examples buy few updates")
    far = [p.scale for p in advice.predictions if p.scale >= PESSIMISTIC_FROM * advice.scale]
    if far:
        lines.append(_paragraph(
            f"CONSERVATIVE at S >= {min(far):g}: the noise scale a run measures grows with its own S, so runs "
            f"far above S = {scale_text(advice.scale)} need fewer updates than these rows say (measured on MNIST from an "
            "S = 4 run, 3 seeds: +40% too many predicted at S = 16, +80% at S = 32; docs/benchmarks.md, section 6). "
            "Train a short run at a larger S and advise from it to check."))
    best, reason = advice.recommendation()
    fixed = " for a fixed S" if advice.auto else ""
    lines += ["", _paragraph(f"Recommendation{fixed}: S = {best.scale:g}, {reason}.")]
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
    own_label = "this run (actual, at its mean S)" if advice.auto else "this run (actual)"
    left.plot([advice.scale], [100 * advice.total_steps / advice.actual_updates / advice.scale], "k*",
              markersize=12, label=own_label)
    left.set(xscale="log", xlabel="scale S", ylabel="scaling efficiency (%)", ylim=(0, 105),
             title="gain / S: progress per example vs. S = 1")
    right.plot(scales, [p.updates for p in advice.predictions], "o-", label="predicted updates")
    right.plot(scales, advice.total_steps / scales, color="grey", linestyle=":", label="perfect scaling, T_SI / S")
    right.plot([advice.scale], [advice.actual_updates], "k*", markersize=12, label=own_label)
    right.set(xscale="log", yscale="log", xlabel="scale S", ylabel="updates to reach T_SI",
              title=f"predicted updates (B_simple = {advice.noise_scale:.3g} baseline batches)")
    own_scale = f"S chosen during training, mean {scale_text(advice.scale)}" if advice.auto else \
        f"S = {scale_text(advice.scale)}"
    figure.suptitle(f"{advice.run} ({own_scale}): replayed at fixed scales")
    for axes in (left, right):
        axes.set_xticks(scales, [f"{scale:g}" for scale in scales])
        axes.minorticks_off()
        axes.legend(fontsize=8)
        axes.grid(True, which="major", alpha=0.3)
    figure.savefig(output, dpi=110)
