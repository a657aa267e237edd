"""How well does `keras-adascale advise` predict? One run's statistics against actual runs at other S.

Trains AdaScale from one single-batch recipe (saved_configs/demo.yaml: real MNIST, small CNN,
B0 = 32, T_SI = 2,400) at several scales S (gradient accumulation on one device, S = N), replays
the run at --from-scale through `advise`, and compares its predicted update counts with the
actual runs' counts.

    python benchmarks/advice_check.py              # S = 2..32 from the S = 4 run, 1 seed (~12 min on 2 CPU cores)
    python benchmarks/advice_check.py --seeds 0,1,2   # 3 seeds (~36 min): a table per seed and their mean
    python benchmarks/advice_check.py --quick      # a minute: small MLP, short schedule, S = 2, 4, 8

Writes each seed's runs and `advice_check.png` under OUTPUT_DIR/advice_check (seed 0) or
OUTPUT_DIR/advice_check_seed<n>, and prints a table per seed (and, with several seeds, the mean and
range of each error); the last line printed is a JSON summary. Finished runs are kept, so adding a
seed trains only that seed.
"""

import argparse
import json
import pathlib
import sys
import time

import studies


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model, short schedule")
    parser.add_argument("--scales", default=None, help="comma-separated S values (default 2,4,8,16,32; quick 2,4,8)")
    parser.add_argument("--from-scale", type=int, default=4, help="the run whose statistics predict the others")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, each in its own folder (default 0)")
    studies.add_recipe_arguments(parser, "advice_check")
    args = parser.parse_args(argv)
    args.scales = sorted({int(s) for s in (args.scales or ("2,4,8" if args.quick else "2,4,8,16,32")).split(",")}
                         | {args.from_scale})
    args.seeds = sorted({int(s) for s in args.seeds.split(",")})
    return args


def experiment_name(seed):
    """Seed 0 keeps the folder name earlier versions wrote, so its finished runs are kept."""
    return "advice_check" if seed == 0 else f"advice_check_seed{seed}"


def study_runs(args, seed):
    from keras_adascale.experiments import config

    name = experiment_name(seed)
    overrides = ["strategy.name=default", "strategy.devices=1", "runs=null", f"name={name}", f"seed={seed}"]
    if args.quick:
        overrides += studies.QUICK_OVERRIDES + ["evaluations=2"]
    raw = config.apply_overrides(config.load_raw(args.config), overrides + args.set)
    raw["runs"] = [{"name": f"adascale_s{scale}", "optimizer": {"name": "adascale", "scale": scale}}
                   for scale in args.scales]
    return config.resolve(raw, name=name)


def plot(path, rows, from_scale):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), layout="constrained")
    axis = figure.subplots()
    scales = [row["scale"] for row in rows]
    axis.plot(scales, [row["actual_updates"] for row in rows], "ko-", label="actual AdaScale runs")
    axis.plot(scales, [row["predicted_updates"] for row in rows], "s--", color="tab:blue",
              label=f"predicted from the S = {from_scale} run")
    axis.plot(scales, [rows[0]["total_steps"] / s for s in scales], ":", color="grey", label="T_SI / S")
    axis.set(xscale="log", yscale="log", xlabel="scale S", ylabel="updates to reach T_SI", xticks=scales)
    axis.set_xticklabels([str(s) for s in scales])
    axis.legend(fontsize="small")
    axis.grid(alpha=0.3)
    figure.savefig(path, dpi=90)


def check_seed(args, seed, output_root):
    """Train (or keep) one seed's runs, replay the from-scale run through `advise`, print its table."""
    from keras_adascale.experiments import advice

    runs = study_runs(args, seed)
    finals = {final["scale"]: final for final in studies.train_all(runs, output_root, args.retrain)}
    experiment_dir = output_root / experiment_name(seed)
    prediction = advice.advise(experiment_dir / f"adascale_s{args.from_scale}", args.scales)
    predicted = {p.scale: p.updates for p in prediction.predictions}
    rows = []
    for scale in args.scales:
        actual = finals[scale]["updates"]
        rows.append({"seed": seed, "scale": scale, "predicted_updates": predicted[scale], "actual_updates": actual,
                     "error": predicted[scale] / actual - 1, "total_steps": runs[0]["total_steps"],
                     "actual_mean_gain": finals[scale]["mean_gain"],
                     "test_accuracy": finals[scale]["test_accuracy"]})
    print(f"\nseed {seed}: predicted from the S = {args.from_scale} run (B_simple = {prediction.noise_scale:.3g} "
          f"baseline batches) vs actual AdaScale runs:")
    print(f"{'S':>4} {'predicted':>10} {'actual':>8} {'error':>7} {'test acc':>9}")
    for row in rows:
        print(f"{row['scale']:>4} {row['predicted_updates']:>10} {row['actual_updates']:>8} "
              f"{100 * row['error']:>+6.1f}% {row['test_accuracy']:>9.4f}")
    plot(experiment_dir / "advice_check.png", rows, args.from_scale)
    print(f"plot: {experiment_dir / 'advice_check.png'}")
    return {"seed": seed, "noise_scale": prediction.noise_scale, "results": rows}


def across_seeds(per_seed, scales):
    """Each S's error over the seeds: mean, min and max (the spread one seed cannot show)."""
    summary = []
    for scale in scales:
        errors = [row["error"] for seed in per_seed for row in seed["results"] if row["scale"] == scale]
        summary.append({"scale": scale, "mean_error": sum(errors) / len(errors),
                        "min_error": min(errors), "max_error": max(errors), "seeds": len(errors)})
    return summary


def main(argv=None):
    args = parse_args(argv)
    output_root = pathlib.Path(args.output_dir)
    start = time.perf_counter()
    per_seed = [check_seed(args, seed, output_root) for seed in args.seeds]
    summary = across_seeds(per_seed, args.scales)
    if len(per_seed) > 1:
        print(f"\nerror over seeds {', '.join(str(seed) for seed in args.seeds)}:")
        print(f"{'S':>4} {'mean':>7} {'min':>7} {'max':>7}")
        for row in summary:
            print(f"{row['scale']:>4} {100 * row['mean_error']:>+6.1f}% {100 * row['min_error']:>+6.1f}% "
                  f"{100 * row['max_error']:>+6.1f}%")
    print(json.dumps({
        "command": " ".join(["python", "benchmarks/advice_check.py"] + (sys.argv[1:] if argv is None else argv)),
        "from_scale": args.from_scale, "seconds": time.perf_counter() - start,
        "noise_scale": per_seed[0]["noise_scale"], "results": per_seed[0]["results"],
        "seeds": per_seed, "across_seeds": summary,
    }))


if __name__ == "__main__":
    main()
