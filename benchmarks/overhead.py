"""AdaScaleSGD's cost against keras.optimizers.SGD (same momentum), measured side by side in one run;
with `--family adam`, AdaScaleAdam's (raw statistics) against keras.optimizers.Adam (same learning rate,
betas and epsilon); with `--family adam-preconditioned`, AdaScaleAdam's with preconditioned statistics.

For each model and setting, two identical models (one per optimizer) train on the same
batches; timed windows alternate A/B/B/A... after a warm-up, and the report gives the
median ratio of AdaScale's step time to the plain optimizer's over the windows, with its spread, and the
number of ops traced for one update of each (the train step's graph and every function it
calls). Also `apply_gradients` alone on the 5.8M-parameter MLP beside its floor: the plain
optimizer's `apply_gradients` plus the passes over the gradients that AdaScale cannot avoid (the
squared norm of each replica's sample and of the mean gradient), and the optimizers' state size.

    python benchmarks/overhead.py                        # full: 3 models x 3 settings, 20 windows each
    python benchmarks/overhead.py --batch 32             # per-replica batch 32 (the demo's) for every model
    python benchmarks/overhead.py --quick                # a few minutes on 2 CPU cores
    python benchmarks/overhead.py --family adam          # AdaScaleAdam against Adam, in every part
    python benchmarks/overhead.py --family adam-preconditioned   # the same, statistics="preconditioned"

Settings: `default` (one device), `mirrored4` (4 replicas), `accumulation4` (4 accumulation
steps on one device). `mirrored4` at --batch 32 with small_cnn is the demo's setting.

The last line printed is a JSON summary.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import NamedTuple

REPLICAS = 4


class Family(NamedTuple):
    """An optimizer pair: a keras_adascale optimizer and the plain Keras one it is compared with."""

    key: str  # the plain optimizer's name in the results: "<key>_ms", traced_ops["<key>"]...
    plain: str  # the keras.optimizers class, also its printed name
    adascale: str  # the keras_adascale class
    label: str  # the AdaScale optimizer's printed name
    shared: dict  # the hyper-parameters both get
    own: dict  # AdaScale's own arguments


ADAM = {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}
FAMILIES = {
    "sgd": Family("sgd", "SGD", "AdaScaleSGD", "AdaScale", {"learning_rate": 0.01, "momentum": 0.9}, {}),
    # AdaScaleAdam's raw statistics make the passes AdaScaleSGD makes; preconditioned ones one more (`make_floor`)
    "adam": Family("adam", "Adam", "AdaScaleAdam", "AdaScaleAdam", ADAM, {"statistics": "raw"}),
    "adam-preconditioned": Family("adam", "Adam", "AdaScaleAdam", "AdaScaleAdam(pre)", ADAM,
                                  {"statistics": "preconditioned"}),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models, few windows (smoke test)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sgd",
                        help="sgd: AdaScaleSGD vs SGD (default); adam: AdaScaleAdam vs Adam; "
                        "adam-preconditioned: AdaScaleAdam(statistics='preconditioned') vs Adam")
    parser.add_argument("--windows", type=int, default=None, help="timed windows per optimizer (default 20; quick 4)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per window (default 10; quick 3)")
    parser.add_argument("--models", default=None, help="comma-separated subset of small_cnn,mlp_5m,resnet20")
    parser.add_argument("--settings", default=None, help="comma-separated subset of default,mirrored4,accumulation4")
    parser.add_argument("--apply-only", action="store_true",
                        help="skip the training-step table: only apply_gradients on mlp_5m and the fixed cost "
                        "(both run when mlp_5m is among the models)")
    parser.add_argument("--batch", type=int, default=None,
                        help="examples per replica (and micro-batch) for every model (default: 128, resnet20 32; "
                        "quick 32, resnet20 8)")
    args = parser.parse_args(argv)
    args.windows = args.windows or (4 if args.quick else 20)
    args.steps = args.steps or (3 if args.quick else 10)
    return args


MIRRORED = {"name": "mirrored", "devices": REPLICAS, "tpu": ""}


def configure_devices():
    """Four logical CPU devices for the mirrored setting, when there is no GPU (before TF starts)."""
    from keras_adascale.experiments import strategies

    strategies.configure_devices([{"strategy": MIRRORED}])


def model_specs(quick, batch=None):
    """name -> (builder, input shape, per-replica batch)."""
    from keras_adascale.experiments import models

    def mlp_5m(input_shape, classes):
        # 784*2048 + 2048*2048 + 2048*10 + biases = 5.8M parameters
        return models.mlp(input_shape, classes, hidden_units=(2048, 2048))

    specs = {
        "small_cnn": (models.small_cnn, (28, 28, 1), batch or (32 if quick else 128)),
        "mlp_5m": (mlp_5m, (28, 28, 1), batch or (32 if quick else 128)),
        "resnet20": (models.resnet20, (32, 32, 3), batch or (8 if quick else 32)),
    }
    return specs


def traced_ops(function, *args):
    """Ops in a `tf.function`'s graph plus every function it calls (cond branches, XLA bodies)."""
    graph_def = function.get_concrete_function(*args).graph.as_graph_def()
    return len(graph_def.node) + sum(len(f.node_def) for f in graph_def.library.function)


