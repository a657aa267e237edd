"""`AdaScaleModel`: per-replica gradient statistics on JAX under `keras.distribution`.

On JAX, Keras's train step takes the gradient of the loss over the globally sharded batch, so an optimizer
only ever sees the all-reduced mean: the per-replica gradients AdaScale measures are gone. This model's
JAX train step, under a distribution whose batch axis has R > 1 devices (`DataParallel`, or `ModelParallel`
with a batch axis), computes the gradient inside `jax.shard_map` over that axis instead: each replica the
gradient of its own mean loss, then their mean (the gradient Keras's step would have: one all-reduce) and
the sum of their squared norms, which the optimizer receives with the gradient. An AdaScale optimizer then
has N = R x k samples per update (k micro-batches of gradient accumulation), as under `MirroredStrategy`.

Where there is no such distribution, on one device, and on TensorFlow and PyTorch, the train step is
Keras's own (on TensorFlow, `tf.distribute` gives the optimizer each replica's gradient already).

What changes against Keras's own JAX step, as under `MirroredStrategy`:
- BatchNormalization normalizes over each replica's part of the batch (Keras's JAX step: the global
  batch); its moving statistics are the mean of the replicas'.
- Dropout draws a different mask on each replica: each seed generator's seed is hashed with the replica's
  index within the step (`jax.random.fold_in`), so every replica and every layer has a stream of its own
  (without it, every replica would draw the same mask).
The loss, its gradient and the compiled metrics are the global batch's, as in Keras's step, for every
reduction, with sample weights and masks: each replica's loss is its share of the global batch's loss
(Keras's reduction with the global batch's divisor: the sum of the sample weights or of a mask's valid
entries summed over the replicas, or the number of entries, which the equal shards share), times R, so that
the replicas' mean is the global loss and each replica's gradient is a sample of the global gradient.
"""

import keras
from keras.src.models import functional as keras_functional

from keras_adascale import validation
from keras_adascale.backend.jax.distribution import replicas_in_distribution
from keras_adascale.backend.jax.train_step import PerReplicaTrainStep, adascale_optimizer

GROUP_NORMS = ("one_pass", "vmap")


class AdaScaleTrainStep(PerReplicaTrainStep):
    """The per-replica JAX train step, mixed in before a Keras model class (`AdaScaleModel`)."""

    def __init__(self, *args, groups=1, group_norms="one_pass", **kwargs):
        groups = validation.accumulation_steps(groups, "groups")
        if group_norms not in GROUP_NORMS:
            raise ValueError(f"Argument `group_norms` must be one of {GROUP_NORMS}. Received: group_norms={group_norms!r}")
        if groups > 1 and keras.backend.backend() != "jax":
            raise ValueError(
                f"Argument `groups` splits each device's batch into gradient samples in one backward pass, on "
                f"Keras's JAX backend only for now; Keras runs on {keras.backend.backend()}. For the same "
                f"statistics there, pass `gradient_accumulation_steps={groups}` to the optimizer (and a batch "
                f"{groups} times smaller). Received: groups={groups}"
            )
        super().__init__(*args, **kwargs)
        self._groups = groups
        self._group_norms = group_norms

    @property
    def groups(self):
        """n, the gradient samples that each device's part of a batch is split into (contiguous groups of equal
        rows, in one backward pass): an update of an AdaScale optimizer has N = replicas x n x k samples."""
        return self.__dict__.get("_groups", 1)

    @property
    def group_norms(self):
        """How the groups' gradient norms are measured (`groups` > 1): "one_pass" (the default: in the one
        backward pass of the whole batch, for Dense and Conv weights; see
        `keras_adascale.backend.jax.group_norms`), or "vmap" (each group's gradient in a `jax.vmap`: exact for
        every layer, n gradients in memory)."""
        return self.__dict__.get("_group_norms", "one_pass")

    def compile(self, optimizer="rmsprop", *args, **kwargs):
        super().compile(optimizer, *args, **kwargs)
        if self.groups == 1:
            return
        optimizer = adascale_optimizer(self.optimizer)  # under a LossScaleOptimizer ("mixed_float16"), inside it
        if not hasattr(optimizer, "_incoming_statistic"):
            raise ValueError(
                f"{type(self).__name__}(groups={self.groups}) gives an AdaScale optimizer (AdaScaleSGD, AdaScaleAdam) "
                f"{self.groups} gradient samples of each device's batch; got {type(optimizer).__name__}. Use "
                "groups=1 for other optimizers."
            )
        optimizer._use_groups(self.groups)

    def compile_from_config(self, config):
        # Keras's own skips a `compile` that a class overrides (with a warning): as Keras's, through the one above.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if hasattr(self, "optimizer") and self.built:
            self.optimizer.build(self.trainable_variables)  # its variables, for the saved ones to load into

    def fit(self, *args, **kwargs):
        self._check_batches(keras.Model.fit, args, kwargs)
        if self.built and getattr(self, "optimizer", None) is not None:
            self._check_group_norms()  # before Keras's fit takes the variables' values (it again in the step)
        return super().fit(*args, **kwargs)

    def train_step(self, *args):
        replicas = replicas_in_distribution()
        if keras.backend.backend() != "jax" or (replicas == 1 and self.groups == 1):
            self._check_distribution_kept()
            return super().train_step(*args)
        return self._per_replica_train_step(*args)


