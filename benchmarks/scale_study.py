"""The paper's scale study in small: AdaScale vs the linear scaling rule (with and without warm-up).

One single-batch recipe (saved_configs/demo.yaml: real MNIST, small CNN, B = 32, step decay,
T_SI = 2,400) trained at S = 1 with plain SGD (the baseline), then at each S with AdaScale
(schedule keyed on tau, stopping at tau = T), LSR (lr x S, schedule compressed to T / S)
and LSR with gradual warm-up, over several seeds. The S gradient samples are micro-batches
(gradient accumulation) on one device; the tests show this equals S replicas.

    python benchmarks/scale_study.py                 # S = 2..32, 3 seeds (about an hour on 2 CPU cores)
    python benchmarks/scale_study.py --quick         # a few minutes: small MLP, short schedule, 1 seed

`--family adam` runs the same study for AdaScaleAdam (raw and preconditioned statistics) against
Adam with Malladi et al.'s square-root rule at kappa = S, the linear rule and no change, each over
T / S updates, from an Adam recipe (default saved_configs/mnist_adam.yaml); its runs go to
OUTPUT_DIR/adam_scale_study.

Writes its runs and plots under --output-dir (default runs/scale_study) and prints a table;
the last line printed is a JSON summary. A run already finished there from the same config is
kept and an interrupted one resumes, so a stopped study, or one given more scales or seeds,
trains only what it lacks (`--retrain` trains every run again). `--report` trains nothing: it
prints the table and draws the plots from the runs already finished, so a study still under way
(or stopped) can be read; each row says how many seeds it holds.
"""

import argparse
import json
import pathlib
import re
import statistics
import sys
import time

import studies

# Per family: the S = 1 baseline's optimizer, then each compared method's optimizer keys by label.
# The first method is the AdaScale one whose gain is plotted.
FAMILIES = {
    "sgd": ("sgd", {
        "adascale": {"name": "adascale"},
        "lsr": {"name": "lsr"},
        "lsr_warmup": {"name": "lsr_warmup"},
    }),
    "adam": ("adam", {
        "adascale_adam": {"name": "adascale_adam", "statistics": "raw"},
        "adascale_adam_pre": {"name": "adascale_adam", "statistics": "preconditioned"},
        "adam_sqrt": {"name": "adam_sqrt"},
        "adam_linear": {"name": "adam_linear"},
        "adam_fixed": {"name": "adam_fixed"},
    }),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model, short schedule, one seed")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sgd",
                        help="sgd: AdaScaleSGD vs LSR (with and without warm-up); adam: AdaScaleAdam (raw and "
                             "preconditioned statistics) vs Adam's square-root, linear and unchanged rules")
    parser.add_argument("--scales", default=None, help="comma-separated S values (default 2,4,8,16,32; quick 2,8)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 3; quick 1)")
    parser.add_argument("--total-steps", type=int, default=None, help="T_SI (default: the config's; quick 300)")
    studies.add_recipe_arguments(parser, "scale_study")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: the table and plots from the runs already finished under OUTPUT_DIR")
    args = parser.parse_args(argv)
    if args.report and args.retrain:
        parser.error("--report trains nothing, so it cannot be given with --retrain")
    args.scales = [int(s) for s in (args.scales or ("2,8" if args.quick else "2,4,8,16,32")).split(",")]
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.baseline, args.methods = FAMILIES[args.family]
    args.experiment = "scale_study" if args.family == "sgd" else f"{args.family}_scale_study"
    if args.family == "adam" and args.config == parser.get_default("config"):
        args.config = str(studies.REPO / "saved_configs" / "mnist_adam.yaml")
    return args


def study_runs(args):
    """The resolved runs: the S = 1 baseline and every (method, S), for every seed."""
    from keras_adascale.experiments import config

    overrides = ["strategy.name=default", "strategy.devices=1", "runs=null", f"name={args.experiment}"]
    if args.quick:
        overrides += studies.QUICK_OVERRIDES + ["evaluations=3"]
    if args.total_steps:
        overrides.append(f"total_steps={args.total_steps}")
    raw = config.apply_overrides(config.load_raw(args.config), overrides + args.set)
    variants = []
    for seed in range(args.seeds):
        variants.append({"name": f"baseline_s1_seed{seed}", "seed": seed,
                         "optimizer": {"name": args.baseline, "scale": 1}})
        for scale in args.scales:
            for method, optimizer in args.methods.items():
                variants.append({"name": f"{method}_s{scale}_seed{seed}", "seed": seed,
                                 "optimizer": {**optimizer, "scale": scale}})
    raw["runs"] = variants
    return config.resolve(raw, name=args.experiment)


def aggregate(finals):
    """(method, S) -> mean and spread over seeds."""
    groups = {}
    for final in finals:  # runs are named <method>_s<S>_seed<k>, the baseline baseline_s1_seed<k>
        method = re.fullmatch(r"(.+)_s[0-9]+_seed[0-9]+", final["run"]).group(1)
        groups.setdefault((method, final["scale"]), []).append(final)
    rows = []
    for (method, scale), group in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        accuracies = [final["test_accuracy"] for final in group]
        bits = [final["test_bits_per_character"] for final in group if "test_bits_per_character" in final]
        rows.append({
            "method": method,
            "scale": scale,
            "seeds": len(group),
            "test_accuracy_mean": statistics.mean(accuracies),
            "test_accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            **({"test_bits_per_character_mean": statistics.mean(bits),
                "test_bits_per_character_std": statistics.stdev(bits) if len(bits) > 1 else 0.0} if bits else {}),
            "train_loss_mean": statistics.mean(final["final_train_loss"] for final in group),
            "updates_mean": statistics.mean(final["updates"] for final in group),
            "wall_time_mean": statistics.mean(final["wall_time"] for final in group),
            "mean_gain": statistics.mean(final["mean_gain"] for final in group),
        })
    return rows


