"""AdaScaleModel + AdaScaleSGD against Keras's own step with SGD under keras.distribution.DataParallel on JAX.

    .venv-backends/bin/python benchmarks/jax_data_parallel.py            # 4 host CPU devices, a few minutes
    .venv-backends/bin/python benchmarks/jax_data_parallel.py --quick    # a smoke run

It sets KERAS_BACKEND=jax and XLA_FLAGS=--xla_force_host_platform_device_count=N (`--devices`) itself, before
JAX starts. Three train steps on the same model and batches, each with SGD momentum 0.9:
- `keras`: `keras.Model` and `keras.optimizers.SGD`: Keras's own step, which only sees the mean gradient;
- `adascale`: `AdaScaleModel` and `AdaScaleSGD`: the product's step, `jax.shard_map` over the batch axis;
- `vmap`: the other way to per-replica gradients (written here, not in the package): `jax.vmap` of the
  gradient over the batch reshaped to [R, B/R], the leading axis sharded on the batch axis
  (`spmd_axis_name`), then the same statistic.

Timing: windows of `--steps` steps in `model.fit`, the three in a rotating order (each first, second and
third equally often), each timed from one batch end to the next; printed per model: the median time per
step and the median ratio to `keras` within each round, with its quartiles. Memory: each compiled train
step's per-device sizes from XLA's memory analysis (`temp`: the step's own buffers), and its all-reduce
count. The last line printed is a JSON summary.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

import timing


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the MLP only, few windows (smoke test)")
    parser.add_argument("--devices", type=int, default=4, help="host CPU devices on the batch axis")
    parser.add_argument("--models", default=None, help="comma-separated: mlp, cnn (default both)")
    parser.add_argument("--windows", type=int, default=None, help="rounds of the three (default 9; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="steps per window (default 10; quick 2)")
    parser.add_argument("--batch", type=int, default=64, help="examples per replica per step")
    args = parser.parse_args(argv)
    args.models = (args.models or ("mlp" if args.quick else "mlp,cnn")).split(",")
    args.windows = args.windows or (1 if args.quick else 9)
    args.steps = args.steps or (2 if args.quick else 10)
    if args.steps < 2:
        parser.error("--steps must be at least 2: a window is timed from one batch end to the next")
    return args


def build(name, keras, cls):
    """mlp: 784-512-512-10 (0.67M parameters); cnn: two 3x3 convolutions, BatchNormalization, dropout (0.23M)."""
    if name == "mlp":
        inputs = keras.Input((784,))
        hidden = keras.layers.Dense(512, activation="relu")(inputs)
        hidden = keras.layers.Dense(512, activation="relu")(hidden)
    else:
        inputs = keras.Input((28, 28, 1))
        hidden = keras.layers.Conv2D(32, 3, activation="relu")(inputs)
        hidden = keras.layers.BatchNormalization()(hidden)
        hidden = keras.layers.Conv2D(64, 3, activation="relu")(hidden)
        hidden = keras.layers.MaxPooling2D()(hidden)
        hidden = keras.layers.Flatten()(keras.layers.Dropout(0.25)(hidden))
        hidden = keras.layers.Dense(24, activation="relu")(hidden)
    return cls(inputs, keras.layers.Dense(10)(hidden))


def vmap_model_class(keras, keras_adascale):
    """An AdaScaleModel whose per-replica gradients come from `jax.vmap` instead of `jax.shard_map`."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from keras_adascale.model import AdaScaleFunctional

    class VmapModel(AdaScaleFunctional):
        def _per_replica_train_step(self, state, data):
            distribution = keras.distribution.distribution()
            axis = distribution.batch_dim_name
            replicas = self.optimizer._configuration.replicas
            mesh = distribution.device_mesh.backend_mesh
            optimizer = self.optimizer
            trainable, non_trainable, optimizer_values, metrics = state
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)

            def split(array):
                array = array.reshape((replicas, array.shape[0] // replicas) + array.shape[1:])
                return jax.lax.with_sharding_constraint(array, NamedSharding(mesh, PartitionSpec(axis)))

            grad_fn = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)
            variables = self.trainable_variables

            def one(x, y):
                (_, aux), grads = grad_fn(trainable, non_trainable, metrics, x, y, None, training=True,
                                          optimizer_variables=optimizer_values)
                with keras.StatelessScope(state_mapping=list(zip(optimizer.variables, optimizer_values))):
                    mantissa, exponent = optimizer._replica_statistic(grads, variables)
                return aux, grads, mantissa, exponent

            aux, grads, mantissas, exponents = jax.vmap(one, spmd_axis_name=axis)(split(x), split(y))
            unscaled_loss, y_pred, new_non_trainable, _ = aux
            common = jax.numpy.max(exponents)
            statistic = (jax.numpy.sum(jax.numpy.ldexp(mantissas, exponents - common)), common)
            grads = [g.mean(axis=0) for g in grads]
            non_trainable = [v.mean(axis=0).astype(v.dtype) if jax.numpy.issubdtype(v.dtype, jax.numpy.floating)
                             else v[0] for v in new_non_trainable]
            optimizer._incoming_statistic = statistic
            try:
                trainable, optimizer_values = optimizer.stateless_apply(optimizer_values, grads, trainable)
            finally:
                optimizer._incoming_statistic = None
            y_pred = y_pred.reshape((-1,) + y_pred.shape[2:])
            logs, metrics = self._update_metrics_variables(metrics, unscaled_loss.mean(), x, y, y_pred, sample_weight)
            return logs, (trainable, non_trainable, optimizer_values, metrics)

    return VmapModel


def memory(model, keras, x, y):
    """The compiled train step's per-device sizes (MiB) and its all-reduce count."""
    import jax
    from keras.src.backend.jax.trainer import _distribute_data  # how fit places a batch

    state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                 optimizer_variables=True, metrics_variables=True)
    compiled = jax.jit(model.train_step).lower(state, _distribute_data((x, y))).compile()
    analysis, text = compiled.memory_analysis(), compiled.as_text()
    mib = 2.0**-20
    return {"temp_mib": analysis.temp_size_in_bytes * mib, "argument_mib": analysis.argument_size_in_bytes * mib,
            "output_mib": analysis.output_size_in_bytes * mib,
            "all_reduces": len(re.findall(r"\ball-reduce(?:-start)?\(", text))}


