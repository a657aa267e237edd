"""`AdaScaleModel`'s per-replica train step on JAX: each replica's (and each group's) gradient inside
`jax.shard_map` over the batch axis of `keras.distribution` (and `jax.vmap` over a replica's groups), their mean
and the sum of their squared norms handed to the optimizer. What it changes against Keras's own JAX step is
in `keras_adascale.model`'s documentation.

Pure `keras` at import (JAX is imported where the step is traced): `model.AdaScaleTrainStep` mixes
`PerReplicaTrainStep` in on every backend, and uses it on JAX only.
"""

import contextlib
import inspect
import math

import keras
from keras import ops
from keras.src.backend.common import masking as keras_masking
from keras.src.losses import loss as keras_loss

from keras_adascale.backend.jax.distribution import (_batch_axis, _batch_shards_here, _check_groups_divide,
                                                     _check_processes_agree, _rows, check_divisible,
                                                     replicas_in_distribution)

_SEED_STATE = "seed_generator_state"


def _is_float(value):
    return keras.backend.standardize_dtype(value.dtype).startswith(("float", "bfloat"))


@contextlib.contextmanager
def _global_reductions(axis, replicas):
    """Inside the step's `shard_map`: Keras's loss reductions give each replica its share of the global
    batch's loss, times `replicas` (see the module's documentation).

    Keras's `reduce_values` divides a replica's weighted sum by the replica's own divisor, and its
    `apply_mask` weighs the valid entries by the replica's own count of them; here both are rescaled to the
    global batch's (summed over the mesh axis `axis`). Patched while the step is traced."""
    import jax

    reduce_values, apply_mask = keras_loss.reduce_values, keras_loss.apply_mask

    def global_share(local, dtype):
        """`replicas x local / (sum over the replicas of local)`: a replica's divisor as the global one."""
        local = ops.cast(local, dtype)
        return ops.divide_no_nan(local * float(replicas), jax.lax.psum(local, axis))

    def global_reduce_values(values, sample_weight=None, reduction="sum_over_batch_size"):
        loss = reduce_values(values, sample_weight, reduction)
        if reduction in (None, "none") or tuple(values.shape) in ((), (0,)):
            return loss
        if reduction == "sum":
            return loss * float(replicas)
        if reduction == "mean_with_sample_weight" and sample_weight is not None:
            return loss * global_share(ops.sum(sample_weight), loss.dtype)
        # Divided by the entries: the replicas' shards are equal, so a replica's count is the global one over R
        # (no collective needed).
        return loss

    def global_apply_mask(sample_weight, mask, dtype, reduction):
        weights = apply_mask(sample_weight, mask, dtype, reduction)
        if mask is None or reduction not in ("mean", "sum_over_batch_size"):
            return weights
        # Keras weighs the valid entries by total / valid (this replica's valid entries); the global ones here.
        return weights * global_share(ops.sum(ops.cast(mask, dtype)), dtype)

    keras_loss.reduce_values, keras_loss.apply_mask = global_reduce_values, global_apply_mask
    try:
        yield
    finally:
        keras_loss.reduce_values, keras_loss.apply_mask = reduce_values, apply_mask


def _replica_seed(state, index):
    """A seed generator's state `[seed, counter]` with its seed hashed with the replica's index: a stream of
    its own for every replica and every seed (an offset `seed + index` would give replica 1 of a generator
    seeded s the stream of replica 0 of one seeded s + 1)."""
    import jax
    import jax.numpy as jnp

    word = jax.random.bits(jax.random.fold_in(jax.random.PRNGKey(state[0]), index), (), jnp.uint32)
    return jnp.stack([word.astype(state.dtype), state[1]])


_GROUPS = "adascale_groups"  # the name of the vmapped axis of a replica's groups