def make_optimizer(family, name, **kwargs):
    """The family's AdaScale optimizer (name "adascale") or its plain Keras one (name `family.key`),
    with the family's hyper-parameters; call inside the strategy's scope."""
    import keras

    import keras_adascale

    if name == "adascale":
        return getattr(keras_adascale, family.adascale)(**family.shared, **family.own, **kwargs)
    return getattr(keras.optimizers, family.plain)(**family.shared, **kwargs)


def make_pair(family, spec, setting, strategy):
    """Two models with the same initial weights, compiled with the family's AdaScale optimizer and its
    plain one (keys "adascale" and `family.key`)."""
    import keras

    build, input_shape, _ = spec
    accumulation = 4 if setting == "accumulation4" else None
    pair = {}
    with strategy.scope():
        keras.utils.set_random_seed(0)
        reference = build(input_shape, 10)
        for name in ("adascale", family.key):
            model = keras.models.clone_model(reference)
            model.set_weights(reference.get_weights())
            optimizer = make_optimizer(family, name, gradient_accumulation_steps=accumulation)
            model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            pair[name] = model
    return pair


def dataset(spec, global_batch):
    import numpy as np
    import tensorflow as tf

    _, input_shape, _ = spec
    rng = np.random.RandomState(0)
    x = rng.rand(global_batch * 8, *input_shape).astype("float32")
    y = rng.randint(0, 10, size=(global_batch * 8,))
    return tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(global_batch, drop_remainder=True).prefetch(4)


def time_windows(runners, windows, steps):
    """Alternating timed windows: A B, B A, A B... -> per-window seconds per step of each runner."""
    times = {name: [] for name in runners}
    names = list(runners)
    for window in range(windows):
        for name in names if window % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            runners[name](steps)
            times[name].append((time.perf_counter() - start) / steps)
    return times


def summarize(times, plain):
    ratios = [a / b for a, b in zip(times["adascale"], times[plain])]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "adascale_ms": 1000 * statistics.median(times["adascale"]),
        f"{plain}_ms": 1000 * statistics.median(times[plain]),
        "ratio_median": statistics.median(ratios),
        "ratio_q1": quartiles[0],
        "ratio_q3": quartiles[2],
        "windows": len(ratios),
    }


def train_step_benchmark(family, spec, setting, windows, steps):
    import tensorflow as tf

    from keras_adascale.experiments import strategies

    strategy = strategies.make_strategy(MIRRORED) if setting == "mirrored4" else tf.distribute.get_strategy()
    pair = make_pair(family, spec, setting, strategy)
    global_batch = spec[2] * strategy.num_replicas_in_sync
    data = dataset(spec, global_batch)
    runners, ops = {}, {}
    for name, model in pair.items():
        model.fit(data, steps_per_epoch=8, epochs=1, verbose=0)  # trace and warm up
        iterator = iter(strategy.experimental_distribute_dataset(data))
        one_step = tf.function(lambda it, model=model: strategy.run(model.train_step, args=(next(it),)))
        ops[name] = traced_ops(one_step, iterator)

        def run(count, model=model, iterator=iterator):
            for _ in range(count):
                model.train_function(iterator)
            model.optimizer.iterations.numpy()  # wait for the last step

        runners[name] = run
    result = summarize(time_windows(runners, windows, steps), family.key)
    result["traced_ops"] = ops
    result["batch_per_replica"] = spec[2]
    result["params"] = pair["adascale"].count_params()
    result["state_bytes"] = {
        name: int(sum(v.numpy().nbytes for v in model.optimizer.variables)) for name, model in pair.items()
    }
    return result


