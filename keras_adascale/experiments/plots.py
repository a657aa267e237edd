"""PNG plots of one run and of several runs side by side (matplotlib, no display needed)."""

import json

import numpy as np
from matplotlib.figure import Figure  # not pyplot: no backend is chosen or changed for the caller

from keras_adascale.experiments.rundirs import read_jsonl


def _smooth(values, points=50):
    """A trailing moving average over about 1/points of the series (per-update values are noisy)."""
    values = np.asarray(values, dtype=np.float64)
    window = max(1, len(values) // points)
    if window == 1:
        return values
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    head = cumulative[1:window] / np.arange(1, window)
    return np.concatenate([head, (cumulative[window:] - cumulative[:-window]) / window])


def _column(rows, name):
    return np.array([row[name] for row in rows], dtype=np.float64)


def _zoom_to_late(axis, series, top=None):
    """Sets the y range to what the curves span over their second half (plus a margin), not 0 to 1.

    The early part of a run (accuracy 0.1 at the start) would otherwise stretch the axis so that the
    differences that matter, a few tenths of a point at the end, are invisible. Returns the limits.
    """
    late = np.concatenate([np.asarray(values, np.float64)[len(values) // 2:] for values in series if len(values)])
    late = late[np.isfinite(late)]
    if not len(late):
        return axis.get_ylim()
    low, high = float(late.min()), float(late.max())
    margin = max(0.25 * (high - low), 1e-3)
    limits = (low - margin, high + margin if top is None else min(high + margin, top))
    axis.set_ylim(*limits)
    return limits


def plot_run(run_dir):
    """Writes `curves.png` (loss and accuracy vs. updates and vs. tau) and `gain_lr.png` into a run folder.

    The accuracy panels show the range the second half of the run spans (the early, low accuracies run
    off the bottom), so that the end of training is readable.

    Args:
        run_dir: `pathlib.Path` of a run folder with `metrics.jsonl`.

    Returns:
        The curves figure (`matplotlib.figure.Figure`), already written.
    """
    rows = read_jsonl(run_dir / "metrics.jsonl")
    evaluations = read_jsonl(run_dir / "evaluations.jsonl")
    title = f"{run_dir.parent.name} / {run_dir.name.removesuffix('.incomplete')}"
    figure = Figure(figsize=(11, 7), layout="constrained")
    axes = figure.subplots(2, 2)
    for column, x_name, x_label in ((0, "update", "updates"), (1, "tau", "scale-invariant steps (tau)")):
        x = _column(rows, x_name)
        axes[0, column].plot(x, _smooth(_column(rows, "loss")), label="train (smoothed)")
        if evaluations:
            axes[0, column].plot(_column(evaluations, x_name), _column(evaluations, "test_loss"), "o-", label="test")
        axes[0, column].set(xlabel=x_label, ylabel="loss", yscale="log")
        train_accuracy = _smooth(_column(rows, "accuracy"))
        axes[1, column].plot(x, train_accuracy, label="train (smoothed)")
        test_accuracy = _column(evaluations, "test_accuracy") if evaluations else np.array([])
        if evaluations:
            axes[1, column].plot(_column(evaluations, x_name), test_accuracy, "o-", label="test")
        axes[1, column].set(xlabel=x_label, ylabel="accuracy (second half's range)")
        _zoom_to_late(axes[1, column], [train_accuracy, test_accuracy], top=1.0005)
        for axis in axes[:, column]:
            axis.legend()
            axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.savefig(run_dir / "curves.png", dpi=80)
    curves = figure

    figure = Figure(figsize=(11, 3.5), layout="constrained")
    axes = figure.subplots(1, 2)
    updates = _column(rows, "update")
    axes[0].plot(updates, _column(rows, "gain"))
    axes[0].set(xlabel="updates", ylabel="gain r_t")
    axes[1].plot(updates, _column(rows, "learning_rate"))
    axes[1].set(xlabel="updates", ylabel="effective learning rate", yscale="log")
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.savefig(run_dir / "gain_lr.png", dpi=80)
    return curves


# Runs drawn on one axis can coincide (LSR and LSR with warm-up share their gain, 1, and their learning
# rate after the warm-up): each run gets its own dash pattern and marker, the earlier runs are drawn
# wider underneath the later ones, and the markers of run i sit at offset i, so that every run stays
# visible where the lines lie on top of each other.
_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot_comparison(run_dirs, path):
    """Writes one PNG comparing runs: test accuracy, training loss, gain and learning rate vs. updates.

    Every run stays visible where runs coincide (own dash pattern and marker, wider lines underneath);
    the test-accuracy panel shows the range of the second half of training. One legend, below the panels.

    Args:
        run_dirs: finished run folders.
        path: the PNG file to write.

    Returns:
        The figure (`matplotlib.figure.Figure`), already written.
    """
    figure = Figure(figsize=(12, 8), layout="constrained")
    axes = figure.subplots(2, 2)
    count = len(run_dirs)
    accuracies, handles = [], []
    for index, run_dir in enumerate(run_dirs):
        final = json.loads((run_dir / "final.json").read_text())
        label = f"{final['run']} (S={final['scale']:.3g}, {final['updates']} updates)"
        rows = read_jsonl(run_dir / "metrics.jsonl")
        evaluations = read_jsonl(run_dir / "evaluations.jsonl")
        updates = _column(rows, "update")
        style = {"color": f"C{index % 10}", "linestyle": _STYLES[index % len(_STYLES)],
                 "linewidth": 1.0 + 0.6 * (count - 1 - index), "zorder": 2 + index,
                 "marker": _MARKERS[index % len(_MARKERS)], "markersize": 5, "label": label}
        spaced = max(1, len(rows) // 12)
        accuracy_x = [0] + [row["update"] for row in evaluations] + [final["updates"]]
        accuracy = [np.nan] + [row["test_accuracy"] for row in evaluations] + [final["test_accuracy"]]
        accuracies.append(np.asarray(accuracy[1:], np.float64))
        handles.append(axes[0, 0].plot(accuracy_x, accuracy, **style)[0])
        # Run i's markers start i / count of the way into the spacing, so coinciding runs alternate.
        per_update = {**style, "markevery": (index * spaced // count, spaced)}
        axes[0, 1].plot(updates, _smooth(_column(rows, "loss")), **per_update)
        axes[1, 0].plot(updates, _column(rows, "gain"), **per_update)
        axes[1, 1].plot(updates, _column(rows, "learning_rate"), **per_update)
    axes[0, 0].set(xlabel="updates", ylabel="test accuracy (second half's range)")
    _zoom_to_late(axes[0, 0], accuracies, top=1.0005)
    axes[0, 1].set(xlabel="updates", ylabel="training loss (smoothed)", yscale="log")
    axes[1, 0].set(xlabel="updates", ylabel="gain r_t")
    axes[1, 1].set(xlabel="updates", ylabel="learning rate", yscale="log")
    for axis in axes.flat:
        axis.grid(alpha=0.3)
    figure.legend(handles=handles, loc="outside lower center", ncols=min(count, 3), fontsize="small")
    figure.savefig(path, dpi=80)
    return figure
