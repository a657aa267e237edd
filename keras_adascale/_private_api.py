"""Every private Keras and TensorFlow name that keras_adascale and its runner rely on, in one place.

An AdaScale optimizer is a Keras optimizer subclass that takes over how an update is applied, so it
overrides and calls the hooks that Keras's own optimizers use (`_backend_update_step`,
`_get_variable_index`, ...): Keras has no public API for them. Each name here says where it is used
and why no public API does the same; `missing()` checks those of the running Keras backend on the
installed Keras (and TensorFlow or JAX), and tests/test_private_api.py (TensorFlow) and
tests_backends/test_private_api.py (JAX, PyTorch) fail naming any that upstream renamed or removed.
Names used only by the code for older releases carry the Keras versions they are needed for.
"""

import importlib
from typing import NamedTuple

import keras
import numpy as np


class PrivateName(NamedTuple):
    """One private name: `owner` (a key of `_OWNERS`) has attribute `name`; used in `used_by`, because `why`."""

    owner: str
    name: str
    used_by: str
    why: str
    keras_below: tuple = None  # needed only for Keras releases before this one
    backends: tuple = ("tensorflow",)  # the Keras backends whose code uses it


_OPTIMIZER = "a built keras.optimizers.SGD"
_JAX_TRAINER = "keras.src.backend.jax.trainer.JAXTrainer"
_ALL = ("tensorflow", "jax", "torch")
# Found as a base of keras.Model: its name changed (TensorFlowTrainer through 3.15, Trainer in the 3.16 nightlies).
_TRAINER = "Keras's TensorFlow trainer class (backend.tensorflow.keras_fixes.trainer_class())"
_HOOK = "the update hook AdaScale takes over; Keras's optimizers override the same"

