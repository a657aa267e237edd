"""What the studies in benchmarks/ share: the demo recipe's quick overrides, and training a list of runs."""

import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent

# --quick: a small MLP on slices of MNIST with a short schedule (a smoke run, not a result).
QUICK_OVERRIDES = ["total_steps=300", "model.name=mlp", "model.hidden_units=[128]",
                   "dataset.train_split=train[:20%]", "dataset.test_split=test[:30%]"]


def add_recipe_arguments(parser, study):
    """--config, --set and --output-dir: the recipe a study trains, and where its runs go."""
    parser.add_argument("--config", default=str(REPO / "saved_configs" / "demo.yaml"),
                        help="the single-batch recipe (default saved_configs/demo.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the recipe, as in keras-adascale train")
    parser.add_argument("--output-dir", default="runs", help=f"run folders go to OUTPUT_DIR/{study}")
    parser.add_argument("--retrain", action="store_true",
                        help="train every run again (by default a run finished from the same config is kept)")


def train_all(runs, output_dir, retrain=False, report=False):
    """Trains every resolved run and returns their `final.json` contents.

    A run already finished under `output_dir` from the same config is kept
    (unless `retrain`), and an interrupted one resumes, so a study that was
    stopped, or is extended with more scales or seeds, trains only what it lacks.
    With `report`, nothing is trained: only the finished runs are returned, and
    the others are named as left out.
    """
    import tensorflow_datasets as tfds

    from keras_adascale.experiments import training

    tfds.disable_progress_bar()
    finals = []
    for index, run in enumerate(runs):
        run_dir = None if retrain else training.finished_run(run, pathlib.Path(output_dir))
        if run_dir:
            print(f"[{index + 1}/{len(runs)}] {run['run']}: finished earlier from the same config, kept", flush=True)
        elif report:
            print(f"[{index + 1}/{len(runs)}] {run['run']}: not finished from this config, left out", flush=True)
            continue
        else:
            print(f"[{index + 1}/{len(runs)}] {run['run']}", flush=True)
            run_dir = training.train(run, pathlib.Path(output_dir), overwrite=True)
        finals.append(json.loads((run_dir / "final.json").read_text()))
    return finals


def finished_or_exit(script, args, runs):
    """`train_all` over a study's runs (or `--report` on them); exits naming the folder when none is finished."""
    finals = train_all(runs, pathlib.Path(args.output_dir), args.retrain, report=args.report)
    if not finals:
        sys.exit(f"{script}: no run of this study is finished under {pathlib.Path(args.output_dir) / args.experiment}")
    return finals
