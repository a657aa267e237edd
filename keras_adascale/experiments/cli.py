"""Command line: `keras-adascale train CONFIG`, `compare RUN_DIR...`, `advise RUN_DIR` and `launch -n P COMMAND...`."""

import argparse
import json
import pathlib
import sys

import keras_adascale
from keras_adascale.experiments import config as config_lib
from keras_adascale.experiments import rundirs

_DESCRIPTION = """\
Train and compare AdaScale SGD runs (Johnson et al., ICML 2020).

  keras-adascale train saved_configs/demo.yaml
  keras-adascale train saved_configs/demo.yaml --set total_steps=500 --only adascale
  keras-adascale compare runs/demo/adascale runs/demo/lsr
  keras-adascale advise runs/demo/adascale
  KERAS_BACKEND=jax keras-adascale launch --processes 2 train saved_configs/demo_jax.yaml
"""

# What `train` says where Keras runs on another backend.
RUNNER_BACKENDS = ("the experiment runner trains on Keras's TensorFlow backend (tf.distribute) or its JAX backend "
                   "(keras.distribution), with tf.data input pipelines")

_COLUMNS = (
    ("run", "{}"), ("optimizer", "{}"), ("S", "{}"), ("replicas x accum", "{}"), ("updates", "{}"),
    ("tau", "{:.0f}"), ("mean gain", "{:.3f}"), ("train loss", "{:.4f}"), ("test acc", "{:.4f}"),
    ("wall s", "{:.1f}"),
)


def _scale_cell(final):
    # An auto-scale run's S changed: the range it used and its mean over updates.
    if final.get("scale_setting") == "auto":
        return f"auto {final['min_scale_used']:g}-{final['max_scale_used']:g}, mean {final['scale']:.1f}"
    return final["scale"]


def _samples_cell(final):
    # replicas x accumulation steps, and the groups of each replica's batch where there are several.
    groups = final.get("groups", 1)
    return f"{final['replicas']} x {final['accumulation']}" + (f" ({groups} groups)" if groups > 1 else "")