def main(argv=None):
    args = parse_args(argv)
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        sys.exit(f"jax_data_parallel.py runs on JAX (KERAS_BACKEND={os.environ['KERAS_BACKEND']})")
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}").strip()
    import keras
    import numpy as np

    import keras_adascale

    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices("cpu")))
    global_batch = args.devices * args.batch
    rng = np.random.default_rng(0)
    variants = {"keras": (keras.Model, lambda: keras.optimizers.SGD(0.01, momentum=0.9)),
                "adascale": (keras_adascale.AdaScaleModel, lambda: keras_adascale.AdaScaleSGD(0.01, momentum=0.9)),
                "vmap": (vmap_model_class(keras, keras_adascale), lambda: keras_adascale.AdaScaleSGD(0.01, momentum=0.9))}
    results = {}
    for name in args.models:
        shape = (784,) if name == "mlp" else (28, 28, 1)
        x = rng.random((args.steps * global_batch,) + shape, np.float32)
        y = rng.integers(0, 10, args.steps * global_batch)
        models = {}
        for label, (cls, optimizer) in variants.items():
            keras.utils.set_random_seed(0)
            model = build(name, keras, cls)
            model.compile(optimizer=optimizer(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            models[label] = model
        timer = timing.batch_end_timer()

        def window(label):
            models[label].fit(x, y, batch_size=global_batch, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
            return float(np.mean(np.diff(timer.ends)))  # seconds per step

        for label in models:  # warm-up: the traces
            window(label)
        labels = list(models)
        times = {label: [] for label in labels}
        for index in range(args.windows):
            shift = index % len(labels)
            for label in labels[shift:] + labels[:shift]:
                times[label].append(window(label))
        row = {"parameters": models["keras"].count_params()}
        for label in labels:
            row[f"{label}_ms"] = 1000 * statistics.median(times[label])
            row[f"{label}_memory"] = memory(models[label], keras, x[:global_batch], y[:global_batch])
            if label != "keras":
                ratios = [a / b for a, b in zip(times[label], times["keras"])]
                quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
                row[f"{label}_ratio"] = {"median": statistics.median(ratios), "q1": quartiles[0], "q3": quartiles[2]}
        results[name] = row
    print(f"Under DataParallel on {args.devices} host CPU devices, {args.batch} examples per replica, SGD momentum 0.9 "
          f"({args.windows} rounds of {args.steps} steps):")
    print(f"{'model':>6} {'step':>9} {'ms/step':>8} {'/ keras (q1 - q3)':>22} {'temp MiB':>9} {'args MiB':>9} "
          f"{'all-reduces':>11}")
    for name, row in results.items():
        for label in variants:
            ratio = row.get(f"{label}_ratio")
            ratio_text = f"{ratio['median']:.3f} ({ratio['q1']:.3f} - {ratio['q3']:.3f})" if ratio else "-"
            used = row[f"{label}_memory"]
            print(f"{name:>6} {label:>9} {row[f'{label}_ms']:>8.2f} {ratio_text:>22} {used['temp_mib']:>9.2f} "
                  f"{used['argument_mib']:>9.2f} {used['all_reduces']:>11}")
    print(json.dumps({"command": "benchmarks/jax_data_parallel.py", "devices": args.devices, "keras": keras.__version__,
                      "batch_per_replica": args.batch, "windows": args.windows, "steps_per_window": args.steps,
                      "date": time.strftime("%Y-%m-%d"), "results": results}))


if __name__ == "__main__":
    main()
