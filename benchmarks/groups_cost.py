"""The cost of `AdaScaleModel(groups=n)` on one device (JAX): n gradient samples from one batch, against Keras's step.

    .venv-backends/bin/python benchmarks/groups_cost.py            # the 5.8M MLP and the small CNN, ~7 min
    .venv-backends/bin/python benchmarks/groups_cost.py --quick    # a smoke run (a tiny CNN, few steps)

It sets KERAS_BACKEND (`--backend`, jax by default) and, on JAX, one host CPU device (XLA_FLAGS) itself, before
Keras starts. On the same global batch
(`--batch`, 256 rows) and the same initial weights, SGD momentum 0.9 in each, five ways to an update:
- `keras`: `keras.Model` and `keras.optimizers.SGD` on the batch: Keras's own step (the baseline);
- `adascale_sgd`: `keras.Model` and `AdaScaleSGD` on the batch: one sample (gain 1), no groups: what the
  optimizer itself costs over Keras's SGD, for the rows below to be read against;
- `one_pass`: `AdaScaleModel(groups=n)` and `AdaScaleSGD`: the groups' squared norms inside the one backward
  pass (`keras_adascale.backend.jax.group_norms`);
- `vmap`: the same with `group_norms="vmap"`: each group's gradient in a `jax.vmap`;
- `accumulation`: `keras.Model` and `AdaScaleSGD(gradient_accumulation_steps=n)`, fed batches of batch / n
  rows: n micro-batches per update, the accumulation way to the same N = n samples.
Models: `mlp_5m` (784-2048-2048-10, 5.8M parameters) and `small_cnn` (Conv32-Pool-Conv64-Pool-Dense64-Dense10,
0.1M), the runner's; `resnet20` (the runner's ResNet-20 on 32 x 32 x 3 images: 3 x 3 convolutions with
BatchNormalization and residual additions, 0.27M; by --models only, several seconds a step on 2 CPU cores);
`cnn_tiny` (Conv4-Pool-Dense10: both one-pass rules) for --quick, and `mlp_small` (784-128-10).

Timing: after a warm-up window of each (the traces), rounds of the five in a rotating order (each in every place
equally often over five rounds), every window `--steps` updates in `model.fit`, timed from one batch end to the
next; per update, the median over the rounds, and each step's window over Keras's window of the same round:
their median and quartiles. Memory: JAX reports no memory statistics for host CPU devices
(`Device.memory_stats()` is None, recorded in the JSON), so no peak; instead XLA's memory analysis of each
compiled train step (`jax.jit(model.train_step).lower(...).compile().memory_analysis()`): `temp` (the step's
own buffers) and `args` (its inputs: variables, optimizer state, the batch); for `accumulation`, the step of
one micro-batch.

On TensorFlow and PyTorch (`--backend tensorflow|torch`), where `groups` is JAX's only for now, the three ways
there are (`keras`, `adascale_sgd`, `accumulation`): what a one-device user of those backends pays for the same
statistics today. No memory column there (no XLA analysis of a step on those backends).

    .venv/bin/python benchmarks/groups_cost.py --backend tensorflow
    .venv-backends/bin/python benchmarks/groups_cost.py --backend torch

Writes OUTPUT_DIR/groups_cost.json (groups_cost_<backend>.json off JAX); the last line printed is the same JSON.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import time
import warnings
from importlib import metadata

import timing

VARIANTS = ("keras", "adascale_sgd", "one_pass", "vmap", "accumulation")
# Each model's input (one example).
INPUT_SHAPES = {"mlp_5m": (28, 28, 1), "small_cnn": (28, 28, 1), "resnet20": (32, 32, 3), "mlp_small": (28, 28, 1),
                "cnn_tiny": (28, 28, 1)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny CNN, n = 4, few steps (smoke test)")
    parser.add_argument("--models", default=None, help="comma-separated: mlp_5m, small_cnn, resnet20, mlp_small, "
                        "cnn_tiny (default mlp_5m,small_cnn; quick cnn_tiny)")
    parser.add_argument("--groups", default=None, help="comma-separated n, the groups of a batch (default 4,8; "
                        "quick 4)")
    parser.add_argument("--batch", type=int, default=None, help="rows per update (default 256; quick 32)")
    parser.add_argument("--windows", type=int, default=None, help="rounds of the five (default 10; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="updates per window (default 4; quick 2)")
    parser.add_argument("--output-dir", default="runs", help="the JSON goes to OUTPUT_DIR/groups_cost.json")
    parser.add_argument("--backend", choices=("jax", "tensorflow", "torch"), default="jax",
                        help="Keras's backend (default jax); off JAX the steps without groups only")
    args = parser.parse_args(argv)
    if os.environ.get("KERAS_BACKEND", args.backend) != args.backend:
        parser.error(f"--backend {args.backend} with KERAS_BACKEND={os.environ['KERAS_BACKEND']}: give one")
    args.models = (args.models or ("cnn_tiny" if args.quick else "mlp_5m,small_cnn")).split(",")
    unknown = [name for name in args.models if name not in INPUT_SHAPES]
    if unknown:
        parser.error(f"--models {unknown}: known models are {', '.join(INPUT_SHAPES)}")
    args.groups = [int(n) for n in (args.groups or ("4" if args.quick else "4,8")).split(",")]
    args.batch = args.batch or (32 if args.quick else 256)
    args.windows = args.windows or (1 if args.quick else 10)
    args.steps = args.steps or (2 if args.quick else 4)
    if args.steps < 2:
        parser.error("--steps must be at least 2: a window is timed from one batch end to the next")
    indivisible = [n for n in args.groups if n < 2 or args.batch % n]
    if indivisible:
        parser.error(f"--groups {indivisible}: each n must be at least 2 and divide --batch {args.batch}")
    return args


def build(name, keras):
    """The runner's models (keras_adascale.experiments.models), and two tiny ones, as a `keras.Sequential`."""
    from keras_adascale.experiments import models

    if name == "small_cnn":
        return models.small_cnn((28, 28, 1), 10)
    if name == "resnet20":
        return models.resnet20(INPUT_SHAPES[name], 10)
    if name == "cnn_tiny":
        return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                                 keras.layers.MaxPooling2D(4), keras.layers.Flatten(), keras.layers.Dense(10)])
    return models.mlp((28, 28, 1), 10, hidden_units={"mlp_5m": (2048, 2048), "mlp_small": (128,)}[name])