def print_table(rows):
    print(f"{'method':>10} {'S':>3} {'seeds':>5} {'test acc (mean +- std)':>22} {'train loss':>10} "
          f"{'updates':>8} {'wall s':>7} {'mean gain':>9}")
    for row in rows:
        print(f"{row['method']:>10} {row['scale']:>3} {row['seeds']:>5} "
              f"{row['test_accuracy_mean']:>14.4f} +- {row['test_accuracy_std']:.4f} "
              + (f"bits/char {row['test_bits_per_character_mean']:.4f} +- {row['test_bits_per_character_std']:.4f} "
                 if "test_bits_per_character_mean" in row else "") +
              f"{row['train_loss_mean']:>10.4f} {row['updates_mean']:>8.0f} {row['wall_time_mean']:>7.1f} "
              f"{row['mean_gain']:>9.3f}")


def plot(experiment_dir, scales, rows, methods, finished):
    """scale_study.png: the test metric vs updates per S (seed 0), its final value vs S, and AdaScale's gain.

    The metric is bits per character where the runs record it (a language model), else test accuracy.
    Only the runs in `finished` (the names `train_all` returned) are drawn, so a `--report`
    on a study under way leaves out the same runs from the curves as from the table.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    from keras_adascale.experiments.rundirs import read_jsonl

    metric = "test_bits_per_character" if "test_bits_per_character_mean" in rows[0] else "test_accuracy"
    label = metric.replace("_", " ")
    columns = len(scales)
    figure, axes = plt.subplots(3, columns, figsize=(3.6 * columns, 9.5), constrained_layout=True, squeeze=False)
    def seed0(method, scale, records):
        """The seed-0 run's records, or [] where that run is not finished."""
        run = f"{method}_s{scale}_seed0"
        return read_jsonl(experiment_dir / run / records) if run in finished else []

    baseline = seed0("baseline", 1, "evaluations.jsonl")
    for column, scale in enumerate(scales):
        axis = axes[0, column]
        axis.plot([row["update"] for row in baseline], [row[metric] for row in baseline], "k.-",
                  label="baseline S=1")
        for method in methods:
            evaluations = seed0(method, scale, "evaluations.jsonl")
            axis.plot([row["update"] for row in evaluations], [row[metric] for row in evaluations],
                      "o-", label=method)
        axis.set(title=f"S = {scale}", xlabel="updates", ylabel=label, xscale="log")
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.legend(fontsize="small")
        metrics = seed0(methods[0], scale, "metrics.jsonl")
        axes[1, column].plot([row["update"] for row in metrics], [row["gain"] for row in metrics], label="gain")
        axes[1, column].set(xlabel="updates", ylabel="AdaScale gain r_t", ylim=(1, scale))
        for method in methods:
            metrics = seed0(method, scale, "metrics.jsonl")
            axes[2, column].plot([row["update"] for row in metrics], [row["learning_rate"] for row in metrics],
                                 label=method)
        axes[2, column].set(xlabel="updates", ylabel="learning rate", yscale="log")
        axes[2, column].legend(fontsize="small")
    for axis in axes.flat:
        axis.grid(alpha=0.3)
    figure.savefig(experiment_dir / "scale_study.png", dpi=80)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for base in (row for row in rows if row["method"] == "baseline"):
        axis.axhspan(base[f"{metric}_mean"] - base[f"{metric}_std"],
                     base[f"{metric}_mean"] + base[f"{metric}_std"], color="k", alpha=0.15)
        axis.axhline(base[f"{metric}_mean"], color="k", label="baseline S=1 (mean +- std)")
    for method in methods:
        mine = [row for row in rows if row["method"] == method]
        axis.errorbar([row["scale"] for row in mine], [row[f"{metric}_mean"] for row in mine],
                      yerr=[row[f"{metric}_std"] for row in mine], fmt="o-", capsize=3, label=method)
    axis.set(xscale="log", xlabel="scale S", ylabel=f"final {label}", xticks=scales)
    axis.set_xticklabels([str(scale) for scale in scales])
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.legend(fontsize="small")
    axis.grid(alpha=0.3)
    figure.savefig(experiment_dir / "accuracy_vs_scale.png", dpi=80)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    runs = study_runs(args)
    output_root = pathlib.Path(args.output_dir)
    start = time.perf_counter()
    finals = studies.finished_or_exit("scale_study.py", args, runs)
    rows = aggregate(finals)
    print()
    print_table(rows)
    experiment_dir = output_root / args.experiment
    plot(experiment_dir, args.scales, rows, list(args.methods), {final["run"] for final in finals})
    print(f"\nplots: {experiment_dir / 'scale_study.png'}, {experiment_dir / 'accuracy_vs_scale.png'}")
    summary = {
        "command": " ".join(["python", "benchmarks/scale_study.py"] + (sys.argv[1:] if argv is None else argv)),
        "total_steps": runs[0]["total_steps"],
        "batch_size": runs[0]["dataset"]["batch_size"],
        "model": runs[0]["model"]["name"],
        "dataset": runs[0]["dataset"]["name"],
        "family": args.family,
        "seconds": time.perf_counter() - start,
        "results": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
