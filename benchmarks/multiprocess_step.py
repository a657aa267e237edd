"""AdaScaleModel + AdaScaleSGD against Keras's own step with SGD under DataParallel across several JAX processes.

    .venv-backends/bin/python benchmarks/multiprocess_step.py            # 2 x 2, then 1 x 4 host devices: ~3 min
    .venv-backends/bin/python benchmarks/multiprocess_step.py --quick    # a smoke run (small MLP, few windows)

The script is the launcher and the worker. As launcher it starts one job per topology with
`keras_adascale.launch.launch` (P processes on 127.0.0.1, D host CPU devices each): by default 2 x 2, then
1 x 4, the same R = 4 devices on the batch axis, so that the table shows what several processes add. Every
process joins the job (`launch.join`), trains under `DataParallel(devices=keras.distribution.list_devices())`
and feeds its own part of every global batch (`--batch` rows per device: 4 x 32 = 128 by default), NumPy
arrays through `model.fit`. Two train steps on the same model, batches and initial weights, both SGD with
momentum 0.9:
- `keras`: `keras.Model` and `keras.optimizers.SGD`: Keras's own step, which only sees the mean gradient;
- `adascale`: `keras_adascale.AdaScaleModel` and `AdaScaleSGD`: the product's step (each replica's gradient,
  their mean, the sum of their squared norms).
Models: `mlp_5m` (784-2048-2048-10, 5.8M parameters) and `small_cnn` (the runner's, 0.1M), from the runner's
registry; `mlp_small` (784-128-10) for --quick.

Timing, in every process: after a warm-up window of each (the traces), windows of `--steps` steps alternate
A, B, B, A, ... (`--windows` of each), each timed from one batch end to the next; the ratio is AdaScale's
window over Keras's neighbouring one. Reported from process 0 (fit is collective: the processes step
together): the median time per step of each, and the median ratio with its quartiles.

Memory, per device (JAX reports no memory statistics for host devices: `Device.memory_stats()` is None):
- `temp`: XLA's memory analysis of each compiled train step (its own buffers on one device);
- `model` / `optimizer`: the bytes of the model's and the optimizer's variables held on the process's first
  device (their addressable shards there: replicated under DataParallel, so the whole of each);
- per process: its peak resident set (`resource.getrusage`, the whole process: both models of every model
  measured, the JAX runtime, all its devices).

Writes OUTPUT_DIR/multiprocess_step.json (every process's numbers too); the last line printed is its summary.
"""

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time
from importlib import metadata

import timing

