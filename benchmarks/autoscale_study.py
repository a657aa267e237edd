"""AdaScale choosing S during training (`optimizer.scale: auto`) against AdaScale at fixed S.

One single-batch recipe (default saved_configs/demo.yaml: real MNIST, small CNN, T_SI = 2,400) on one
device, with gradient samples of half a baseline batch (dataset.batch_size 16, baseline 32), so that
S = k / 2 for k accumulation steps: S = 1 is N = 2 samples (AdaScale's gain is 1 there, so it is the
single-batch SGD run) and S = 32 is N = 64. Fixed S in --scales, and the auto variants in --autos,
over --seeds seeds. `--family adam` uses AdaScaleAdam (e.g. with saved_configs/charlm_adam.yaml).

    python benchmarks/autoscale_study.py                  # S = 1..32 and 3 auto variants, 3 seeds
    python benchmarks/autoscale_study.py --quick          # minutes: small MLP, short schedule, 1 seed
    python benchmarks/autoscale_study.py --report         # train nothing: table and plots of what finished

Prints a table (quality mean +- std, updates, examples in baseline batches, mean and final S), the
targets of the auto-scale issue (auto keeps the S = 1 quality; no fixed S and no point of the fixed-S
frontier interpolated on a log scale takes both fewer updates and fewer examples; at most 10% more
examples than S = 1 for >= 30% fewer updates; the margin against the frontier at equal examples) and
writes two plots: every run in the (examples, updates) plane with the fixed-S frontier, and S(tau)
with the noise scale B_simple(tau) of the auto runs. It also prints the recorded B_simple of the fixed-S
runs at 25%, 50%, 75% and 99.6% of T_SI (the noise scale a run measures grows with its own S), and the
gain model's bound for target (c): each S = 1 run's b(tau) replayed with the best continuous schedule
S = sqrt(b / lambda) at +10% examples. The last line printed is a JSON summary. Runs finished from the
same config are kept, so a stopped study resumes where it was.
"""

import argparse
import json
import math
import pathlib
import statistics
import sys
import time

import studies

# name -> the autoscale section of the run.
AUTO_VARIANTS = {
    "auto_budget1": {"objective": "budget", "update_cost": 1.0},
    "auto_budget4": {"objective": "budget", "update_cost": 4.0},
    "auto_efficiency80": {"objective": "efficiency", "target_efficiency": 0.8},
}
OPTIMIZERS = {"sgd": "adascale", "adam": "adascale_adam"}
# Where the fixed-S runs' B_simple is read, as fractions of T_SI (floored to whole tau): the last one is
# just below T_SI, where every run still has a recorded update (2,390 of 2,400 in the demo's recipe).
NOISE_FRACTIONS = (0.25, 0.5, 0.75, 0.996)
# Target (c): at most this share of extra examples over S = 1.
EXTRA_EXAMPLES = 0.10


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model, short schedule, one seed")
    parser.add_argument("--family", choices=sorted(OPTIMIZERS), default="sgd",
                        help="sgd: AdaScaleSGD; adam: AdaScaleAdam (raw statistics)")
    parser.add_argument("--scales", default=None, help="fixed S values (default 1,2,4,8,16,32; quick 1,4)")
    parser.add_argument("--autos", default=None,
                        help=f"auto variants, of {', '.join(AUTO_VARIANTS)}, or none (default all; quick auto_budget4)")
    parser.add_argument("--max-scale", type=float, default=32, help="autoscale.max_scale (default 32)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 3; quick 1)")
    studies.add_recipe_arguments(parser, "autoscale_study")
    parser.add_argument("--report", action="store_true", help="train nothing: report the finished runs")
    args = parser.parse_args(argv)
    if args.report and args.retrain:
        parser.error("--report trains nothing, so it cannot be given with --retrain")
    args.scales = [float(s) if "." in s else int(s)
                   for s in (args.scales or ("1,4" if args.quick else "1,2,4,8,16,32")).split(",")]
    args.autos = (args.autos or ("auto_budget4" if args.quick else ",".join(AUTO_VARIANTS))).split(",")
    if args.autos == ["none"]:
        args.autos = []
    unknown = [name for name in args.autos if name not in AUTO_VARIANTS]
    if unknown:
        parser.error(f"unknown auto variants {unknown}; known: {', '.join(AUTO_VARIANTS)}")
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.experiment = "autoscale_study" if args.family == "sgd" else f"{args.family}_autoscale_study"
    return args