NAMES = (
    PrivateName(_OPTIMIZER, "_iterations",
                "base.py, saving.py, backend/tensorflow/mechanics.py, backend/common/mechanics.py",
                "the micro-step counter: the public `iterations` counts updates under accumulation", backends=_ALL),
    PrivateName(_OPTIMIZER, "_learning_rate", "base.py, callbacks.py, backend/common/mechanics.py",
                "the schedule object itself: the public `learning_rate` is its value", backends=_ALL),
    PrivateName(_OPTIMIZER, "_get_current_learning_rate", "base.py", "overridden: a schedule keyed on tau", backends=_ALL),
    PrivateName(_OPTIMIZER, "_accumulated_gradients", "backend/tensorflow/mechanics.py, backend/common/mechanics.py",
                "Keras's gradient accumulators", backends=_ALL),
    PrivateName(_OPTIMIZER, "_trainable_variables", "base.py", "the variables EMA averages", backends=_ALL),
    PrivateName(_OPTIMIZER, "_model_variables_moving_average", "base.py",
                "the averages of `use_ema`, updated as Keras's `_backend_apply_gradients` updates them", backends=_ALL),
    PrivateName(_OPTIMIZER, "_get_variable_index", "backend/tensorflow/mechanics.py, backend/common/mechanics.py, adam.py",
                "a variable's slot in the optimizer's lists, as in every Keras optimizer's update_step", backends=_ALL),
    PrivateName(_OPTIMIZER, "_track_variable", "backend/tensorflow/variables.py",
                "tracks the per-replica accumulator, which `add_variable` cannot make (no synchronization)"),
    PrivateName(_OPTIMIZER, "_backend_apply_gradients", "backend/tensorflow/mechanics.py, backend/common/mechanics.py", _HOOK, backends=_ALL),
    PrivateName(_OPTIMIZER, "_backend_update_step", "backend/tensorflow/mechanics.py", _HOOK),
    PrivateName(_OPTIMIZER, "_clip_gradients", "backend/tensorflow/mechanics.py, backend/common/mechanics.py",
                _HOOK + " (clipping after the all-reduce)", backends=_ALL),
    PrivateName(_OPTIMIZER, "_apply_weight_decay", "backend/tensorflow/mechanics.py, backend/common/mechanics.py",
                _HOOK + " (decay at the gain-scaled rate)", backends=_ALL),
    PrivateName(_OPTIMIZER, "_use_weight_decay", "optimizer.py, adam.py", "`exclude_from_weight_decay`", backends=_ALL),
    PrivateName(_OPTIMIZER, "_distributed_tf_update_step", "backend/tensorflow/mechanics.py, adam.py",
                "runs update_step on every variable in cross-replica context"),
    PrivateName("a built keras.optimizers.Adam(amsgrad=True)", "_momentums", "adam.py", "Adam's m", backends=_ALL),
    PrivateName("a built keras.optimizers.Adam(amsgrad=True)", "_velocities", "adam.py", "Adam's v", backends=_ALL),
    PrivateName("a built keras.optimizers.Adam(amsgrad=True)", "_velocity_hats", "adam.py", "AMSGrad's v_hat", backends=_ALL),
    PrivateName("tf.__internal__.distribute", "strategy_supports_no_merge_call", "backend/tensorflow/mechanics.py",
                "whether the update may run in replica context, as Keras's TF optimizer decides"),
    PrivateName("tf.__internal__.distribute.interim", "maybe_merge_call", "backend/tensorflow/mechanics.py",
                "the one merge_call of an update, as Keras's TF optimizer makes it"),
    PrivateName("keras.Variable(0.0)", "_value", "backend/tensorflow/variables.py (_OnReadVariable)",
                "Keras < 3.10 has no `synchronization` argument: the tf.Variable is made here",
                keras_below=(3, 10)),
    PrivateName("keras.Variable(0.0)", "_dtype", "backend/tensorflow/variables.py (_OnReadVariable)", "as `_value`",
                keras_below=(3, 10)),
    PrivateName("keras.Variable(0.0)", "_shape", "backend/tensorflow/variables.py (_OnReadVariable)", "as `_value`",
                keras_below=(3, 10)),
    PrivateName("keras.Variable(0.0)", "_initialize", "backend/tensorflow/variables.py (_OnReadVariable)", "as `_value`",
                keras_below=(3, 10)),
    PrivateName("keras.Variable(0.0)", "_initialize_with_initializer",
                "backend/tensorflow/variables.py (_OnReadVariable)", "as `_value`", keras_below=(3, 10)),
    PrivateName("keras.src.backend.tensorflow.trainer", "reduce_per_replica", "backend/tensorflow/keras_fixes.py",
                "replaced with `_maybe_symbolic_build`: both fail under MultiWorkerMirroredStrategy "
                "(keras-team/keras#20585)"),
    PrivateName(_TRAINER, "_maybe_symbolic_build", "backend/tensorflow/keras_fixes.py", "as `reduce_per_replica`"),
    PrivateName(_TRAINER, "_symbolic_build", "backend/tensorflow/keras_fixes.py", "as `reduce_per_replica`"),
    PrivateName("tf.distribute.MirroredStrategy", "_collective_key_base", "experiments/strategies.py, tests",
                "strategies of different sizes in one process need distinct collective keys"),
    PrivateName("a keras.callbacks.BackupAndRestore", "_save_model", "experiments/training.py",
                "overridden: an atomic backup that only the chief writes"),
    PrivateName("a keras.callbacks.BackupAndRestore", "_weights_path", "experiments/training.py",
                "the file Keras restores from"),
    PrivateName("a keras.callbacks.BackupAndRestore", "_training_metadata_path", "experiments/training.py",
                "the file Keras reads the epoch from"),
    PrivateName("a keras.callbacks.BackupAndRestore", "_current_epoch", "experiments/training.py",
                "the epoch the backup records"),
    PrivateName("a keras.callbacks.BackupAndRestore", "_last_batch_seen", "experiments/training.py",
                "the batch the backup records"),
    PrivateName("a keras.Sequential()", "_initial_epoch", "callbacks.py",
                "the epoch fit starts from, as BackupAndRestore sets it: AdaScaleCallback runs no epoch at all "
                "when tau is at T_SI before the first batch (fit checks `stop_training` only after one)",
                backends=_ALL),
    PrivateName("keras.src.models.functional", "Functional", "model.py",
                "the class of `keras.Model(inputs, outputs)`: AdaScaleModel's functional form subclasses it, "
                "as Keras would inject it into AdaScaleModel itself", backends=_ALL),
    PrivateName("keras.src.losses.loss", "reduce_values", "backend/jax/train_step.py",
                "wrapped while AdaScaleModel's per-replica step is traced: each replica's loss divided by the "
                "global batch's divisor, as Keras's step on the global batch divides it", backends=("jax",)),
    PrivateName("keras.src.losses.loss", "apply_mask", "backend/jax/train_step.py",
                "wrapped as `reduce_values`: a mask's valid entries counted over the global batch",
                backends=("jax",)),
    PrivateName("keras.src.backend.common.masking", "get_keras_mask", "backend/jax/train_step.py",
                "the outputs' masks, carried out of the per-replica step for the metrics", backends=("jax",)),
    PrivateName("keras.src.backend.common.masking", "set_keras_mask", "backend/jax/train_step.py", "as `get_keras_mask`",
                backends=("jax",)),
    PrivateName("a keras.Sequential()", "_flatten_layers", "backend/jax/group_norms.py",
                "every layer of a model, nested ones included, as Keras walks them (`layers` lists the top level "
                "only): the layers whose weights the one-pass group norms cover, and those they cannot",
                backends=("jax",)),
    PrivateName("a built keras.layers.Dense(1)", "_trainable_variables", "backend/jax/group_norms.py",
                "a layer's own trainable weights, not its sublayers' (`trainable_weights` holds both): each weight "
                "the one-pass group norms cannot measure is named with the layer that holds it", backends=("jax",)),
    PrivateName(_JAX_TRAINER, "_update_metrics_variables", "backend/jax/train_step.py",
                "the loss tracker and the compiled metrics after the step, as Keras's JAX train_step updates them",
                backends=("jax",)),
    # PyTorch's own: the multi-tensor kernels of its optimizers (and Keras's PyTorch optimizers), and a tensor's
    # count of its in-place writes, which tells the host a variable changed without reading it.
    *(PrivateName("torch", name, "backend/torch/fused.py, backend/torch/mechanics.py", "the fused update, as Keras's PyTorch optimizers make theirs",
                  backends=("torch",))
      for name in ("_foreach_norm", "_foreach_copy_", "_foreach_add_", "_foreach_sub_", "_foreach_mul_",
                   "_foreach_mul", "_foreach_addcmul_", "_foreach_lerp_", "_foreach_maximum_", "_foreach_sqrt",
                   "_foreach_div", "_foreach_div_")),
    PrivateName("a torch.zeros(1)", "_version", "backend/torch/mechanics.py",
                "a variable written other than by the update (a restore, `set_scale`) is seen without a read",
                backends=("torch",)),
)


