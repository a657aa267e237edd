"""Issue 42, a first look: on what key is the noise scale a run measures the same at every S?

The noise scale B_simple(tau) that a fixed-S run records grows with the run's own S at equal tau (benchmarks,
section 6), which is why `advise` mispredicts far from the run's S. This reads the finished fixed-S runs of
`autoscale_study.py` (the demo's recipe, S = 1..32, several seeds) and asks how much B_simple still differs
across S when the runs are compared at equal values of other keys:

- `tau`: scale-invariant iterations (what `advise` and AutoScale's gain model key on today);
- `examples`: training examples seen;
- `loss`: the training loss, smoothed (the mean over a window of updates centred on each), at its first crossing of each value,
  on a grid even in log loss (hypothesis: a run at larger S has a lower noise temperature, settles lower at the same tau, where the
  gradient is smaller and the noise scale larger; if so, b would follow the loss, not tau).

For each key, the common range of all the S (the key's values every S's seed-mean curve reaches) on a grid of
`--points`; at each point, log B_simple of each S (the mean over its seeds); the spread there is the largest
over the smallest B_simple across S, as a factor. Printed per key: the spread's median and maximum over the
grid, and B_simple(S = 32) / B_simple(S = 1) at a quarter, half and three quarters of the range. A key on
which b is S-invariant has spreads near 1. Plots b against each key, one line per S (PNG).

    .venv/bin/python benchmarks/autoscale_study.py --autos none --output-dir runs/studies   # the runs, ~45 min
    .venv/bin/python benchmarks/noise_scale_key.py --runs runs/studies/autoscale_study

Needs only NumPy and matplotlib (no training). The last line printed is a JSON summary.
"""

import argparse
import json
import pathlib
import re

import numpy as np

KEYS = ("tau", "examples", "loss")
RUN = re.compile(r"fixed_s(?P<scale>[0-9.]+)_seed(?P<seed>\d+)$")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/studies/autoscale_study",
                        help="the study's folder of runs (fixed_s<S>_seed<i>/metrics.jsonl)")
    parser.add_argument("--points", type=int, default=50, help="grid points over each key's common range")
    parser.add_argument("--window", type=int, default=50, help="updates in the training loss's moving mean")
    parser.add_argument("--plot", default=None, help="the PNG (default RUNS/noise_scale_key.png)")
    return parser.parse_args(argv)


def read_runs(folder):
    """{S: [run, ...]}, a run a dict of NumPy arrays (tau, examples, loss, b) over its updates."""
    runs = {}
    for path in sorted(pathlib.Path(folder).glob("fixed_s*_seed*/metrics.jsonl")):
        match = RUN.match(path.parent.name)
        if match is None or not (path.parent / "final.json").exists():  # unfinished runs are left out
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [row for row in rows if row.get("gradient_noise_scale") and row["gradient_noise_scale"] > 0]
        if not rows:
            continue
        runs.setdefault(float(match["scale"]), []).append(
            {name: np.array([row[field] for row in rows], float)
             for name, field in (("tau", "tau"), ("examples", "examples"), ("loss", "loss"),
                                 ("b", "gradient_noise_scale"))})
    return runs


def smoothed(values, window):
    """The moving mean over `window` values centred on each (fewer at the ends): a trailing mean would lag the
    loss by window / 2 updates, more at the S whose loss falls faster per update."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    index = np.arange(len(values))
    starts = np.maximum(index - window // 2, 0)
    ends = np.minimum(index - window // 2 + window, len(values))
    return (sums[ends] - sums[starts]) / (ends - starts)


def curve(run, key, window):
    """(key values, b) of one run, the key increasing: tau and examples as recorded; the loss smoothed, as its
    running minimum (b at the first update where the smoothed loss reaches each value), as -log(loss) (a grid
    even in log loss: most of training is at losses far below the first ones)."""
    if key != "loss":
        return run[key], run["b"]
    loss = np.minimum.accumulate(smoothed(run["loss"], window))
    first = np.concatenate([[True], loss[1:] < loss[:-1]])  # the first update at each new low
    return -np.log(loss[first]), run["b"][first]


def log_b_at(runs, key, grid, window):
    """Mean over seeds of log b at the grid's points, for one S."""
    values = []
    for run in runs:
        x, b = curve(run, key, window)
        values.append(np.interp(grid, x, np.log(b)))
    return np.mean(values, axis=0)