def study_runs(args):
    """The resolved runs: every fixed S and every auto variant, for every seed."""
    from keras_adascale.experiments import config

    overrides = ["strategy.name=default", "strategy.devices=1", "runs=null", f"name={args.experiment}",
                 "dataset.batch_size=16", "optimizer.baseline_batch_size=32",
                 f"optimizer.name={OPTIMIZERS[args.family]}", f"autoscale.max_scale={args.max_scale}"]
    if args.quick:
        overrides += studies.QUICK_OVERRIDES + ["evaluations=3"]
    raw = config.apply_overrides(config.load_raw(args.config), overrides + args.set)
    variants = []
    for seed in range(args.seeds):
        for scale in args.scales:
            variants.append({"name": f"fixed_s{scale:g}_seed{seed}", "seed": seed, "optimizer": {"scale": scale}})
        for name in args.autos:
            variants.append({"name": f"{name}_seed{seed}", "seed": seed, "optimizer": {"scale": "auto"},
                             "autoscale": AUTO_VARIANTS[name]})
    raw["runs"] = variants
    return config.resolve(raw, name=args.experiment)


def method_of(run_name):
    return run_name.rsplit("_seed", 1)[0]


def aggregate(finals):
    """method -> mean and spread over seeds, fixed S first (by S), then the auto variants."""
    groups = {}
    for final in finals:
        groups.setdefault(method_of(final["run"]), []).append(final)
    rows = []
    for method, group in groups.items():
        metric = "test_bits_per_character" if "test_bits_per_character" in group[0] else "test_accuracy"
        values = [final[metric] for final in group]
        rows.append({
            "method": method,
            "auto": method.startswith("auto"),
            "seeds": len(group),
            "metric": metric,
            "quality_mean": statistics.mean(values),
            "quality_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "updates_mean": statistics.mean(final["updates"] for final in group),
            "examples_mean": statistics.mean(final["baseline_batches"] for final in group),
            "scale_mean": statistics.mean(final["scale"] for final in group),
            "final_scale_mean": statistics.mean(final.get("final_scale", final["scale"]) for final in group),
            "wall_time_mean": statistics.mean(final["wall_time"] for final in group),
        })
    return sorted(rows, key=lambda row: (row["auto"], row["scale_mean"] if not row["auto"] else row["method"]))