def _built(optimizer):
    optimizer.build([keras.Variable(np.zeros((2,), np.float32))])
    return optimizer


def _built_layer(layer):
    layer.build((None, 2))
    return layer


def _tf(path=""):
    """TensorFlow's module at `path` (imported here, on the TensorFlow backend only)."""
    module = importlib.import_module("tensorflow")
    for part in filter(None, path.split(".")):
        module = getattr(module, part)
    return module


def _jax_trainer():
    from keras.src.backend.jax.trainer import JAXTrainer

    return JAXTrainer


def _trainer_module():
    from keras.src.backend.tensorflow import trainer

    return trainer


def _trainer_class():
    from keras_adascale.backend.tensorflow import keras_fixes

    trainer = keras_fixes.trainer_class()
    if trainer is None:
        raise LookupError("no base class of keras.Model comes from keras.src.backend.tensorflow.trainer")
    return trainer


_OWNERS = {
    _OPTIMIZER: lambda: _built(keras.optimizers.SGD(gradient_accumulation_steps=2, use_ema=True)),
    "a built keras.optimizers.Adam(amsgrad=True)": lambda: _built(keras.optimizers.Adam(amsgrad=True)),
    "tf.__internal__.distribute": lambda: _tf("__internal__.distribute"),
    "tf.__internal__.distribute.interim": lambda: _tf("__internal__.distribute.interim"),
    "keras.Variable(0.0)": lambda: keras.Variable(0.0),
    "keras.src.backend.tensorflow.trainer": _trainer_module,
    _TRAINER: lambda: _trainer_class(),
    "tf.distribute.MirroredStrategy": lambda: _tf("distribute.MirroredStrategy"),
    "a keras.callbacks.BackupAndRestore": lambda: keras.callbacks.BackupAndRestore("unused_backup_dir"),
    _JAX_TRAINER: _jax_trainer,
    "a keras.Sequential()": lambda: keras.Sequential(),
    "a built keras.layers.Dense(1)": lambda: _built_layer(keras.layers.Dense(1)),
    "keras.src.models.functional": lambda: importlib.import_module("keras.src.models.functional"),
    "keras.src.losses.loss": lambda: importlib.import_module("keras.src.losses.loss"),
    "keras.src.backend.common.masking": lambda: importlib.import_module("keras.src.backend.common.masking"),
    "torch": lambda: importlib.import_module("torch"),
    "a torch.zeros(1)": lambda: importlib.import_module("torch").zeros(1),
}



def keras_version():
    """The installed Keras's (major, minor)."""
    return tuple(int(part) for part in keras.version().split(".")[:2])


def versions():
    """'Keras X with TensorFlow Y' (or JAX, PyTorch: the running backend), for messages."""
    backend = keras.backend.backend()
    name, module = {"tensorflow": ("TensorFlow", "tensorflow"), "jax": ("JAX", "jax"),
                    "torch": ("PyTorch", "torch")}.get(backend, (backend, None))
    version = importlib.import_module(module).__version__ if module else "?"
    return f"Keras {keras.version()} with {name} {version}"


def needed(entry, backend=None):
    """Whether `entry` is used with the installed Keras on `backend` (default: the running one)."""
    if (backend or keras.backend.backend()) not in entry.backends:
        return False
    return entry.keras_below is None or keras_version() < entry.keras_below


def missing(entries=NAMES):
    """A message for each needed entry that the installed Keras / TensorFlow lacks (empty when all are there)."""
    messages, owners = [], {}
    for entry in entries:
        if not needed(entry):
            continue
        if entry.owner not in owners:
            try:
                owners[entry.owner] = _OWNERS[entry.owner]()
            except Exception as error:  # an owner that cannot be made at all: every name on it is missing
                owners[entry.owner] = error
        owner = owners[entry.owner]
        if isinstance(owner, Exception) or not hasattr(owner, entry.name):
            problem = f" ({type(owner).__name__}: {owner})" if isinstance(owner, Exception) else ""
            messages.append(
                f"{entry.owner} has no `{entry.name}` in {versions()}{problem}: keras_adascale uses it in "
                f"{entry.used_by} ({entry.why}). Upstream changed a private API: adapt {entry.used_by}."
            )
    return messages
