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


def plot_run(run_dir):
    """Writes `curves.png` (loss and accuracy vs. updates and vs. tau) and `gain_lr.png` into a run folder.

    Args:
        run_dir: `pathlib.Path` of a run folder with `metrics.jsonl`.
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
        axes[1, column].plot(x, _smooth(_column(rows, "accuracy")), label="train (smoothed)")
        if evaluations:
            axes[1, column].plot(
                _column(evaluations, x_name), _column(evaluations, "test_accuracy"), "o-", label="test"
            )
        axes[1, column].set(xlabel=x_label, ylabel="accuracy")
        for axis in axes[:, column]:
            axis.legend()
            axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.savefig(run_dir / "curves.png", dpi=80)

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


def plot_comparison(run_dirs, path):
    """Writes one PNG comparing runs: test accuracy, training loss, gain and learning rate vs. updates.

    Args:
        run_dirs: finished run folders.
        path: the PNG file to write.
    """
    figure = Figure(figsize=(12, 7.5), layout="constrained")
    axes = figure.subplots(2, 2)
    for run_dir in run_dirs:
        final = json.loads((run_dir / "final.json").read_text())
        label = f"{final['run']} (S={final['scale']}, {final['updates']} updates)"
        rows = read_jsonl(run_dir / "metrics.jsonl")
        evaluations = read_jsonl(run_dir / "evaluations.jsonl")
        updates = _column(rows, "update")
        line = axes[0, 0].plot(
            [0] + [row["update"] for row in evaluations] + [final["updates"]],
            [np.nan] + [row["test_accuracy"] for row in evaluations] + [final["test_accuracy"]],
            "o-", label=label,
        )[0]
        axes[0, 1].plot(updates, _smooth(_column(rows, "loss")), color=line.get_color(), label=label)
        axes[1, 0].plot(updates, _column(rows, "gain"), color=line.get_color(), label=label)
        axes[1, 1].plot(updates, _column(rows, "learning_rate"), color=line.get_color(), label=label)
    axes[0, 0].set(xlabel="updates", ylabel="test accuracy")
    axes[0, 1].set(xlabel="updates", ylabel="training loss (smoothed)", yscale="log")
    axes[1, 0].set(xlabel="updates", ylabel="gain r_t")
    axes[1, 1].set(xlabel="updates", ylabel="learning rate", yscale="log")
    for axis in axes.flat:
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.savefig(path, dpi=80)
