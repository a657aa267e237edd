"""AdaScale SGD (Johnson et al., ICML 2020) and AdaScaleAdam for Keras 3: TensorFlow (with tf.distribute), JAX, PyTorch."""

import importlib
import os
import sys
from typing import TYPE_CHECKING

__all__ = ["AdaScaleAdam", "AdaScaleCallback", "AdaScaleModel", "AdaScaleSGD", "AdaScaleSequential", "AutoScale",
           "ScaleInvariantSchedule", "ScalePolicy", "enable_multi_worker_fit"]
__version__ = "0.4.0"

_MODULES = {
    "AdaScaleAdam": "keras_adascale.adam",
    "AdaScaleCallback": "keras_adascale.callbacks",
    "AdaScaleModel": "keras_adascale.model",
    "AdaScaleSequential": "keras_adascale.model",
    "AdaScaleSGD": "keras_adascale.optimizer",
    "AutoScale": "keras_adascale.callbacks",
    "ScalePolicy": "keras_adascale.autoscale",
    "ScaleInvariantSchedule": "keras_adascale.schedules",
    "enable_multi_worker_fit": "keras_adascale.backend.tensorflow.keras_fixes",
}

if TYPE_CHECKING:  # what __getattr__ provides, for static tools: type checkers, IDEs, the API reference
    from keras_adascale.adam import AdaScaleAdam
    from keras_adascale.autoscale import ScalePolicy
    from keras_adascale.callbacks import AdaScaleCallback, AutoScale
    from keras_adascale.backend.tensorflow.keras_fixes import enable_multi_worker_fit
    from keras_adascale.model import AdaScaleModel, AdaScaleSequential
    from keras_adascale.optimizer import AdaScaleSGD
    from keras_adascale.schedules import ScaleInvariantSchedule


# The Keras backends the optimizers and callbacks run on; what is TensorFlow's alone (tf.distribute,
# `enable_multi_worker_fit`, the experiment runner) needs TensorFlow.
BACKENDS = ("tensorflow", "jax", "torch")
_TENSORFLOW_ONLY = {"enable_multi_worker_fit"}


def __getattr__(name):
    if name not in _MODULES:
        raise AttributeError(f"module 'keras_adascale' has no attribute '{name}'")
    if name in _TENSORFLOW_ONLY:
        _require_tensorflow_backend(f"`keras_adascale.{name}` patches Keras's TensorFlow trainer for tf.distribute")
    else:
        _require_backend(BACKENDS, "keras_adascale needs Keras's TensorFlow, JAX or PyTorch backend")
    value = getattr(importlib.import_module(_MODULES[name]), name)
    globals()[name] = value
    return value


def _require_tensorflow_backend(requirement=None):
    """Raises ImportError unless Keras runs on TensorFlow, before any TensorFlow-specific module loads."""
    _require_backend(("tensorflow",), requirement or "keras_adascale needs Keras's TensorFlow backend here")


def _require_backend(backends, requirement):
    """Raises ImportError unless Keras runs on one of `backends`, naming the one it runs on."""
    wanted = " or ".join(f"KERAS_BACKEND={name}" for name in backends)
    try:
        import keras
    except (ImportError, ValueError) as error:  # Keras raises ValueError for an unknown backend name
        configured = os.environ.get("KERAS_BACKEND", "")
        if configured in ("", "tensorflow"):
            if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] == "tensorflow":
                chosen = "KERAS_BACKEND is not set, so Keras" if not configured else "KERAS_BACKEND=tensorflow: Keras"
                raise ImportError(
                    f"{chosen} runs on TensorFlow, which is not installed ({error}). Install the backend you want "
                    "with keras-adascale's extra: pip install 'keras-adascale[tensorflow]', or "
                    "'keras-adascale[jax]' and KERAS_BACKEND=jax, or 'keras-adascale[torch]' and KERAS_BACKEND=torch "
                    "(in a clone: pip install -e '.[jax]')."
                ) from error
            raise
        if configured in backends:
            raise ImportError(
                f"KERAS_BACKEND={configured}, which Keras could not load ({error}). Install it with "
                f"keras-adascale's extra: pip install 'keras-adascale[{configured}]' (in a clone: "
                f"pip install -e '.[{configured}]')."
            ) from error
        raise ImportError(
            f"{requirement}, but KERAS_BACKEND={configured}, which Keras could not load ({error}). "
            f"Set {wanted}."
        ) from error
    backend = keras.backend.backend()
    if backend not in backends:
        raise ImportError(
            f"{requirement}, but Keras runs on its {backend!r} backend (from KERAS_BACKEND or "
            f"~/.keras/keras.json). Set {wanted} before Keras is first imported."
        )


def _started_as_command_line():
    """Whether this process is `keras-adascale ...` or `python -m keras_adascale ...`."""
    argv = getattr(sys, "argv", None) or [""]
    if os.path.basename(argv[0]).split(".")[0] in ("keras-adascale", "keras-adascale-script"):
        return True
    # While `python -m` imports the package of the module it runs, sys.argv[0] is "-m"
    # (Python's docs for -m); sys.orig_argv names the module.
    interpreter_args = getattr(sys, "orig_argv", [])
    for index, arg in enumerate(interpreter_args[1:], start=1):
        if arg.startswith("-m"):
            module = arg[2:] or (interpreter_args[index + 1] if index + 1 < len(interpreter_args) else "")
            return argv[0] == "-m" and module in ("keras_adascale", "keras_adascale.experiments.cli")
    return False


# Importing the package registers its optimizers and ScaleInvariantSchedule with Keras, so that
# `keras.models.load_model` finds them. The command line defers it (TensorFlow takes ~7 s to
# import, which `--help`, `compare` and a config error do not need); it imports them to train.
if not _started_as_command_line():
    for _name in __all__:
        if _name in _TENSORFLOW_ONLY:
            import keras

            if keras.backend.backend() != "tensorflow":
                continue  # asked for by name, it says what it needs
        __getattr__(_name)
    import keras

    if keras.backend.backend() != "tensorflow":  # `from keras_adascale import *` takes what runs here
        __all__ = [name for name in __all__ if name not in _TENSORFLOW_ONLY]