def frontier_updates(fixed, examples):
    """Updates of the fixed-S frontier at `examples`, interpolated between neighbouring S in log-log; None outside."""
    points = sorted((row["examples_mean"], row["updates_mean"]) for row in fixed)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= examples <= x1:
            t = (math.log(examples) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return None


def targets(rows):
    """The issue's targets (a)-(d) for each auto variant, against the fixed-S rows."""
    fixed = [row for row in rows if not row["auto"]]
    one = next((row for row in fixed if row["scale_mean"] == 1), None)
    results = {}
    for row in (row for row in rows if row["auto"]):
        dominated_by = [f"S={r['scale_mean']:g}" for r in fixed
                        if r["updates_mean"] < row["updates_mean"] and r["examples_mean"] < row["examples_mean"]]
        frontier = frontier_updates(fixed, row["examples_mean"])
        result = {
            "dominated_by_fixed": dominated_by,
            "frontier_updates_at_equal_examples": frontier,
            "margin_vs_frontier": None if frontier is None else 1.0 - row["updates_mean"] / frontier,
        }
        if one is not None:
            result.update({
                "quality_minus_s1": row["quality_mean"] - one["quality_mean"],
                "s1_std": one["quality_std"],
                "extra_examples_vs_s1": row["examples_mean"] / one["examples_mean"] - 1.0,
                "fewer_updates_vs_s1": 1.0 - row["updates_mean"] / one["updates_mean"],
            })
            result["target_c"] = result["extra_examples_vs_s1"] <= 0.10 and result["fewer_updates_vs_s1"] >= 0.30
        results[row["method"]] = result
    return results


def model_margins(experiment_dir, finals, scales, total_steps):
    """method -> the margin over the fixed-S frontier that AdaScale's gain model predicts, mean over seeds.

    From each auto run's own recorded statistics (sigma^2, mu^2 over tau), the model gives a run at
    fixed S' U(S') = integral of d tau / r(S') updates (`keras-adascale advise`) and S' x U(S') examples;
    the margin is 1 - the run's actual updates / that predicted frontier at the run's examples. Set
    beside the measured margin, it says whether the model is right about the fixed-S runs.
    """
    from keras_adascale.experiments.advice import predicted_updates
    from keras_adascale.experiments.rundirs import read_jsonl

    margins, predictions = {}, {}
    for final in finals:
        method = method_of(final["run"])
        if not method.startswith("auto"):
            continue
        rows = read_jsonl(experiment_dir / final["run"] / "metrics.jsonl")
        stats = ([row["tau"] for row in rows], [row["gradient_variance"] for row in rows],
                 [row["gradient_sqr_norm"] for row in rows])
        predicted = [{"examples_mean": scale * updates, "updates_mean": updates}
                     for scale in scales for updates in [predicted_updates(scale, *stats, total_steps)]]
        for scale, row in zip(scales, predicted):
            predictions.setdefault(scale, []).append(row["updates_mean"])
        frontier = frontier_updates(predicted, final["baseline_batches"])
        if frontier is not None:
            margins.setdefault(method, []).append(1.0 - final["updates"] / frontier)
    return ({method: statistics.mean(values) for method, values in margins.items()},
            {scale: statistics.mean(values) for scale, values in predictions.items()})


def seed_of(run_name):
    return int(run_name.rsplit("_seed", 1)[1])


def value_at(rows, key, tau):
    """`key` of the last update with row["tau"] <= tau (the statistics as they stood at tau); None before the first."""
    value = None
    for row in rows:
        if row["tau"] > tau:
            break
        value = row.get(key)
    return value


def noise_scale_by_scale(experiment_dir, finals, total_steps):
    """(taus, {S: [B_simple at each tau, mean over seeds]}) for the fixed-S runs, from their metrics.jsonl.

    B_simple is the recorded `gradient_noise_scale` (sigma^2 / mu^2 in baseline batches) at
    floor(fraction x T_SI) for each of NOISE_FRACTIONS, read as the value of the last update with
    row["tau"] <= that tau. A seed with no update at or before a tau is left out of that mean (None
    where no seed has one).
    """
    from keras_adascale.experiments.rundirs import read_jsonl

    taus = [math.floor(fraction * total_steps) for fraction in NOISE_FRACTIONS]
    values = {}
    for final in finals:
        method = method_of(final["run"])
        if method.startswith("auto"):
            continue
        rows = read_jsonl(experiment_dir / final["run"] / "metrics.jsonl")
        values.setdefault(final["scale"], []).append([value_at(rows, "gradient_noise_scale", tau) for tau in taus])
    means = {}
    for scale, seeds in sorted(values.items()):
        columns = [[value for value in column if value is not None] for column in zip(*seeds)]
        means[scale] = [statistics.mean(column) if column else None for column in columns]
    return taus, means


def best_schedule_bound(rows, total_steps, max_scale, extra_examples=EXTRA_EXAMPLES):
    """The gain model's fewest updates at (1 + extra_examples) x an S = 1 run's examples, from its statistics.

    `rows` are an S = 1 run's metrics.jsonl rows. As `keras-adascale advise` replays them
    (`advice.predicted_updates`), update k covers the piece [tau_(k-1), tau_k] of tau (cut at T_SI =
    `total_steps`) with noise scale b = gradient_variance / gradient_sqr_norm as it recorded (0 where
    both are 0, inf where only the variance is > 0). Under AdaScale's gain model r(S) = (b + 1) / (b / S + 1),
    a piece of length d tau at scale S takes d tau / r(S) updates and d tau x S / r(S) baseline batches
    of examples (`keras_adascale.autoscale.updates_per_tau`, `examples_per_tau`). For a price lambda of
    examples in updates, the schedule with the fewest updates + lambda x examples is
    S(tau) = max(1, sqrt(b(tau) / lambda)) (`autoscale.budget_scale`), at most `max_scale` (what the
    auto runs may use), S = 1 where b = 0 and S = `max_scale` where b is infinite (there r(S) = S: updates are free in examples). Its examples E
    fall as lambda grows, to the S = 1 run's (the sum of the pieces, T_SI for a finished run); lambda is
    bisected on a log scale until E = (1 + extra_examples) x that, and the schedule's updates U are the
    fewest any schedule takes for those examples under the model.

    Returns a dict: `reference` (the S = 1 run's updates and examples under the model), `lambda`,
    `updates` (U), `examples` (E), `scale_mean` (S averaged over tau) and `fewer_updates`
    (1 - U / reference). Where no piece has a finite b > 0, no schedule spends more examples than
    S = 1; `lambda` is then None and the schedule is S = 1 (S = max_scale where b is infinite).
    """
    from keras_adascale.autoscale import examples_per_tau, updates_per_tau

    pieces, start = [], 0.0
    for row in rows:
        length = max(0.0, min(row["tau"], total_steps) - start)
        start = max(start, row["tau"])
        variance, sqr_norm = row["gradient_variance"], row["gradient_sqr_norm"]
        noise = variance / sqr_norm if sqr_norm > 0 else (math.inf if variance > 0 else 0.0)
        if length > 0:
            pieces.append((length, noise))
    reference = sum(length for length, _ in pieces)

    def scale_at(noise, price):
        return float(max_scale) if math.isinf(noise) else min(float(max_scale), max(1.0, math.sqrt(noise / price)))

    def schedule(price):
        updates = examples = weighted_scale = 0.0
        for length, noise in pieces:
            scale = scale_at(noise, price)
            updates += length * updates_per_tau(noise, scale)
            examples += length * examples_per_tau(noise, scale)
            weighted_scale += length * scale
        return updates, examples, weighted_scale / reference

    target = (1.0 + extra_examples) * reference
    price = None
    if any(0 < noise < math.inf for _, noise in pieces):
        low = high = 1.0  # log10 of lambda; E(lambda) falls as lambda grows
        for _ in range(60):
            if schedule(10.0**low)[1] >= target:
                break
            low -= 1.0
        for _ in range(60):
            if schedule(10.0**high)[1] <= target:
                break
            high += 1.0
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if schedule(10.0**middle)[1] > target else (low, middle)
        price = 10.0 ** ((low + high) / 2)
    updates, examples, scale_mean = schedule(math.inf if price is None else price)
    return {"reference": reference, "lambda": price, "updates": updates, "examples": examples,
            "scale_mean": scale_mean, "fewer_updates": 1.0 - updates / reference}


def target_c_bounds(experiment_dir, finals, total_steps, max_scale):
    """seed -> `best_schedule_bound` of that seed's fixed S = 1 run, for the finished ones."""
    from keras_adascale.experiments.rundirs import read_jsonl

    bounds = {}
    for final in sorted(finals, key=lambda final: final["run"]):
        if method_of(final["run"]) == "fixed_s1":
            rows = read_jsonl(experiment_dir / final["run"] / "metrics.jsonl")
            bounds[seed_of(final["run"])] = best_schedule_bound(rows, total_steps, max_scale)
    return bounds


def print_table(rows, verdicts):
    metric = rows[0]["metric"].replace("test_", "test ").replace("_", " ")
    print(f"{'method':>18} {'seeds':>5} {metric + ' (mean +- std)':>32} {'updates':>8} {'examples (B0)':>13} "
          f"{'mean S':>7} {'final S':>7} {'wall s':>7}")
    for row in rows:
        print(f"{row['method']:>18} {row['seeds']:>5} {row['quality_mean']:>23.4f} +- {row['quality_std']:.4f} "
              f"{row['updates_mean']:>8.0f} {row['examples_mean']:>13.0f} {row['scale_mean']:>7.2f} "
              f"{row['final_scale_mean']:>7.2f} {row['wall_time_mean']:>7.1f}")
    for method, verdict in verdicts.items():
        print(f"\n{method}:")
        if "quality_minus_s1" in verdict:
            print(f"  (a) quality - S=1: {verdict['quality_minus_s1']:+.4f} (S=1 std {verdict['s1_std']:.4f})")
        print(f"  (b) fixed S with fewer updates and fewer examples: {', '.join(verdict['dominated_by_fixed']) or 'none'}")
        if "extra_examples_vs_s1" in verdict:
            print(f"  (c) examples vs S=1: {100 * verdict['extra_examples_vs_s1']:+.1f}%, updates vs S=1: "
                  f"{-100 * verdict['fewer_updates_vs_s1']:+.1f}% -> {'holds' if verdict['target_c'] else 'missed'}")
        margin = verdict["margin_vs_frontier"]
        print("  (d) " + ("outside the frontier's examples range" if margin is None else
                         f"updates vs the fixed-S frontier at equal examples: {-100 * margin:+.1f}%"))
        if verdict.get("model_margin_vs_frontier") is not None:
            print(f"      the gain model, replaying this run's statistics, predicts "
                  f"{-100 * verdict['model_margin_vs_frontier']:+.1f}%")


def plot(experiment_dir, rows, finals):
    """autoscale_plane.png (examples, updates) and autoscale_trajectory.png (S and B_simple over tau)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keras_adascale.experiments.rundirs import read_jsonl

    figure, axis = plt.subplots(figsize=(7, 5), constrained_layout=True)
    fixed = [row for row in rows if not row["auto"]]
    axis.plot([row["examples_mean"] for row in fixed], [row["updates_mean"] for row in fixed], "k-", alpha=0.6,
              label="fixed-S frontier (means)")
    for final in finals:
        auto = method_of(final["run"]).startswith("auto")
        axis.plot(final["baseline_batches"], final["updates"], "o" if auto else ".", color="0.5" if auto else "k",
                  markersize=6 if auto else 5, alpha=0.7)
    for row in fixed:
        axis.annotate(f"S={row['scale_mean']:g}", (row["examples_mean"], row["updates_mean"]),
                      textcoords="offset points", xytext=(4, 4), fontsize="small")
    for index, row in enumerate(row for row in rows if row["auto"]):
        axis.plot(row["examples_mean"], row["updates_mean"], "D", color=f"C{index}", markersize=9,
                  markeredgecolor="k", label=f"{row['method']} (mean)")
    axis.set(xscale="log", yscale="log", xlabel="examples spent (baseline batches)", ylabel="updates to T_SI",
             title="every run: fixed S (black dots), auto (grey dots; means as diamonds)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize="small")
    figure.savefig(experiment_dir / "autoscale_plane.png", dpi=90)
    plt.close(figure)

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, constrained_layout=True)
    methods = sorted({method_of(final["run"]) for final in finals if method_of(final["run"]).startswith("auto")})
    largest = 1.0
    for index, method in enumerate(methods):
        for final in finals:
            if method_of(final["run"]) != method:
                continue
            metrics = read_jsonl(experiment_dir / final["run"] / "metrics.jsonl")
            tau = [row["tau"] for row in metrics]
            label = method if final["run"].endswith("seed0") else None
            top.plot(tau, [row["scale"] for row in metrics], color=f"C{index}", alpha=0.8, label=label)
            largest = max([largest] + [row["scale"] for row in metrics])
            noise = [row["gradient_variance"] / row["gradient_sqr_norm"] if row["gradient_sqr_norm"] > 0
                     else float("nan") for row in metrics]
            bottom.plot(tau, noise, color=f"C{index}", alpha=0.6, label=label)
    top.set(yscale="log", ylabel="S", title="auto runs: S and the gradient noise scale over tau")
    ticks = [2**k for k in range(7) if 2**k <= 2 * largest]
    top.set_yticks(ticks, [str(tick) for tick in ticks])
    top.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    bottom.set(yscale="log", xlabel="tau (scale-invariant iterations)", ylabel="B_simple (baseline batches)")
    for axis in (top, bottom):
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize="small")
    figure.savefig(experiment_dir / "autoscale_trajectory.png", dpi=90)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    runs = study_runs(args)
    output_root = pathlib.Path(args.output_dir)
    start = time.perf_counter()
    finals = studies.finished_or_exit("autoscale_study.py", args, runs)
    rows = aggregate(finals)
    verdicts = targets(rows)
    experiment_dir = output_root / args.experiment
    fixed = [row for row in rows if not row["auto"]]
    margins, predictions = model_margins(experiment_dir, finals, [row["scale_mean"] for row in fixed],
                                         runs[0]["total_steps"])
    for method, margin in margins.items():
        verdicts[method]["model_margin_vs_frontier"] = margin
    print()
    print_table(rows, verdicts)
    bounds = target_c_bounds(experiment_dir, finals, runs[0]["total_steps"], args.max_scale)
    if bounds:
        print(f"\n(c) the gain model's bound: each S = 1 run's b(tau) replayed with the best continuous schedule "
              f"S = sqrt(b / lambda), at +{100 * EXTRA_EXAMPLES:.0f}% examples")
        for seed, bound in bounds.items():
            print(f"  seed {seed}: {100 * bound['fewer_updates']:.1f}% fewer updates than S = 1 "
                  f"({bound['updates']:.0f} for {bound['examples']:.0f} examples against {bound['reference']:.0f}; "
                  f"mean S {bound['scale_mean']:.2f})")
    if predictions:
        print("\nfixed S: updates measured, and predicted by the gain model from the auto runs' statistics (mean)")
        for row in fixed:
            predicted = predictions[row["scale_mean"]]
            print(f"  S = {row['scale_mean']:>4g}: {row['updates_mean']:>7.0f} measured, {predicted:>7.0f} predicted "
                  f"({100 * (predicted / row['updates_mean'] - 1):+.0f}%)")
    taus, noise = noise_scale_by_scale(experiment_dir, finals, runs[0]["total_steps"])
    if noise:
        print("\nfixed S: the recorded B_simple (baseline batches, mean over seeds) at tau, the value of the last "
              "update at or before it")
        print(f"{'fixed S':>9}" + "".join(f"{f'tau {tau:,}':>12}" for tau in taus))
        for scale, values in noise.items():
            print(f"{scale:>9g}" + "".join(f"{'-' if value is None else f'{value:.1f}':>12}" for value in values))
    plot(experiment_dir, rows, finals)
    print(f"\nplots: {experiment_dir / 'autoscale_plane.png'}, {experiment_dir / 'autoscale_trajectory.png'}")
    print(json.dumps({
        "command": " ".join(["python", "benchmarks/autoscale_study.py"] + (sys.argv[1:] if argv is None else argv)),
        "total_steps": runs[0]["total_steps"], "model": runs[0]["model"]["name"],
        "dataset": runs[0]["dataset"]["name"], "family": args.family, "seconds": time.perf_counter() - start,
        "results": rows, "targets": verdicts, "model_fixed_updates": {str(k): v for k, v in predictions.items()},
        "noise_scale_by_scale": {"tau": taus, "fixed": {str(k): v for k, v in noise.items()}},
        "target_c_bound": {"extra_examples": EXTRA_EXAMPLES, "seeds": {str(k): v for k, v in bounds.items()}},
    }))


if __name__ == "__main__":
    main()
