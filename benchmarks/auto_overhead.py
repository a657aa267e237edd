"""The cost of `AutoScale` in `model.fit`: the same training with and without it, windows side by side.

One model (the runner's small CNN on MNIST-shaped inputs, batch 32) and one AdaScaleSGD with
k = 2 train on; `model.fit` is called for windows of `--steps` micro-batches, alternately with the
callbacks of a fixed run (`AdaScaleCallback(logged="all")`, as the runner logs) and of an auto run
(the same plus `AutoScale` as the runner makes it: a decision on a grid of tau at any update,
`align=True`, one count allowed so that nothing changes). The windows alternate fixed, auto, auto,
fixed, ... so that the machine's drift falls on both alike. Two measures:

- wall time per update: from one batch end to the next, inside each window (the step and every
  callback; not `fit`'s set-up), the median over windows and the median ratio of neighbouring windows;
- `AutoScale`'s own time: its hooks timed from inside, per update and as a share of the auto
  windows' time per update. This one does not depend on the machine's noise.

    python benchmarks/auto_overhead.py             # 24 windows of 100 micro-batches: about 2 minutes on 2 CPU cores
    python benchmarks/auto_overhead.py --quick     # a smoke run (4 windows of 12)

The runner's side-by-side runs (`saved_configs/auto_overhead.yaml`) measure the same thing on whole
runs, where this machine's drift between runs is larger than the effect. The last line printed is a
JSON summary.
"""

import argparse
import json
import statistics
import time

import timing

STEPS = 2  # k: the count of both runs (the runner's auto_overhead config: S = 2 on one device)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 windows of 12 micro-batches")
    parser.add_argument("--windows", type=int, default=None, help="windows of each kind (default 24; quick 4)")
    parser.add_argument("--steps", type=int, default=None,
                        help="micro-batches per window, a multiple of 2 (default 100; quick 12)")
    args = parser.parse_args(argv)
    args.windows = args.windows or (4 if args.quick else 24)
    args.steps = args.steps or (12 if args.quick else 100)
    if args.steps % STEPS or args.steps < 2 * STEPS:
        parser.error(f"--steps must be a multiple of {STEPS}, at least {2 * STEPS}")
    return args


def main(argv=None):
    args = parse_args(argv)
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_adascale
    from keras_adascale.experiments import models

    class TimedAutoScale(keras_adascale.AutoScale):
        """AutoScale with the time spent in its per-batch hooks summed."""

        seconds = 0.0

        def on_train_batch_begin(self, batch, logs=None):
            start = time.perf_counter()
            super().on_train_batch_begin(batch, logs)
            TimedAutoScale.seconds += time.perf_counter() - start

        def on_train_batch_end(self, batch, logs=None):
            start = time.perf_counter()
            super().on_train_batch_end(batch, logs)
            TimedAutoScale.seconds += time.perf_counter() - start

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.random((2048, 28, 28, 1), np.float32)
    labels = rng.integers(0, 10, 2048)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(32).prefetch(4)
    model = models.small_cnn((28, 28, 1), 10)
    total_steps = 1e9  # T_SI far away: the windows train on, never stopped by the callback
    optimizer = keras_adascale.AdaScaleSGD(0.01, momentum=0.9, gradient_accumulation_steps=STEPS)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    timer = timing.batch_end_timer()
    # The runner's auto run (saved_configs/auto_overhead.yaml: T_SI = 800, 40 decisions after a warm-up of
    # T_SI / 20): a decision every 19 of tau at any update, aligned changes, one count allowed.
    autoscale = TimedAutoScale(interval=19.0, warmup=40.0, min_steps=STEPS, max_steps=STEPS,
                               allowed_steps=[STEPS], every="update", align=True, update_cost=16.0)
    callbacks = {
        "fixed": [keras_adascale.AdaScaleCallback(total_steps=total_steps, logged="all"), timer],
        # AutoScale after AdaScaleCallback: the first callback to read the optimizer after a step carries a
        # wait that is there whichever callback reads first (AdaScaleCallback carries it in both lists);
        # listed first, AutoScale's hooks would measure it too (0.26 ms per update here), for the same total.
        "auto": [keras_adascale.AdaScaleCallback(total_steps=total_steps, logged="all"), autoscale, timer],
    }
    # Warm-up: the trace, and both callback lists once.
    for name in ("fixed", "auto"):
        model.fit(data, epochs=1, steps_per_epoch=args.steps, callbacks=callbacks[name], verbose=0)

    per_update = {"fixed": [], "auto": []}
    auto_hooks, auto_updates = 0.0, 0
    order = ["fixed", "auto"]
    for window in range(2 * args.windows):
        name = timing.alternated(window, order)  # fixed, auto, auto, fixed, fixed, auto, ...
        hooks_before = TimedAutoScale.seconds
        model.fit(data, epochs=1, steps_per_epoch=args.steps, callbacks=callbacks[name], verbose=0)
        gaps = np.diff(timer.ends)  # steps - 1 intervals, each one micro-batch
        per_update[name].append(float(np.mean(gaps)) * STEPS)
        if name == "auto":
            auto_hooks += TimedAutoScale.seconds - hooks_before
            auto_updates += args.steps // STEPS

    pairs = [per_update["auto"][i] / per_update["fixed"][i] for i in range(args.windows)]
    quartiles = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [pairs[0]] * 3
    hooks_ms = 1000 * auto_hooks / auto_updates
    summary = {
        "command": "python benchmarks/auto_overhead.py" + (" --quick" if args.quick else ""),
        "windows": args.windows, "micro_batches_per_window": args.steps, "accumulation_steps": STEPS,
        "fixed_ms_per_update": 1000 * statistics.median(per_update["fixed"]),
        "auto_ms_per_update": 1000 * statistics.median(per_update["auto"]),
        "ratio_median": statistics.median(pairs), "ratio_q1": quartiles[0], "ratio_q3": quartiles[2],
        "autoscale_hooks_ms_per_update": hooks_ms,
        "autoscale_hooks_share": hooks_ms / (1000 * statistics.median(per_update["auto"])),
        "changes": len(autoscale.policy.changes), "updates": int(optimizer.iterations.numpy()),
        "keras": keras.__version__, "tensorflow": tf.__version__, "date": time.strftime("%Y-%m-%d"),
    }
    print(f"{args.windows} windows of {args.steps} micro-batches each (k = {STEPS}), fixed and auto alternated:")
    print(f"  per update: fixed {summary['fixed_ms_per_update']:.2f} ms, auto {summary['auto_ms_per_update']:.2f} ms"
          f" (medians over windows)")
    print(f"  auto / fixed: {summary['ratio_median']:.3f} (neighbouring windows; quartiles "
          f"{summary['ratio_q1']:.3f} - {summary['ratio_q3']:.3f})")
    print(f"  AutoScale's own hooks: {hooks_ms:.3f} ms per update, "
          f"{100 * summary['autoscale_hooks_share']:.2f}% of the auto windows' time per update")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