def make(variant, name, groups, keras, keras_adascale):
    """(a compiled model, the rows per `fit` step, the fit steps per update) of one way to an update."""
    keras.utils.set_random_seed(0)  # the same initial weights for every way
    base = build(name, keras)
    if variant == "keras":
        model, optimizer, steps = base, keras.optimizers.SGD(0.01, momentum=0.9), 1
    elif variant == "adascale_sgd":
        model, optimizer, steps = base, keras_adascale.AdaScaleSGD(0.01, momentum=0.9), 1
    elif variant == "accumulation":
        model, steps = base, groups
        optimizer = keras_adascale.AdaScaleSGD(0.01, momentum=0.9, gradient_accumulation_steps=groups)
    else:
        model = keras_adascale.AdaScaleModel(base.inputs, base.outputs, groups=groups, group_norms=variant)
        optimizer, steps = keras_adascale.AdaScaleSGD(0.01, momentum=0.9), 1
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, steps


def spread(ratios):
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "q1": quartiles[0], "q3": quartiles[2]}


def main(argv=None):
    args = parse_args(argv)
    on_jax = args.backend == "jax"
    os.environ["KERAS_BACKEND"] = args.backend
    if on_jax:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_force_host_platform_device_count=1").strip()
    import keras
    import numpy as np

    import keras_adascale

    variants = VARIANTS if on_jax else ("keras", "adascale_sgd", "accumulation")
    if on_jax:
        import jax
        from jax_data_parallel import memory  # XLA's sizes of the compiled train step

        device, memory_stats = str(jax.devices()[0]), jax.devices()[0].memory_stats()
    else:
        def memory(*_):
            return {"temp_mib": None, "argument_mib": None}

        device, memory_stats = "cpu", None

    warnings.filterwarnings("ignore", "AdaScaleSGD has scale S = 1")  # adascale_sgd's one sample, on purpose

    load_before = os.getloadavg()
    timer = timing.batch_end_timer()
    rows = []
    for name in args.models:
        rng = np.random.default_rng(0)
        x = rng.random((args.steps * args.batch,) + INPUT_SHAPES[name], np.float32)
        y = rng.integers(0, 10, args.steps * args.batch)
        keras_model, _ = make("keras", name, 1, keras, keras_adascale)
        for groups in args.groups:
            trained = {"keras": (keras_model, 1)}
            trained.update({variant: make(variant, name, groups, keras, keras_adascale) for variant in variants[1:]})

            def window(model, steps, x=x, y=y):
                model.fit(x, y, batch_size=args.batch // steps, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
                return float(np.mean(np.diff(timer.ends))) * steps  # seconds per update

            for variant in variants:  # warm-up: the traces
                window(*trained[variant])
            times = {variant: [] for variant in variants}
            for index in range(args.windows):
                shift = index % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    times[variant].append(window(*trained[variant]))
            for variant in variants:
                model, steps = trained[variant]
                rows_per_step = args.batch // steps
                used = memory(model, keras, x[:rows_per_step], y[:rows_per_step])
                rows.append({
                    "model": name, "parameters": model.count_params(), "groups": groups, "variant": variant,
                    "ms_per_update": 1000 * statistics.median(times[variant]),
                    "ratio": None if variant == "keras" else spread(
                        [a / b for a, b in zip(times[variant], times["keras"], strict=True)]),
                    "temp_mib": used["temp_mib"], "argument_mib": used["argument_mib"],
                    "windows_ms": [1000 * t for t in times[variant]],
                })
    rounds = f"{args.windows} round{'s' if args.windows != 1 else ''}"
    print(f"One device ({args.backend}), {args.batch} rows per update, SGD momentum 0.9 ({rounds} of the "
          f"{len(variants)}, {args.steps} updates a window)" +
          ("; XLA's memory analysis of the compiled step:" if on_jax else ":"))
    print(f"{'model':>10} {'n':>3} {'step':>12} {'ms/update':>10} {'/ keras (q1 - q3)':>24}" +
          (f" {'temp MiB':>9} {'args MiB':>9}" if on_jax else ""))
    for row in rows:
        ratio = row["ratio"]
        text = f"{ratio['median']:.3f} ({ratio['q1']:.3f} - {ratio['q3']:.3f})" if ratio else "-"
        print(f"{row['model']:>10} {row['groups']:>3} {row['variant']:>12} {row['ms_per_update']:>10.2f} "
              f"{text:>24}" + (f" {row['temp_mib']:>9.2f} {row['argument_mib']:>9.2f}" if on_jax else ""))
    summary = {"command": "benchmarks/groups_cost.py" + (" --quick" if args.quick else "") +
               ("" if on_jax else f" --backend {args.backend}"),
               "date": time.strftime("%Y-%m-%d"), "keras": metadata.version("keras"), "backend": args.backend,
               args.backend: metadata.version(args.backend),
               "python": platform.python_version(), "cpu_count": os.cpu_count(),
               "device": device, "memory_stats": memory_stats,
               "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "batch": args.batch, "groups": args.groups, "windows": args.windows, "steps_per_window": args.steps,
               "results": rows}
    output = pathlib.Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / ("groups_cost.json" if on_jax else f"groups_cost_{args.backend}.json")).write_text(
        json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