def make_apply(strategy, optimizer, variables, calls=1):
    """A tf.function applying fixed gradients in every replica `calls` times (a closure: tf.function
    args would be traced). Each replica makes its own gradient tensors: a tensor object shared by every
    replica comes back from MirroredStrategy's all-reduce unsummed, with no reduction done."""
    import tensorflow as tf

    gradients = [tf.random.normal(v.shape, seed=1) * 1e-3 for v in variables]

    @tf.function
    def apply():
        for _ in range(calls):
            strategy.run(lambda: optimizer.apply_gradients(zip([tf.identity(g) for g in gradients], variables)))

    return apply


def make_floor(family, strategy, optimizer, variables):
    """The plain optimizer's `apply_gradients` plus the passes AdaScale cannot avoid: each replica's
    squared norm of its sample, and one of the mean gradient (taken here over a tensor of its size).
    AdaScaleAdam's raw statistics are those of AdaScaleSGD; preconditioned ones first divide each
    tensor by sqrt(v_hat) + epsilon, one more elementwise pass (v_hat's stand-in: a tensor of its size)."""
    import tensorflow as tf

    gradients = [tf.random.normal(v.shape, seed=1) * 1e-3 for v in variables]
    means = [tf.random.normal(v.shape, seed=2) * 1e-3 for v in variables]  # the mean gradient's stand-in
    denominators = None
    if family.own.get("statistics") == "preconditioned":
        denominators = [tf.abs(tf.random.normal(v.shape, seed=3)) + 1e-7 for v in variables]

    def sqr_norm(tensors):  # one fused pass per tensor, as AdaScale's float32 fast path
        if denominators:
            tensors = [t / d for t, d in zip(tensors, denominators)]
        return tf.add_n([tf.nn.l2_loss(t) for t in tensors])

    @tf.function
    def apply():
        def replica_fn():
            sample = sqr_norm(gradients)
            mean = sqr_norm(means)
            with tf.control_dependencies([sample, mean]):
                optimizer.apply_gradients(zip([tf.identity(g) for g in gradients], variables))

        strategy.run(replica_fn)

    return apply


def apply_only_benchmark(family, spec, windows, steps):
    """`apply_gradients` alone, under a 4-replica MirroredStrategy (all-reduce included for both),
    beside the floor (see `make_floor`) built on a third instance of the plain optimizer."""
    import keras

    from keras_adascale.experiments import strategies

    strategy = strategies.make_strategy(MIRRORED)  # one instance per kind, reused
    pair = make_pair(family, spec, "mirrored4", strategy)
    runners = {}
    for name, model in pair.items():
        variables = model.trainable_variables
        with strategy.scope():
            model.optimizer.build(variables)
        apply = make_apply(strategy, model.optimizer, variables)
        apply()

        def run(count, apply=apply, model=model):
            for _ in range(count):
                apply()
            model.optimizer.iterations.numpy()

        runners[name] = run
    with strategy.scope():
        floor_model = keras.models.clone_model(pair[family.key])
        floor_optimizer = make_optimizer(family, family.key)
        floor_optimizer.build(floor_model.trainable_variables)
    floor = make_floor(family, strategy, floor_optimizer, floor_model.trainable_variables)
    floor()

    def run_floor(count):
        for _ in range(count):
            floor()
        floor_optimizer.iterations.numpy()

    runners["floor"] = run_floor
    times = time_windows(runners, windows, steps)
    result = summarize(times, family.key)
    ratios = [a / b for a, b in zip(times["adascale"], times["floor"])]
    result["floor_ms"] = 1000 * statistics.median(times["floor"])
    result["ratio_to_floor_median"] = statistics.median(ratios)
    return result


