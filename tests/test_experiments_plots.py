"""experiments/plots.py: every run visible in comparison.png, accuracy panels zoomed to what matters."""

import json

import numpy as np
import pytest
from matplotlib.image import imread

from keras_adascale.experiments import plots

C0, C1 = np.array([0x1F, 0x77, 0xB4]) / 255, np.array([0xFF, 0x7F, 0x0E]) / 255  # matplotlib's first colors


def write_run(folder, name, updates=200, gain=1.0, rate=0.1):
    """A finished run folder as the runner writes it: accuracy from 0.1 to ~0.99, a gain and a learning rate."""
    folder.mkdir(parents=True)
    steps = np.arange(1, updates + 1)
    accuracy = 0.99 - 0.89 * np.exp(-steps / (updates / 8))
    with open(folder / "metrics.jsonl", "w") as f:
        for step, acc in zip(steps, accuracy):
            f.write(json.dumps({"update": int(step), "tau": float(step), "loss": float(1.0 - acc + 0.01),
                                "accuracy": float(acc), "gain": gain, "learning_rate": rate}) + "\n")
    evaluations = steps[updates // 5 - 1::updates // 5]
    with open(folder / "evaluations.jsonl", "w") as f:
        for step in evaluations:
            f.write(json.dumps({"update": int(step), "tau": float(step), "test_loss": float(1.0 - accuracy[step - 1]),
                                "test_accuracy": float(accuracy[step - 1] - 0.002)}) + "\n")
    final = {"run": name, "scale": 4, "updates": updates, "test_accuracy": float(accuracy[-1] - 0.002)}
    (folder / "final.json").write_text(json.dumps(final))
    return folder


def pixels_near(image, axes, color):
    """How many pixels of `axes` (inside its frame) are within a small distance of `color`."""
    height, width = image.shape[:2]
    box = axes.get_position()
    rows = slice(int((1 - box.y1) * height) + 2, int((1 - box.y0) * height) - 2)
    columns = slice(int(box.x0 * width) + 2, int(box.x1 * width) - 2)
    patch = image[rows, columns, :3]
    return int(np.sum(np.linalg.norm(patch - color, axis=-1) < 0.12))


def test_comparison_keeps_runs_with_identical_curves_visible(tmp_path):
    """LSR and LSR with warm-up share gain 1 and (after warm-up) the learning rate: both must show."""
    first = write_run(tmp_path / "exp" / "lsr", "lsr")
    second = write_run(tmp_path / "exp" / "lsr_warmup", "lsr_warmup")
    figure = plots.plot_comparison([first, second], tmp_path / "comparison.png")
    image = imread(tmp_path / "comparison.png")
    gain_axes, rate_axes = figure.axes[2], figure.axes[3]
    assert [a.get_ylabel() for a in (gain_axes, rate_axes)] == ["gain r_t", "learning rate"]
    for axes in (gain_axes, rate_axes):
        underneath, on_top = pixels_near(image, axes, C0), pixels_near(image, axes, C1)
        # Drawn alike, the second line would hide the first all along its length.
        assert underneath > 0.3 * on_top and on_top > 100, (axes.get_ylabel(), underneath, on_top)
    legend_texts = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    assert legend_texts == ["lsr (S=4, 200 updates)", "lsr_warmup (S=4, 200 updates)"]


def test_comparison_zooms_test_accuracy_to_the_second_half(tmp_path):
    runs = [write_run(tmp_path / "exp" / name, name) for name in ("a", "b")]
    figure = plots.plot_comparison(runs, tmp_path / "comparison.png")
    low, high = figure.axes[0].get_ylim()
    points = [json.loads(line)["test_accuracy"] for line in (runs[0] / "evaluations.jsonl").read_text().splitlines()]
    points.append(json.loads((runs[0] / "final.json").read_text())["test_accuracy"])  # plotted at the end
    late = points[len(points) // 2:]
    assert 0.8 < low <= min(late) and max(late) <= high <= 1.0005 and low > min(points)


def test_run_curves_zoom_accuracy_to_the_second_half(tmp_path):
    """A 0-1 accuracy axis hides the tenths of a point that matter at the end of training."""
    run = write_run(tmp_path / "exp" / "adascale", "adascale")
    figure = plots.plot_run(run)
    assert (run / "curves.png").stat().st_size > 10_000 and (run / "gain_lr.png").is_file()
    for axes in figure.axes[2:]:
        low, high = axes.get_ylim()
        assert 0.9 < low < 0.99 and 0.99 <= high <= 1.0005, axes.get_ylim()
        assert high - low < 0.1


@pytest.mark.parametrize("count", [1, 5])
def test_comparison_draws_any_number_of_runs(tmp_path, count):
    runs = [write_run(tmp_path / "exp" / f"r{i}", f"r{i}", updates=50 + 10 * i) for i in range(count)]
    figure = plots.plot_comparison(runs, tmp_path / "comparison.png")
    assert len(figure.axes[1].get_lines()) == count and (tmp_path / "comparison.png").stat().st_size > 10_000