class AdaScaleModel(AdaScaleTrainStep, keras.Model):
    """A `keras.Model` whose JAX train step gives an AdaScale optimizer each replica's gradient statistics.

    Build it as a `keras.Model`: `AdaScaleModel(inputs, outputs)`, or subclass it and define `call`. For a
    `Sequential` model, `AdaScaleSequential`.

    Under `keras.distribution.DataParallel` on JAX (or a `ModelParallel` with a batch axis) with R devices on
    the batch axis, each update of an `AdaScaleSGD` or `AdaScaleAdam` made after `set_distribution` has
    N = R x k gradient samples (k: `gradient_accumulation_steps`, default 1), and S = N by default.
    Elsewhere it is a plain `keras.Model` (see the module's documentation for what differs from Keras's
    own JAX step: BatchNormalization per replica, a dropout mask per replica).
    """

    # Keras makes a `Model` subclass called with inputs and outputs functional by rewriting the class's bases
    # for good (`inject_functional_model_class`), after which a subclass of it defined by `call` could not be
    # made. `AdaScaleModel(inputs, outputs)` is an instance of a functional subclass instead, as
    # `keras.Model(inputs, outputs)` is a `Functional`; a subclass of `AdaScaleModel` is built by `call`.
    def __new__(cls, *args, **kwargs):
        if cls is AdaScaleModel and _functional_arguments(args, kwargs):
            return AdaScaleFunctional.__new__(AdaScaleFunctional, *args, **kwargs)
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, *args, **kwargs):
        if _functional_arguments(args, kwargs) and not isinstance(self, keras_functional.Functional):
            raise TypeError(
                f"{type(self).__name__} subclasses AdaScaleModel: build it by defining `call` (a subclassed model), "
                "or build a functional model as keras_adascale.AdaScaleModel(inputs, outputs) (a functional subclass "
                "subclasses keras_adascale.model.AdaScaleFunctional)."
            )
        super().__init__(*args, **kwargs)


def _functional_arguments(args, kwargs):
    """Whether a model's arguments are a functional model's: inputs and outputs (as Keras tells them)."""
    return len(args) == 2 or (len(args) == 1 and "outputs" in kwargs) or ("inputs" in kwargs and "outputs" in kwargs)


@keras.saving.register_keras_serializable(package="keras_adascale", name="AdaScaleModel")
class AdaScaleFunctional(AdaScaleModel, keras_functional.Functional):
    """`AdaScaleModel(inputs, outputs)`: a functional AdaScaleModel (saved and loaded as `AdaScaleModel`)."""

    def get_config(self):
        config = super().get_config()
        if self.groups != 1:
            config["groups"] = self.groups  # Keras passes the keys it does not know to the constructor
            config["group_norms"] = self.group_norms
        return config


@keras.saving.register_keras_serializable(package="keras_adascale")
class AdaScaleSequential(AdaScaleTrainStep, keras.Sequential):
    """`keras.Sequential` with `AdaScaleModel`'s train step."""

    def get_config(self):
        config = super().get_config()
        if self.groups != 1:
            config["groups"] = self.groups
            config["group_norms"] = self.group_norms
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        groups, group_norms = config.pop("groups", 1), config.pop("group_norms", "one_pass")
        model = super().from_config(config, custom_objects=custom_objects)
        # Keras's builds it from `name` alone.
        model._groups, model._group_norms = validation.accumulation_steps(groups, "groups"), group_norms
        return model