def fixed_cost_benchmark(family, setting, windows, steps, calls=20):
    """The fixed part of an update: `apply_gradients` on one 1,000-float variable, plain vs AdaScale,
    in microseconds per update (`calls` updates per timed call, so Python is not timed)."""
    import keras
    import tensorflow as tf

    from keras_adascale.experiments import strategies

    strategy = strategies.make_strategy(MIRRORED) if setting == "mirrored4" else tf.distribute.get_strategy()
    runners = {}
    for name in ("adascale", family.key):
        with strategy.scope():
            variable = keras.Variable(tf.zeros([1000]))
            optimizer = make_optimizer(family, name)
            optimizer.build([variable])
        apply = make_apply(strategy, optimizer, [variable], calls)
        apply()

        def run(count, apply=apply, optimizer=optimizer):
            for _ in range(count):
                apply()
            optimizer.iterations.numpy()

        runners[name] = run
    times = time_windows(runners, windows, steps)
    return {name: 1e6 * statistics.median(values) / calls for name, values in times.items()}


def machine():
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "gpus": [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name) for gpu in gpus],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    configure_devices()
    specs = model_specs(args.quick, args.batch)
    model_names = args.models.split(",") if args.models else list(specs)
    settings = args.settings.split(",") if args.settings else ["default", "mirrored4", "accumulation4"]
    family = FAMILIES[args.family]
    key, plain, adascale = family.key, family.plain, family.label
    command = " ".join(["python", "benchmarks/overhead.py"] + (sys.argv[1:] if argv is None else argv))
    results = {"machine": machine(), "command": command,
               "family": args.family, "optimizers": {"adascale": family.adascale, key: plain},
               "windows": args.windows, "steps_per_window": args.steps, "train_step": [], "apply_only": None}
    ms_width = max(11, len(adascale) + 3)  # SGD's columns: 8 and 11 wide, ops 8/8
    ops_label = f"ops {plain}/{adascale}"
    ops_width = max(8, len(ops_label) - len(adascale))  # the rows' "/" under the label's
    print(f"{'model':>10} {'setting':>14} {'batch':>5} {'params':>9} {plain + ' ms':>8} {adascale + ' ms':>{ms_width}} "
          f"{'ratio':>6} {'(q1 - q3)':>15} {ops_label:>{ops_width + 1 + len(adascale)}}", flush=True)
    for model_name in [] if args.apply_only else model_names:
        for setting in settings:
            row = train_step_benchmark(family, specs[model_name], setting, args.windows, args.steps)
            row.update(model=model_name, setting=setting)
            results["train_step"].append(row)
            print(f"{model_name:>10} {setting:>14} {row['batch_per_replica']:>5} {row['params']:>9,} "
                  f"{row[key + '_ms']:>8.2f} {row['adascale_ms']:>{ms_width}.2f} {row['ratio_median']:>6.3f} "
                  f"({row['ratio_q1']:.3f} - {row['ratio_q3']:.3f}) "
                  f"{row['traced_ops'][key]:>{ops_width}}/{row['traced_ops']['adascale']:<{len(adascale)}}", flush=True)
    results["fixed_cost_us"] = {}
    for setting in ("default", "mirrored4") if "mlp_5m" in model_names else ():
        row = fixed_cost_benchmark(family, setting, args.windows, args.steps)
        results["fixed_cost_us"][setting] = row
        print(f"fixed cost per update ({setting}, apply_gradients on 1,000 floats): {plain} {row[key]:.0f} us, "
              f"{adascale} {row['adascale']:.0f} us, {adascale}'s own {row['adascale'] - row[key]:.0f} us",
              flush=True)
    if "mlp_5m" in model_names:
        row = apply_only_benchmark(family, specs["mlp_5m"], args.windows, args.steps)
        results["apply_only"] = row
        print(f"apply_gradients alone, mlp_5m, 4 replicas: {plain} {row[key + '_ms']:.2f} ms, {adascale} "
              f"{row['adascale_ms']:.2f} ms, ratio {row['ratio_median']:.3f} "
              f"({row['ratio_q1']:.3f} - {row['ratio_q3']:.3f}); floor {row['floor_ms']:.2f} ms, "
              f"{adascale} / floor {row['ratio_to_floor_median']:.3f}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