def analyse(runs, key, points, window):
    lows, highs = [], []
    for group in runs.values():
        for run in group:
            x, _ = curve(run, key, window)
            lows.append(x.min())
            highs.append(x.max())
    low, high = max(lows), min(highs)
    if not low < high:
        return None
    grid = np.linspace(low, high, points)
    log_b = {scale: log_b_at(group, key, grid, window) for scale, group in sorted(runs.items())}
    stacked = np.array(list(log_b.values()))
    spread = np.exp(stacked.max(axis=0) - stacked.min(axis=0))
    first, last = min(log_b), max(log_b)
    ratio = np.exp(log_b[last] - log_b[first])
    quarter = [float(ratio[int(f * (points - 1))]) for f in (0.25, 0.5, 0.75)]
    shown = np.exp(-grid) if key == "loss" else grid  # the loss itself
    return {"key": key, "range": [float(shown[0]), float(shown[-1])], "grid": shown.tolist(),
            "log_b": {f"{scale:g}": values.tolist() for scale, values in log_b.items()},
            "spread_median": float(np.median(spread)), "spread_max": float(spread.max()),
            "last_over_first": quarter, "first_scale": first, "last_scale": last}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for axis, result in zip(axes[0], results, strict=True):
        grid = np.array(result["grid"])
        for scale, values in result["log_b"].items():
            axis.plot(grid, np.exp(values), label=f"S = {scale}")
        axis.set_yscale("log")
        if result["key"] == "loss":
            axis.set_xscale("log")
        axis.set_xlabel({"tau": "tau", "examples": "examples seen",
                         "loss": "training loss (moving mean, first reached)"}[result["key"]])
        if result["key"] == "loss":
            axis.invert_xaxis()  # training goes right: the loss falls
        axis.set_ylabel("B_simple (baseline batches)")
        axis.set_title(f"{result['key']}: spread x{result['spread_median']:.2f} (median)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    runs = read_runs(args.runs)
    if len(runs) < 2:
        raise SystemExit(f"noise_scale_key.py: finished fixed-S runs of at least two S needed under {args.runs}; "
                         f"found S = {sorted(runs)}")
    results = [result for key in KEYS if (result := analyse(runs, key, args.points, args.window)) is not None]
    seeds = {f"{scale:g}": len(group) for scale, group in sorted(runs.items())}
    print(f"Fixed-S runs (S: seeds) {seeds}; B_simple compared across S at equal values of each key "
          f"({args.points} points over the range every S reaches):")
    print(f"{'key':>9} {'range':>22} {'spread median':>14} {'spread max':>11}   "
          f"b(S={max(runs):g}) / b(S={min(runs):g}) at 1/4, 1/2, 3/4")
    for result in results:
        low, high = result["range"]
        ratios = ", ".join(f"{value:.2f}" for value in result["last_over_first"])
        print(f"{result['key']:>9} {f'{low:.4g} - {high:.4g}':>22} {result['spread_median']:>14.2f} "
              f"{result['spread_max']:>11.2f}   {ratios}")
    path = pathlib.Path(args.plot or pathlib.Path(args.runs) / "noise_scale_key.png")
    plot(results, path)
    summary = {"command": "benchmarks/noise_scale_key.py", "runs": str(args.runs), "seeds": seeds,
               "window": args.window, "plot": str(path),
               "results": [{k: v for k, v in result.items() if k not in ("grid", "log_b")} for result in results]}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
