"""The demo's AdaScale run on JAX (keras.distribution.DataParallel) against the same run on TensorFlow.

saved_configs/demo_jax.yaml's `adascale` run (4 devices under DataParallel, AdaScaleModel + AdaScaleSGD at
S = 4) and saved_configs/demo.yaml's (4 replicas under MirroredStrategy), over the same seeds: test
accuracy against the demo's band and updates against TensorFlow's. Each backend trains in a process of its
own (KERAS_BACKEND is read at Keras's first import), so the environment needs TensorFlow, tensorflow-datasets
and JAX (`make .venv-jax/.test`):

    .venv-jax/bin/python benchmarks/jax_runner_study.py            # 3 seeds (about 15 minutes on 2 CPU cores)
    .venv-jax/bin/python benchmarks/jax_runner_study.py --quick    # a small MLP on slices of MNIST, 1 seed

Writes its runs under OUTPUT_DIR/jax_runner_study_<backend> (default runs/); a run already finished there
from the same config is kept, so a stopped study trains only what it lacks (`--retrain`: all again;
`--report`: nothing, the table from what is finished). The last line printed is a JSON summary.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

import studies

CONFIGS = {"tensorflow": "demo.yaml", "jax": "demo_jax.yaml"}
# The demo's band: test accuracy of its S = 4 AdaScale run over 3 seeds on TensorFlow (docs/benchmarks.md, 2 and 6).
BAND = (0.987, 0.990)
UPDATES_WITHIN = 0.05


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small MLP on slices of MNIST, short schedule, one seed")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per backend (default 3; quick 1)")
    parser.add_argument("--output-dir", default="runs", help="run folders go to OUTPUT_DIR/jax_runner_study_<backend>")
    parser.add_argument("--retrain", action="store_true", help="train every run again")
    parser.add_argument("--report", action="store_true", help="train nothing: the table from the finished runs")
    parser.add_argument("--backend", choices=sorted(CONFIGS), help=argparse.SUPPRESS)  # a worker process
    args = parser.parse_args(argv)
    if args.report and args.retrain:
        parser.error("--report trains nothing, so it cannot be given with --retrain")
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.experiment = "jax_runner_study"
    return args


def study_runs(args, backend):
    """The `adascale` run of the backend's demo config, once per seed (named `adascale_seed<k>`)."""
    from keras_adascale.experiments import config

    overrides = studies.QUICK_OVERRIDES if args.quick else []
    (run,) = [run for run in config.load(studies.REPO / "saved_configs" / CONFIGS[backend], overrides)
              if run["run"] == "adascale"]
    runs = []
    for seed in range(args.seeds):
        runs.append({**json.loads(json.dumps(run)), "name": f"{args.experiment}_{backend}", "seed": seed,
                     "run": f"adascale_seed{seed}"})
    return runs


def train_backend(args):
    """In a worker process: trains (or, with --report, finds) this backend's runs and prints their finals."""
    from keras_adascale.experiments import strategies

    runs = study_runs(args, args.backend)
    strategies.check_backend(runs)
    strategies.configure_devices(runs)
    finals = studies.train_all(runs, pathlib.Path(args.output_dir), args.retrain, report=args.report)
    print("FINALS " + json.dumps(finals), flush=True)


def _finals_of(args, backend):
    command = [sys.executable, __file__, "--backend", backend, "--seeds", str(args.seeds),
               "--output-dir", args.output_dir] + [flag for flag, on in (("--quick", args.quick),
                                                                     ("--retrain", args.retrain),
                                                                     ("--report", args.report)) if on]
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    print(f"== {backend}: {CONFIGS[backend]}", flush=True)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    finals = None
    for line in process.stdout:
        if line.startswith("FINALS "):
            finals = json.loads(line[len("FINALS "):])
        else:
            print(line, end="", flush=True)
    if process.wait() != 0 or finals is None:
        sys.exit(f"jax_runner_study.py: the {backend} runs failed (exit code {process.returncode})")
    return {final["run"]: final for final in finals}


def _mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None):
    args = parse_args(argv)
    if args.backend:
        train_backend(args)
        return
    by_backend = {backend: _finals_of(args, backend) for backend in ("tensorflow", "jax")}
    seeds = [f"adascale_seed{seed}" for seed in range(args.seeds)
             if all(f"adascale_seed{seed}" in finals for finals in by_backend.values())]
    if not seeds:
        sys.exit("jax_runner_study.py: no seed is finished on both backends")
    print("\n| seed | TF updates | JAX updates | JAX / TF - 1 | TF test acc | JAX test acc | TF wall s | JAX wall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for name in seeds:
        tf_run, jax_run = by_backend["tensorflow"][name], by_backend["jax"][name]
        difference = jax_run["updates"] / tf_run["updates"] - 1
        rows.append((tf_run, jax_run, difference))
        print(f"| {name.removeprefix('adascale_seed')} | {tf_run['updates']:,} | {jax_run['updates']:,} | "
              f"{100 * difference:+.1f}% | {tf_run['test_accuracy']:.4f} | {jax_run['test_accuracy']:.4f} | "
              f"{tf_run['wall_time']:.0f} | {jax_run['wall_time']:.0f} |")
    summary = {"seeds": len(rows), "quick": args.quick}
    for backend, index in (("tensorflow", 0), ("jax", 1)):
        accuracy = _mean_std([row[index]["test_accuracy"] for row in rows])
        updates = _mean_std([row[index]["updates"] for row in rows])
        summary[backend] = {"test_accuracy": accuracy, "updates": updates,
                            "replicas": rows[0][index]["replicas"], "samples": rows[0][index]["samples"]}
        print(f"{backend}: test accuracy {accuracy[0]:.4f} +- {accuracy[1]:.4f}, updates {updates[0]:,.0f} "
              f"+- {updates[1]:.0f} ({rows[0][index]['replicas']} replicas, N = {rows[0][index]['samples']})")
    summary["mean_updates_difference"] = summary["jax"]["updates"][0] / summary["tensorflow"]["updates"][0] - 1
    summary["jax_in_band"] = all(BAND[0] <= row[1]["test_accuracy"] <= BAND[1] for row in rows)
    summary["updates_within_5_percent"] = abs(summary["mean_updates_difference"]) <= UPDATES_WITHIN
    if not args.quick:
        print(f"JAX in the demo's band {BAND[0]}-{BAND[1]} on every seed: {summary['jax_in_band']}; mean updates "
              f"{100 * summary['mean_updates_difference']:+.1f}% against TensorFlow (goal within "
              f"{100 * UPDATES_WITHIN:.0f}%): {summary['updates_within_5_percent']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