def comparison_table(finals):
    """The side-by-side table of finished runs, as text.

    A `test bpc` column (test bits per character) comes after `test acc`
    when a run is a language model's.

    Args:
        finals: the runs' `final.json` contents.
    """
    columns = list(_COLUMNS)
    bits = any("test_bits_per_character" in final for final in finals)
    if bits:
        columns.insert(-1, ("test bpc", "{:.4f}"))
    rows = [
        [
            final["run"], final["optimizer"], _scale_cell(final), _samples_cell(final),
            final["updates"], final["tau"], final["mean_gain"], final["final_train_loss"],
            final["test_accuracy"], *([final.get("test_bits_per_character", float("nan"))] if bits else []),
            final["wall_time"],
        ]
        for final in finals
    ]
    cells = [[name for name, _ in columns]] + [
        [template.format(value) for (_, template), value in zip(columns, row)] for row in rows
    ]
    widths = [max(len(row[index]) for row in cells) for index in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def compare(run_dirs, output):
    """Prints the table of finished runs and writes their comparison plot.

    Args:
        run_dirs: finished run folders (each with `final.json`).
        output: the PNG to write.
    """
    from keras_adascale.experiments import plots

    finals = []
    for run_dir in run_dirs:
        final_path = run_dir / "final.json"
        if not final_path.is_file():
            state = "an unfinished run" if run_dir.name.endswith(".incomplete") else "not a finished run folder"
            raise config_lib.ConfigError(f"{run_dir}: {state} (no final.json)")
        finals.append(json.loads(final_path.read_text()))
    print(comparison_table(finals))
    plots.plot_comparison(run_dirs, output)
    print(f"\nplot: {output}")


def _train(args):
    runs = config_lib.load(args.config, args.set)
    names = [run["run"] for run in runs]
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise config_lib.ConfigError(f"--only: no run named {', '.join(unknown)}; runs: {', '.join(names)}")
        runs = [run for run in runs if run["run"] in args.only]
    try:
        keras_adascale._require_backend(("tensorflow", "jax"), RUNNER_BACKENDS)
    except ImportError as error:
        raise config_lib.ConfigError(str(error)) from error
    import tensorflow_datasets as tfds

    from keras_adascale.experiments import data, strategies, training  # imports TensorFlow (tf.data on JAX too)

    strategies.check_backend(runs)
    tfds.disable_progress_bar()  # its nested bars garble logs; the runner reports progress itself
    strategies.configure_devices(runs)
    data.check([run["dataset"] for run in runs])
    training.check_test_splits(runs)
    output_root = pathlib.Path(args.output_dir)
    run_dirs = []
    for index, run in enumerate(runs):
        print(f"[{index + 1}/{len(runs)}] {run['name']}/{run['run']}: {run['optimizer']['name']} at "
              f"S={run['optimizer']['scale']} on {run['strategy']['name']}", flush=True)
        run_dirs.append(training.train(run, output_root, overwrite=args.overwrite))
    if any(run_dir.name != run["run"] for run_dir, run in zip(run_dirs, runs)):
        return  # a non-chief worker of a multi-worker job: the chief prints and plots the comparison
    print()
    # Every finished run of the experiment, not only this invocation's (`--only`, earlier commands).
    experiment_dir = output_root / runs[0]["name"]
    compare(rundirs.finished_runs(experiment_dir, first=names), experiment_dir / "comparison.png")


def _launch(args):
    import keras

    from keras_adascale import launch as launch_lib

    if keras.backend.backend() != "jax":
        raise config_lib.ConfigError(
            f"launch starts a job of several JAX processes (keras.distribution), but Keras runs on its "
            f"{keras.backend.backend()!r} backend: set KERAS_BACKEND=jax (on TensorFlow, strategy.name=multi_worker "
            "runs several workers)")
    if args.processes < 1:
        raise config_lib.ConfigError(f"launch --processes must be at least 1, not {args.processes}")
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise config_lib.ConfigError("launch: give the command every process runs, e.g. "
                                     "keras-adascale launch --processes 2 train saved_configs/demo_jax.yaml")
    print(f"launch: {args.processes} processes of `keras-adascale {' '.join(command)}` on 127.0.0.1 "
          f"(process 0's output below; every process's last lines if one fails)", flush=True)
    results = launch_lib.launch([sys.executable, "-m", "keras_adascale", *command], args.processes,
                                timeout=args.timeout, cpu_devices=args.cpu_devices, echo={0}, check=False)
    if all(result.ok for result in results):
        return 0
    print(f"keras-adascale: error: {launch_lib.failure_message(results)}", file=sys.stderr)
    return next(result.returncode for result in results if not result.ok) % 256 or 1


def _compare(args):
    run_dirs = [pathlib.Path(path) for path in args.run_dirs]
    output = pathlib.Path(args.output) if args.output else run_dirs[0].parent / "comparison.png"
    compare(run_dirs, output)


def _parse_step_time(text):
    scale, separator, seconds = text.partition("=")
    try:
        if not separator:
            raise ValueError
        scale, seconds = float(scale), float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected S=SECONDS, e.g. 8=0.12; got {text!r}") from None
    if not (scale >= 1 and seconds > 0):
        raise argparse.ArgumentTypeError(f"S must be >= 1 and SECONDS > 0; got {text!r}")
    return scale, seconds


def _parse_scales(text):
    try:
        scales = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, e.g. 1,2,4; got {text!r}") from None
    if not scales or any(not 1 <= scale < float("inf") for scale in scales):
        raise argparse.ArgumentTypeError(f"every scale must be a number >= 1; got {text!r}")
    return scales


def _advise(args):
    from keras_adascale.experiments import advice as advice_lib

    run_dir = pathlib.Path(args.run_dir)
    advice = advice_lib.advise(run_dir, args.scales, dict(args.step_time))
    print(advice_lib.table(advice))
    output = pathlib.Path(args.output) if args.output else run_dir / "advice.png"
    advice_lib.plot(advice, output)
    print(f"\nplot: {output}")


def parser():
    """The argument parser (its `--help` lists every config key)."""
    top = argparse.ArgumentParser(
        prog="keras-adascale", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = top.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train every run of a config, then print their comparison",
        description="Train every run of a YAML or JSON config. Each run is written to "
        "OUTPUT_DIR/<name>/<run>/: config.json, metrics.jsonl (one line per update), "
        "evaluations.jsonl, final.json, model.keras, curves.png, gain_lr.png. A run is written "
        "under <run>.incomplete and renamed when done; training the same config again resumes it.",
        epilog="config keys (key = default: meaning):\n" + config_lib.describe()
        + "\n\nA config may hold 'runs': a list of {name: ..., <section>: {<key>: <value>}} overriding "
        "the top-level keys per run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", help="a YAML or JSON file, e.g. saved_configs/demo.yaml")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key (value parsed as YAML), e.g. --set optimizer.scale=8 or "
        "--set runs.lsr.optimizer.scale=8 for one run; repeatable",
    )
    train.add_argument("--only", type=lambda text: text.split(","), default=None, metavar="RUN[,RUN...]",
                       help="train only these runs of the config")
    train.add_argument("--output-dir", default="runs", help="where run folders go (default: runs)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace finished runs of the same name and discard interrupted ones")
    train.set_defaults(handler=_train)
    comparison = commands.add_parser("compare", help="a table and a plot of finished runs side by side")
    comparison.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run folders")
    comparison.add_argument("--output", help="PNG to write (default: comparison.png beside the first run)")
    comparison.set_defaults(handler=_compare)
    advise = commands.add_parser(
        "advise",
        help="which S pays: a finished AdaScale run's statistics replayed at other scales",
        description="Replays a finished AdaScale run's recorded gradient statistics in scale-invariant "
        "time: a run at S' needs U(S') = integral over tau from 0 to T_SI of d tau / r(S', sigma2(tau), "
        "mu2(tau)) updates. Prints, for each S', the predicted updates, examples, scaling efficiency "
        "(T_SI / U / S') and wall time, names the critical scale (the first below 50% efficiency), "
        "recommends an S and says why, and writes advice.png into the run folder. The default list of "
        "scales stops at the first below 10% efficiency. Without --step-time the wall times assume the "
        "run's own time per update at every S; rows far above the run's S are conservative.",
    )
    advise.add_argument("run_dir", metavar="RUN_DIR", help="a finished AdaScale run folder, e.g. runs/demo/adascale")
    advise.add_argument("--scales", type=_parse_scales, default=None, metavar="S[,S...]",
                        help="scales to predict (default 1,2,4,...,1024, stopped below 10%% efficiency; the run's own S "
                        "and every --step-time S are always added)")
    advise.add_argument("--step-time", type=_parse_step_time, action="append", default=[], metavar="S=SECONDS",
                        help="seconds per update measured at S (repeatable); other scales assume ideal "
                        "scaling: the run's own time per update")
    advise.add_argument("--output", help="PNG to write (default: RUN_DIR/advice.png)")
    advise.set_defaults(handler=_advise)
    launch = commands.add_parser(
        "launch",
        help="run a command (train ...) as a job of several JAX processes on this machine",
        description="Runs `keras-adascale COMMAND...` as P processes of one JAX job on 127.0.0.1: the topology of "
        "a multi-host job (a TPU pod slice, a GPU cluster) on one machine, with Keras's distribution variables "
        "(KERAS_DISTRIBUTION_JOB_ADDRESSES, _NUM_PROCESSES, _PROCESS_ID), each process under `timeout -k`. A "
        "data_parallel run's strategy.devices counts the devices of every process (on a CPU, each process gets "
        "strategy.devices / P host devices); each process reads its part of every global batch; process 0 writes "
        "the run folders (the others <run>.process<i>). If one process fails, the others fail within seconds "
        "and launch exits non-zero with every process's last lines. On several hosts, start `keras-adascale "
        "train` on each with those three variables set instead. KERAS_BACKEND=jax.",
        epilog="example: KERAS_BACKEND=jax keras-adascale launch --processes 2 train saved_configs/demo_jax.yaml",
    )
    launch.add_argument("--processes", "-n", type=int, required=True, metavar="P", help="processes of the job (>= 1)")
    launch.add_argument("--timeout", type=float, default=86400.0, metavar="SECONDS",
                        help="seconds each process may run before it is ended (default: 86400, a day)")
    launch.add_argument("--cpu-devices", type=int, default=None, metavar="D",
                        help="run every process on D host CPU devices (JAX_PLATFORMS=cpu), whatever accelerators "
                        "there are (default: the devices the command asks for)")
    launch.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND",
                        help="the keras-adascale command every process runs, e.g. train CONFIG --set ...")
    launch.set_defaults(handler=_launch)
    return top


def main(argv=None):
    """Entry point of the `keras-adascale` console script."""
    args = parser().parse_args(argv)
    try:
        code = args.handler(args)
    except (config_lib.ConfigError, FileNotFoundError) as error:
        print(f"keras-adascale: error: {error}", file=sys.stderr)
        return 2
    return code or 0
