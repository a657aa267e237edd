"""Workarounds for Keras bugs that stop `model.fit` under MultiWorkerMirroredStrategy."""

import warnings

import keras
import tensorflow as tf
from keras.src.backend.tensorflow import trainer as _tf_trainer

_UPSTREAM = "keras-team/keras#20585, tensorflow/tensorflow#72388"


def trainer_class():
    """Keras's TensorFlow trainer class, the base of `keras.Model` from that module (None if there is none).

    Found through `keras.Model` rather than by name: it is `TensorFlowTrainer` through Keras 3.15 and
    `Trainer` in the 3.16 nightlies (3.16.0.dev2026102704).
    """
    return next((cls for cls in keras.Model.__mro__ if cls.__module__ == _tf_trainer.__name__), None)


def _multi_worker(strategy):
    """Whether `strategy` spans several workers (what TensorFlow's private `_in_multi_worker_mode` says)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    resolver = strategy.cluster_resolver
    if resolver.task_type == "evaluator":  # an evaluator trains alone
        return False
    spec = resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs) > 1


def _first_local_value(strategy, value):
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value


def enable_multi_worker_fit():
    """Makes `model.fit` / `evaluate` work under a multi-worker `MultiWorkerMirroredStrategy`.

    Keras 3 (through 3.15 at least; keras-team/keras#20585) fails there twice:
    `TensorFlowTrainer._maybe_symbolic_build` hands a tuple of per-replica
    batches to `strategy.reduce`, and `reduce_per_replica` reduces the scalar
    logs with `axis=0`. This replaces both for multi-worker strategies only:
    the symbolic build gets the first local replica's batch (only its shapes
    and dtypes matter), and scalars are averaged over workers with
    `axis=None`. Every other strategy still runs Keras's own code. Calling it
    again does nothing. `AdaScaleSGD` calls it when it is created under a
    multi-worker strategy, with a warning that says so.

    Raises:
        RuntimeError: if this Keras no longer has the functions it replaces.
    """
    trainer = trainer_class()
    original_build = getattr(trainer, "_maybe_symbolic_build", None)
    original_reduce = getattr(_tf_trainer, "reduce_per_replica", None)
    if original_build is None or original_reduce is None:
        raise RuntimeError(
            f"enable_multi_worker_fit: Keras {keras.version()} has no TensorFlow trainer "
            f"_maybe_symbolic_build or reduce_per_replica to replace ({_UPSTREAM}); check whether "
            "model.fit under MultiWorkerMirroredStrategy works without it."
        )
    if getattr(original_reduce, "_keras_adascale_fix", False):
        return

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self.distribute_strategy
        if iterator is None or not _multi_worker(strategy):
            return original_build(self, iterator=iterator, data_batch=data_batch)
        for *_, batches in iterator:  # (step, batches) through Keras 3.10, (begin, end, batches) since 3.11
            data_batch = tf.nest.map_structure(lambda value: _first_local_value(strategy, value), next(batches))
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not _multi_worker(strategy):
            return original_reduce(values, strategy, reduction)

        def mean_over_workers(value):
            if not isinstance(value, tf.distribute.DistributedValues) and not tf.is_tensor(value):
                return value
            axis = 0 if value.shape.rank else None  # Keras always passes axis=0, wrong for scalars
            return strategy.reduce("MEAN", value, axis=axis)

        return tf.nest.map_structure(mean_over_workers, values)

    reduce_per_replica._keras_adascale_fix = True
    trainer._maybe_symbolic_build = _maybe_symbolic_build
    _tf_trainer.reduce_per_replica = reduce_per_replica


def enable_for(strategy):
    """Calls `enable_multi_worker_fit` (with a warning, once) when `strategy` spans several workers."""
    if not _multi_worker(strategy) or getattr(_tf_trainer.reduce_per_replica, "_keras_adascale_fix", False):
        return
    enable_multi_worker_fit()
    warnings.warn(
        "keras_adascale replaced two functions of Keras's TensorFlow trainer so that model.fit "
        f"works under MultiWorkerMirroredStrategy ({_UPSTREAM}); see "
        "keras_adascale.enable_multi_worker_fit.",
        stacklevel=3,
    )