HERE = pathlib.Path(__file__).resolve()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small MLP, few windows (smoke test)")
    parser.add_argument("--models", default=None, help="comma-separated: mlp_5m, small_cnn, mlp_small "
                        "(default mlp_5m,small_cnn; quick mlp_small)")
    parser.add_argument("--topologies", default="2x2,1x4", help="processes x host devices per process, each a job")
    parser.add_argument("--windows", type=int, default=None, help="timed windows of each step (default 10; quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="steps per window (default 8; quick 3)")
    parser.add_argument("--batch", type=int, default=32, help="examples per device per step")
    parser.add_argument("--timeout", type=int, default=900, help="seconds each process may run")
    parser.add_argument("--output-dir", default="runs", help="the JSON goes to OUTPUT_DIR/multiprocess_step.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a process of a job: its report folder
    args = parser.parse_args(argv)
    args.models = (args.models or ("mlp_small" if args.quick else "mlp_5m,small_cnn")).split(",")
    args.windows = args.windows or (2 if args.quick else 10)
    args.steps = args.steps or (3 if args.quick else 8)
    if args.steps < 2:
        parser.error("--steps must be at least 2: a window is timed from one batch end to the next")
    args.topologies = [tuple(int(part) for part in item.split("x")) for item in args.topologies.split(",")]
    return args


def build(name):
    """The runner's models (keras_adascale.experiments.models), as a `keras.Sequential`."""
    from keras_adascale.experiments import models

    if name == "small_cnn":
        return models.small_cnn((28, 28, 1), 10)
    return models.mlp((28, 28, 1), 10, hidden_units={"mlp_5m": (2048, 2048), "mlp_small": (128,)}[name])


def device_bytes(variables, device):
    """Bytes of `variables` held on `device` (their addressable shards there)."""
    return sum(shard.data.nbytes for variable in variables for shard in variable.value.addressable_shards
               if shard.device == device)


def worker(args):
    """One process of a job: times both steps on every model and writes OUT/p<process id>.json."""
    from keras_adascale import launch

    job = launch.join(seed=0)
    import jax
    import keras
    import numpy as np

    import keras_adascale
    from jax_data_parallel import memory  # XLA's per-device sizes of the compiled train step
    from keras_adascale.experiments import models as runner_models

    devices = keras.distribution.list_devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False))
    replicas, device = len(devices), jax.local_devices()[0]
    global_batch = replicas * args.batch
    mesh = keras.distribution.distribution().device_mesh.backend_mesh
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    first = min(index[0].start for index in sharding.addressable_devices_indices_map((global_batch,)).values())
    count = jax.local_device_count() * args.batch  # this process's rows of every global batch, from `first`
    rng = np.random.default_rng(0)  # the same global data in every process; each feeds its part
    report = {"process_id": job.process_id, "num_processes": job.num_processes, "replicas": replicas,
              "local_devices": jax.local_device_count(), "rows_fed": count,
              "memory_stats": device.memory_stats(), "models": {}}
    variants = {"keras": (lambda base: keras.Model(base.inputs, base.outputs),
                          lambda: keras.optimizers.SGD(0.01, momentum=0.9)),
                "adascale": (runner_models.per_replica, lambda: keras_adascale.AdaScaleSGD(0.01, momentum=0.9))}
    for name in args.models:
        x = rng.random((args.steps * global_batch, 28, 28, 1), np.float32)
        y = rng.integers(0, 10, args.steps * global_batch)
        local = np.concatenate([np.arange(start + first, start + first + count)
                                for start in range(0, len(x), global_batch)])
        x_local, y_local = x[local], y[local]
        trained = {}
        for label, (wrap, optimizer) in variants.items():
            keras.utils.set_random_seed(0)  # the same initial weights for both
            model = wrap(build(name))
            model.compile(optimizer=optimizer(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            trained[label] = model
        timer = timing.batch_end_timer()

        def window(label):
            trained[label].fit(x_local, y_local, batch_size=count, epochs=1, shuffle=False, verbose=0,
                               callbacks=[timer])
            return float(np.mean(np.diff(timer.ends)))  # seconds per step

        for label in trained:  # warm-up: the traces
            window(label)
        order = list(trained)
        times = {label: [] for label in order}
        for index in range(2 * args.windows):
            label = timing.alternated(index, order)  # keras, adascale, adascale, keras, ...
            times[label].append(window(label))
        row = {"parameters": trained["keras"].count_params(), "times": times}
        for label, model in trained.items():
            row[f"{label}_memory"] = {
                **memory(model, keras, x_local[:count], y_local[:count]),
                "model_bytes": device_bytes(model.variables, device),
                "optimizer_bytes": device_bytes(model.optimizer.variables, device)}
        report["models"][name] = row
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    (pathlib.Path(args.worker) / f"p{job.process_id}.json").write_text(json.dumps(report))


def summarize(times):
    """Median ms per step of each, and AdaScale's window over Keras's neighbouring one: median and quartiles."""
    ratios = [a / b for a, b in zip(times["adascale"], times["keras"])]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"keras_ms": 1000 * statistics.median(times["keras"]),
            "adascale_ms": 1000 * statistics.median(times["adascale"]),
            "ratio": {"median": statistics.median(ratios), "q1": quartiles[0], "q3": quartiles[2]}}


def main(argv=None):
    args = parse_args(argv)
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        sys.exit(f"multiprocess_step.py runs on JAX (KERAS_BACKEND={os.environ['KERAS_BACKEND']})")
    os.environ["KERAS_BACKEND"] = "jax"  # for every process: keras_adascale imports Keras
    if args.worker:
        worker(args)
        return
    from keras_adascale import launch

    output = pathlib.Path(args.output_dir)
    load_before = os.getloadavg()
    rows = []
    for processes, devices in args.topologies:
        folder = output / f"multiprocess_step_{processes}x{devices}"
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(HERE), "--worker", str(folder), "--models", ",".join(args.models),
                   "--windows", str(args.windows), "--steps", str(args.steps), "--batch", str(args.batch)]
        started = time.monotonic()
        launch.launch(command, processes, cpu_devices=devices, timeout=args.timeout, collective_timeout=120)
        # (launch raises with every process's last lines where one fails)
        seconds = time.monotonic() - started
        reports = [json.loads((folder / f"p{index}.json").read_text()) for index in range(processes)]
        for name in args.models:
            row = {"topology": f"{processes}x{devices}", "processes": processes, "devices_per_process": devices,
                   "model": name, "parameters": reports[0]["models"][name]["parameters"],
                   **summarize(reports[0]["models"][name]["times"]),
                   "per_process": [summarize(report["models"][name]["times"]) for report in reports],
                   "memory": {label: reports[0]["models"][name][f"{label}_memory"] for label in ("keras", "adascale")},
                   "peak_rss_mib": [report["peak_rss_mib"] for report in reports],
                   "memory_stats": reports[0]["memory_stats"], "job_seconds": seconds}
            rows.append(row)
    mib = 2.0**-20
    print(f"Under DataParallel on R = 4 host CPU devices, {args.batch} examples per device, SGD momentum 0.9 "
          f"({args.windows} windows of {args.steps} steps each, process 0's clock); memory per device:")
    print(f"{'P x D':>5} {'model':>9} {'params':>9} {'Keras ms':>9} {'AdaScale ms':>11} {'ratio (q1 - q3)':>22} "
          f"{'temp MiB K/A':>13} {'vars MiB K/A':>13} {'opt bytes K/A':>19} {'peak RSS MiB':>13}")
    for row in rows:
        ratio, used = row["ratio"], row["memory"]
        variables = [(used[label]["model_bytes"] + used[label]["optimizer_bytes"]) * mib
                     for label in ("keras", "adascale")]
        print(f"{row['topology']:>5} {row['model']:>9} {row['parameters']:>9,} {row['keras_ms']:>9.2f} "
              f"{row['adascale_ms']:>11.2f} {ratio['median']:>6.3f} ({ratio['q1']:.3f} - {ratio['q3']:.3f}) "
              f"{used['keras']['temp_mib']:>6.2f}/{used['adascale']['temp_mib']:<6.2f} "
              f"{variables[0]:>6.2f}/{variables[1]:<6.2f} "
              f"{used['keras']['optimizer_bytes']:>9,}/{used['adascale']['optimizer_bytes']:<9,} "
              f"{'/'.join(f'{rss:.0f}' for rss in row['peak_rss_mib']):>13}")
    summary = {"command": "benchmarks/multiprocess_step.py" + (" --quick" if args.quick else ""),
               "date": time.strftime("%Y-%m-%d"), "keras": metadata.version("keras"), "jax": metadata.version("jax"),
               "python": platform.python_version(), "cpu_count": os.cpu_count(),
               "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "batch_per_device": args.batch, "windows": args.windows, "steps_per_window": args.steps,
               "results": rows}
    (output / "multiprocess_step.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
