"""AdaScaleSGD against Keras's own SGD with the same gradient accumulation, on JAX or PyTorch, side by side.

Run it under the backend to measure (it reads KERAS_BACKEND like Keras):

    KERAS_BACKEND=jax .venv-backends/bin/python benchmarks/backends_overhead.py
    KERAS_BACKEND=torch .venv-backends/bin/python benchmarks/backends_overhead.py
    KERAS_BACKEND=jax .venv-backends/bin/python benchmarks/backends_overhead.py --quick   # a smoke run

Two identical models, one per optimizer (same learning rate and momentum, `gradient_accumulation_steps=k`),
train in `model.fit` on the same batches; windows of `--steps` micro-batches alternate A, B, B, A, ...
after a warm-up, each timed from one batch end to the next (the step, not `fit`'s set-up). Printed: per
model, the median time per update of each and the median ratio of neighbouring windows, with its
quartiles. Keras's JAX optimizer computes the update at every micro-batch and keeps one in k; AdaScale
computes it once per update, so on JAX it may beat Keras where the update is a large share of the step.
The last line printed is a JSON summary.
"""

import argparse
import json
import statistics
import time

import timing


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models, few windows (smoke test)")
    parser.add_argument("--models", default=None, help="comma-separated: mlp_small, mlp_5m (default both)")
    parser.add_argument("--steps-per-update", type=int, default=4, help="k, the micro-batches per update")
    parser.add_argument("--windows", type=int, default=None, help="windows of each optimizer (default 12; quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="updates per window (default 10; quick 2)")
    parser.add_argument("--batch", type=int, default=32, help="examples per micro-batch")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                        help="sgd: AdaScaleSGD against keras.optimizers.SGD, both momentum 0.9 (default); "
                             "adam: AdaScaleAdam against keras.optimizers.Adam")
    args = parser.parse_args(argv)
    args.models = (args.models or ("mlp_small" if args.quick else "mlp_small,mlp_5m")).split(",")
    args.windows = args.windows or (2 if args.quick else 12)
    args.steps = args.steps or (2 if args.quick else 10)
    return args


def build(name, keras):
    """mlp_small: 784-128-10 (0.1M parameters); mlp_5m: 784-2048-2048-10 (5.8M), where the update counts."""
    hidden = {"mlp_small": [128], "mlp_5m": [2048, 2048]}[name]
    layers = [keras.Input((784,))] + [keras.layers.Dense(units, activation="relu") for units in hidden]
    return keras.Sequential(layers + [keras.layers.Dense(10)])


def main(argv=None):
    args = parse_args(argv)
    import keras
    import numpy as np

    import keras_adascale

    k = args.steps_per_update
    micro_batches = args.steps * k
    rng = np.random.default_rng(0)
    x = rng.random((micro_batches * args.batch, 784), np.float32)
    y = rng.integers(0, 10, micro_batches * args.batch)
    results = {}
    for name in args.models:
        models = {}
        if args.optimizer == "sgd":
            pair = (("keras", keras.optimizers.SGD(0.01, momentum=0.9, gradient_accumulation_steps=k)),
                    ("adascale", keras_adascale.AdaScaleSGD(0.01, momentum=0.9, gradient_accumulation_steps=k)))
        else:
            pair = (("keras", keras.optimizers.Adam(0.001, gradient_accumulation_steps=k)),
                    ("adascale", keras_adascale.AdaScaleAdam(0.001, gradient_accumulation_steps=k)))
        for label, optimizer in pair:
            keras.utils.set_random_seed(0)
            model = build(name, keras)
            model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            models[label] = model
        timer = timing.batch_end_timer()

        def window(label):
            models[label].fit(x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
            return float(np.mean(np.diff(timer.ends))) * k  # seconds per update

        for label in models:  # warm-up: the traces
            window(label)
        times = {"keras": [], "adascale": []}
        order = ["keras", "adascale"]
        for index in range(2 * args.windows):
            label = timing.alternated(index, order)  # keras, adascale, adascale, keras, ...
            times[label].append(window(label))
        ratios = [a / b for a, b in zip(times["adascale"], times["keras"])]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        results[name] = {
            "parameters": models["keras"].count_params(),
            "keras_ms_per_update": 1000 * statistics.median(times["keras"]),
            "adascale_ms_per_update": 1000 * statistics.median(times["adascale"]),
            "ratio_median": statistics.median(ratios), "ratio_q1": quartiles[0], "ratio_q3": quartiles[2],
        }
    compared = ("AdaScaleSGD / keras.optimizers.SGD, both momentum 0.9" if args.optimizer == "sgd"
                else "AdaScaleAdam / keras.optimizers.Adam, both")
    print(f"{compared} and gradient_accumulation_steps={k}, on {keras.backend.backend()} ({args.windows} windows "
          f"of {args.steps} updates each):")
    plain = "SGD ms" if args.optimizer == "sgd" else "Adam ms"
    print(f"{'model':>10} {'parameters':>11} {plain:>8} {'AdaScale ms':>12} {'ratio':>6} {'quartiles':>14}")
    for name, row in results.items():
        print(f"{name:>10} {row['parameters']:>11,} {row['keras_ms_per_update']:>8.2f} "
              f"{row['adascale_ms_per_update']:>12.2f} {row['ratio_median']:>6.3f} "
              f"{row['ratio_q1']:>6.3f} - {row['ratio_q3']:.3f}")
    print(json.dumps({"command": "benchmarks/backends_overhead.py", "backend": keras.backend.backend(),
                      "keras": keras.__version__, "optimizer": args.optimizer, "accumulation_steps": k, "batch": args.batch,
                      "windows": args.windows, "updates_per_window": args.steps, "date": time.strftime("%Y-%m-%d"),
                      "results": results}))


if __name__ == "__main__":
    main()