def adascale_optimizer(optimizer):
    """The AdaScale optimizer a model's optimizer is, or wraps (Keras's LossScaleOptimizer, which `compile`
    puts around it under the "mixed_float16" dtype policy)."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.inner_optimizer
    return optimizer


class PerReplicaTrainStep:
    """The JAX train step with each replica's gradient and its checks, mixed in by `model.AdaScaleTrainStep`
    before a Keras model class."""

    def _check_group_norms(self):
        if keras.backend.backend() == "jax" and self.groups > 1 and self.group_norms == "one_pass":
            from keras_adascale.backend.jax import group_norms

            group_norms.check(self, adascale_optimizer(self.optimizer))

    def _check_batches(self, method, args, kwargs):
        """Before training: every batch of array data splits over the distribution's devices (see
        `check_divisible`); tf.data and generators are not read ahead. Across several JAX processes, each
        process's batches over its own devices of the batch axis, once the processes are seen to train alike."""
        replicas, groups = replicas_in_distribution(), self.groups
        if replicas == 1 and groups == 1:
            return
        shards, processes = 1, 1
        if replicas > 1:
            distribution, axis, _ = _batch_axis()
            shards, processes = _batch_shards_here(distribution, axis)

        def check(rows, batch_size, what):
            if replicas > 1:
                check_divisible(shards, rows, batch_size, what, processes, replicas)
            if groups > 1:
                _check_groups_divide(groups, shards, rows, batch_size, what)

        bound = inspect.signature(method).bind(self, *args, **kwargs).arguments
        batch_size = bound.get("batch_size") or 32
        rows = _rows(bound.get("x"))
        if processes > 1:
            _check_processes_agree(bound, rows, batch_size)
        if rows is None or bound.get("steps_per_epoch") is not None:
            if bound.get("batch_size") is not None and rows is not None:
                check(batch_size, batch_size, "the training data")
            return
        split = bound.get("validation_split") or 0.0
        training = int(math.floor(rows * (1.0 - split))) if split else rows
        check(training, batch_size, "the training data")
        if split:
            check(rows - training, bound.get("validation_batch_size") or batch_size, "the validation split")
        validation = bound.get("validation_data")
        if isinstance(validation, (tuple, list)) and _rows(validation[0]) is not None:
            check(_rows(validation[0]), bound.get("validation_batch_size") or batch_size, "the validation data")

    def _check_distribution_kept(self):
        """An optimizer made for several replicas, now without them: say the distribution is gone."""
        optimizer = adascale_optimizer(getattr(self, "optimizer", None))
        configuration = getattr(optimizer, "_configuration", None)
        if keras.backend.backend() != "jax" or configuration is None or configuration.replicas == self.groups:
            return
        raise ValueError(
            f"{type(optimizer).__name__} was made under a distribution with {configuration.replicas} devices on "
            "its batch axis, and keras.distribution has none now (`keras.distribution.set_distribution(None)`, "
            "or another with one device on the batch axis). Set the distribution again before training, or "
            "make the optimizer (or load the model) without one: S follows N on a restore."
        )

    def _check_optimizer(self, replicas):
        optimizer = adascale_optimizer(self.optimizer)
        if not hasattr(optimizer, "_incoming_statistic"):
            raise ValueError(
                f"{type(self).__name__} computes per-replica gradient statistics for an AdaScale optimizer "
                f"(AdaScaleSGD, AdaScaleAdam); got {type(optimizer).__name__}. Use keras.Model for other optimizers."
            )
        made_for = optimizer._configuration.replicas // self.groups
        if made_for != replicas:
            raise ValueError(
                f"{type(optimizer).__name__} was made for {made_for} "
                f"device{'s' if made_for != 1 else ''} on the batch axis, but the "
                f"distribution's batch axis has {replicas} devices: make the optimizer after "
                "`keras.distribution.set_distribution(...)`."
            )

    def _per_replica_train_step(self, state, data):
        """The train step with each replica's (and each group's) gradient: inside `jax.shard_map` over the batch
        axis of the distribution (where there is one with R > 1 devices on it), and inside `jax.vmap` over a
        replica's n groups (`groups` > 1); every reduction runs over both, as over R x n replicas."""
        import jax
        from jax.sharding import PartitionSpec

        found = _batch_axis()
        distribution, axis, replicas = found if found is not None and found[2] > 1 else (None, None, 1)
        self._check_optimizer(replicas)
        groups = self.groups
        one_pass = groups > 1 and self.group_norms == "one_pass"
        if one_pass:
            from keras_adascale.backend.jax import group_norms

            self._check_group_norms()
        optimizer = self.optimizer  # Keras's LossScaleOptimizer around `adascale` under "mixed_float16"
        adascale = adascale_optimizer(optimizer)
        trainable, non_trainable, optimizer_values, metrics = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        seeds = [v.path.endswith(_SEED_STATE) for v in self.non_trainable_variables]
        model_variables = self.trainable_variables

        def gradients(trainable, non_trainable, metrics, x, y, sample_weight, optimizer_values):
            """`((loss, aux), grads, statistic)`: the statistic this sample's (or with one-pass group norms, this
            replica's groups') sum of squares, as the optimizer measures it, before any sum over `axes`.

            Under a LossScaleOptimizer the loss, and so `grads`, are scaled by its dynamic scale: the statistic is
            of the unscaled gradients (as the AdaScale optimizer divides by its own `loss_scale_factor`)."""
            arguments = (non_trainable, metrics, x, y, sample_weight)
            options = {"training": True, "optimizer_variables": optimizer_values}
            mapping = list(zip(optimizer.variables, optimizer_values))
            with keras.StatelessScope(state_mapping=mapping):
                dynamic = ops.convert_to_tensor(optimizer.dynamic_scale) if optimizer is not adascale else None
                scale = optimizer.scale_loss(1.0)  # what multiplied the loss (and its gradient)
            if not one_pass:
                value, grads = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)(
                    trainable, *arguments, **options)
                with keras.StatelessScope(state_mapping=mapping):
                    return value, grads, adascale._replica_statistic(grads, model_variables, dynamic)

            def with_probes(trainable, probes, *arguments, **options):
                with group_norms.measuring(self, probes, groups):
                    return self.compute_loss_and_updates(trainable, *arguments, **options)

            value, (grads, measured) = jax.value_and_grad(with_probes, argnums=(0, 1), has_aux=True)(
                trainable, group_norms.probes(self, groups), *arguments, **options)
            # A group's gradient is n times its rows' part of the replica's mean loss's gradient.
            total = float(groups * groups) * sum(ops.sum(kernel) + ops.sum(bias) for kernel, bias in measured)
            total = total + group_norms.regularization_terms(self, trainable, grads, groups, scale)
            return value, grads, adascale._statistic_of_sum(total, dynamic)

        def sample(trainable, non_trainable, optimizer_values, metrics, x, y, sample_weight, index, axes, count):
            """One gradient sample's step (a replica's, or a group's of a replica), its reductions over the mesh
            and vmap axes `axes` (`count` samples in all); with one-pass group norms, a replica's."""

            def mean(value):
                return jax.lax.pmean(value, axes) if axes else value

            stored = non_trainable
            non_trainable = [_replica_seed(v, index) if seed else v for v, seed in zip(stored, seeds)]
            with _global_reductions(axes, count) if axes else contextlib.nullcontext():
                (_, aux), grads, statistic = gradients(trainable, non_trainable, metrics, x, y, sample_weight,
                                                       optimizer_values)
            unscaled_loss, y_pred, new_non_trainable, new_metrics = aux
            # The masks of the outputs, which the metrics read (a jax.Array's mask does not leave shard_map).
            masks = keras.tree.map_structure(keras_masking.get_keras_mask, y_pred)
            # The statistic (AdaScaleAdam may precondition, with its optimizer state), summed over the samples
            # in one exponent.
            if axes:
                statistic = adascale._sum_over_axis(statistic, axes)
            grads = mean(grads)
            # A seed generator keeps its seed and takes the counter it advanced to (the same on every replica).
            new_non_trainable = [
                ops.stack([old[0] + (new[0] - hashed[0]), new[1]]) if seed
                else (mean(new) if _is_float(new) else new)
                for old, hashed, new, seed in zip(stored, non_trainable, new_non_trainable, seeds)
            ]
            # Metrics updated in the loss (a multi-output model's per-output losses): the samples' increments.
            new_metrics = [old + (jax.lax.psum(new - old, axes) if axes else new - old) if _is_float(new) else new
                           for old, new in zip(metrics, new_metrics)]
            return mean(unscaled_loss), y_pred, masks, new_non_trainable, new_metrics, grads, statistic

        def local(trainable, non_trainable, optimizer_values, metrics, x, y, sample_weight):
            rows = keras.tree.flatten(x)[0].shape[0]
            if groups > 1 and rows % groups:  # a batch `fit` could not check ahead (a generator's, tf.data's)
                raise ValueError(
                    f"AdaScaleModel(groups={groups}) splits each device's part of every batch into {groups} gradient "
                    f"samples of equal rows, and a batch gives a device {rows} rows, which do not divide by "
                    f"{groups}: feed batches of a multiple of {groups} x the devices on the batch axis "
                    "(drop_remainder=True for a tf.data dataset)."
                )
            replica = jax.lax.axis_index(axis) if axis is not None else 0
            mesh_axes = (axis,) if axis is not None else ()
            if groups == 1 or one_pass:
                return sample(trainable, non_trainable, optimizer_values, metrics, x, y, sample_weight, replica,
                              mesh_axes, replicas)

            def one_group(x, y, sample_weight):
                index = replica * groups + jax.lax.axis_index(_GROUPS)
                return sample(trainable, non_trainable, optimizer_values, metrics, x, y, sample_weight, index,
                              (*mesh_axes, _GROUPS), replicas * groups)

            def each(function, tree):  # `function` of every array of `tree` (None stays None: no mask, no weights)
                return keras.tree.map_structure(lambda a: None if a is None else function(a), tree)

            def split(tree):  # [rows, ...] -> [groups, rows / groups, ...]: contiguous groups
                return each(lambda a: a.reshape((groups, a.shape[0] // groups) + a.shape[1:]), tree)

            def joined(tree):  # the groups' rows back in order
                return each(lambda a: a.reshape((-1,) + a.shape[2:]), tree)

            def first(tree):  # a value every group holds alike (reduced over the groups)
                return each(lambda a: a[0], tree)

            loss, y_pred, masks, new_non_trainable, new_metrics, grads, statistic = jax.vmap(
                one_group, axis_name=_GROUPS)(split(x), split(y), split(sample_weight))
            return (first(loss), joined(y_pred), joined(masks), first(new_non_trainable), first(new_metrics),
                    first(grads), first(statistic))

        if axis is None:
            step = local
        else:
            replicated, batch = PartitionSpec(), PartitionSpec(axis)
            step = jax.shard_map(
                local,
                mesh=distribution.device_mesh.backend_mesh,
                in_specs=(replicated, replicated, replicated, replicated, batch, batch, batch),
                out_specs=(replicated, batch, batch, replicated, replicated, replicated, replicated),
                axis_names={axis},
                check_vma=False,
            )
        unscaled_loss, y_pred, masks, non_trainable, metrics, grads, statistic = step(
            trainable, non_trainable, optimizer_values, metrics, x, y, sample_weight)
        keras.tree.map_structure(keras_masking.set_keras_mask, y_pred, masks)
        adascale._incoming_statistic = statistic
        try:
            trainable, optimizer_values = optimizer.stateless_apply(optimizer_values, grads, trainable)
        finally:
            adascale._incoming_statistic = None
        logs, metrics = self._update_metrics_variables(metrics, unscaled_loss, x, y, y_pred, sample_weight)
        return logs, (trainable, non_trainable, optimizer_values, metrics)
