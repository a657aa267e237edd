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

import contextlib
import inspect
import math

import keras
from keras import ops
from keras.src.backend.common import masking as keras_masking
from keras.src.losses import loss as keras_loss
from keras.src.models import functional as keras_functional

from keras_adascale import validation

_SEED_STATE = "seed_generator_state"


def _is_float(value):
    return keras.backend.standardize_dtype(value.dtype).startswith(("float", "bfloat"))


def _batch_axis():
    """`(distribution, its batch axis name, the devices along it)`, or None without a distribution."""
    distribution = keras.distribution.distribution()
    if distribution is None or getattr(distribution, "batch_dim_name", None) is None:
        return None
    mesh = distribution.device_mesh
    axis = distribution.batch_dim_name
    return distribution, axis, mesh.shape[list(mesh.axis_names).index(axis)]


def replicas_in_distribution():
    """R, the devices along the current distribution's batch axis (1 without one, or off JAX)."""
    if keras.backend.backend() != "jax":
        return 1
    found = _batch_axis()
    return 1 if found is None else int(found[2])


def _batch_shards_here(distribution, axis):
    """`(the batch axis's devices that this process feeds, the processes)`: across several JAX processes (a
    multi-host job), each process passes its own part of every global batch (Keras builds the global array with
    `jax.make_array_from_process_local_data`), which its devices along the batch axis split; in one process,
    all of them."""
    import jax

    if jax.process_count() == 1:
        return replicas_in_distribution(), 1
    mesh = distribution.device_mesh.backend_mesh
    position = list(mesh.axis_names).index(axis)
    along = mesh.devices.swapaxes(0, position).reshape(mesh.devices.shape[position], -1)  # a row per batch shard
    here = jax.process_index()
    shards = sum(any(device.process_index == here for device in row) for row in along)
    return int(shards), jax.process_count()


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


def _rows(data):
    """The rows of array data (a NumPy or backend array, or a list, tuple or dict of them), else None."""
    leaves = keras.tree.flatten(data) if data is not None else []
    if not leaves or not all(hasattr(leaf, "shape") and len(getattr(leaf, "shape", ())) > 0 for leaf in leaves):
        return None
    return int(leaves[0].shape[0])


def check_divisible(replicas, rows, batch_size, what, processes=1, total=None):
    """Raises ValueError where `rows` in batches of `batch_size` give a batch that `replicas` devices cannot split.

    Across `processes` > 1 JAX processes, `rows` and `batch_size` are this process's and `replicas` the devices of
    the batch axis that split them here, of `total` in all (see `_check_divisible_per_process`)."""
    last = rows % batch_size
    if batch_size % replicas == 0 and last % replicas == 0:
        return
    if processes > 1:
        _check_divisible_per_process(replicas, rows, batch_size, what, processes, total)
    if batch_size % replicas:
        problem = f"the batch size {batch_size:,} does not divide by them"
        fix = f"use a batch size that does ({batch_size - batch_size % replicas or replicas:,}, say)"
    else:
        problem = (f"{what}'s {rows:,} rows in batches of {batch_size:,} leave a last batch of {last:,}, "
                   "which does not divide by them")
        fix = (f"drop or pad the last {last % replicas:,} rows (the first {rows - last % replicas:,}), or use a "
               "batch size that divides the rows")
    raise ValueError(
        f"AdaScaleModel under keras.distribution splits every batch over the {replicas} devices of its batch "
        f"axis, and {problem}: JAX would fail at that batch (IndivisibleError), Keras's own step as well. To train, "
        f"{fix}."
    )


def _check_divisible_per_process(shards, rows, batch_size, what, processes, total):
    """`check_divisible`'s refusal across several JAX processes: this process's batches over its own devices."""
    last = rows % batch_size
    if batch_size % shards:
        trouble = f"the per-process batch size {batch_size:,} does not divide by them"
        remedy = f"give every process a per-process batch size that does ({batch_size - batch_size % shards or shards:,}, say)"
    else:
        trouble = (f"{what}'s {rows:,} rows in this process in batches of {batch_size:,} leave a last batch of "
                   f"{last:,}, which does not divide by them")
        remedy = (f"drop or pad the last {last % shards:,} rows of every process's part, or use a per-process "
                  "batch size that divides it")
    raise ValueError(
        f"AdaScaleModel under keras.distribution across {processes} processes splits the batch that each process "
        f"feeds (its per-process batch, its part of the global batch) over that process's {shards} "
        f"device{'s' if shards != 1 else ''} of the batch axis ({total} in all), and {trouble}: JAX would fail "
        f"at that batch. To train, {remedy}."
    )


def _check_groups_divide(groups, shards, rows, batch_size, what):
    """`AdaScaleModel(groups=n)`: every batch (the last one too) of this process splits over its `shards` devices
    into n groups of equal rows each."""
    parts = groups * shards
    last = rows % batch_size
    if batch_size % parts == 0 and last % parts == 0:
        return
    where = f"each of the {shards} devices' part of every batch" if shards > 1 else "every batch"
    if batch_size % parts:
        problem = f"the batch size {batch_size:,} does not divide by {parts}"
        fix = f"use a batch size that does ({batch_size - batch_size % parts or parts:,}, say)"
    else:
        problem = (f"{what}'s {rows:,} rows in batches of {batch_size:,} leave a last batch of {last:,}, which does "
                   f"not divide by {parts}")
        fix = f"drop or pad the last {last % parts:,} rows, or use a batch size that divides the rows"
    raise ValueError(
        f"AdaScaleModel(groups={groups}) splits {where} into {groups} gradient samples of equal rows, and "
        f"{problem}. To train, {fix}."
    )


def _check_processes_agree(bound, rows, batch_size):
    """Across several JAX processes, before training: every process calls `fit` for the same steps (its rows, batch
    size, steps per epoch and epochs; gathered from all, one small collective). A process with fewer steps would
    leave the others waiting in a collective of a step it never runs."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    names = ("rows", "batch_size", "steps_per_epoch", "epochs", "initial_epoch")
    here = [-1 if rows is None else rows, batch_size if rows is not None else -1,
            bound.get("steps_per_epoch") or -1, bound.get("epochs", 1), bound.get("initial_epoch", 0)]
    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(here, np.int32))).reshape(-1, len(names))
    if (gathered == gathered[0]).all():
        return
    calls = "; ".join(
        f"process {index}: " + ", ".join(f"{name} {value}" for name, value in zip(names, row, strict=True)
                                         if value >= 0)
        for index, row in enumerate(gathered.tolist()))
    raise ValueError(
        f"AdaScaleModel.fit across {jax.process_count()} JAX processes needs every process to train the same steps "
        f"(each feeds its own part of every global batch), and their calls differ: {calls}. Give every process as "
        "many rows, the same per-process batch size and the same epochs."
    )


_GROUPS = "adascale_groups"  # the name of the vmapped axis of a replica's groups
GROUP_NORMS = ("one_pass", "vmap")


class AdaScaleTrainStep:
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
        backward pass of the whole batch, for Dense and Conv weights; see `keras_adascale.group_norms`), or
        "vmap" (each group's gradient in a `jax.vmap`: exact for every layer, n gradients in memory)."""
        return self.__dict__.get("_group_norms", "one_pass")

    def compile(self, optimizer="rmsprop", *args, **kwargs):
        super().compile(optimizer, *args, **kwargs)
        if self.groups == 1:
            return
        if not hasattr(self.optimizer, "_incoming_statistic"):
            raise ValueError(
                f"{type(self).__name__}(groups={self.groups}) gives an AdaScale optimizer (AdaScaleSGD, AdaScaleAdam) "
                f"{self.groups} gradient samples of each device's batch; got {type(self.optimizer).__name__}. Use "
                "groups=1 for other optimizers."
            )
        self.optimizer._use_groups(self.groups)

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

    def _check_group_norms(self):
        if keras.backend.backend() == "jax" and self.groups > 1 and self.group_norms == "one_pass":
            from keras_adascale import group_norms

            group_norms.check(self, self.optimizer)

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

    def train_step(self, *args):
        replicas = replicas_in_distribution()
        if keras.backend.backend() != "jax" or (replicas == 1 and self.groups == 1):
            self._check_distribution_kept()
            return super().train_step(*args)
        return self._per_replica_train_step(*args)

    def _check_distribution_kept(self):
        """An optimizer made for several replicas, now without them: say the distribution is gone."""
        optimizer = getattr(self, "optimizer", None)
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
        optimizer = self.optimizer
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError(
                f"{type(self).__name__} does not support keras.optimizers.LossScaleOptimizer under a distribution "
                "yet: give the AdaScale optimizer itself (float32 training), or train with gradient accumulation "
                "on one device."
            )
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
            from keras_adascale import group_norms

            self._check_group_norms()
        optimizer = self.optimizer
        trainable, non_trainable, optimizer_values, metrics = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        seeds = [v.path.endswith(_SEED_STATE) for v in self.non_trainable_variables]
        model_variables = self.trainable_variables

        def gradients(trainable, non_trainable, metrics, x, y, sample_weight, optimizer_values):
            """`((loss, aux), grads, statistic)`: the statistic this sample's (or with one-pass group norms, this
            replica's groups') sum of squares, as the optimizer measures it, before any sum over `axes`."""
            arguments = (non_trainable, metrics, x, y, sample_weight)
            options = {"training": True, "optimizer_variables": optimizer_values}
            if not one_pass:
                value, grads = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)(
                    trainable, *arguments, **options)
                with keras.StatelessScope(state_mapping=list(zip(optimizer.variables, optimizer_values))):
                    return value, grads, optimizer._replica_statistic(grads, model_variables)

            def with_probes(trainable, probes, *arguments, **options):
                with group_norms.measuring(self, probes, groups):
                    return self.compute_loss_and_updates(trainable, *arguments, **options)

            value, (grads, measured) = jax.value_and_grad(with_probes, argnums=(0, 1), has_aux=True)(
                trainable, group_norms.probes(self, groups), *arguments, **options)
            # A group's gradient is n times its rows' part of the replica's mean loss's gradient.
            total = float(groups * groups) * sum(ops.sum(kernel) + ops.sum(bias) for kernel, bias in measured)
            return value, grads, optimizer._statistic_of_sum(total)

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
                statistic = optimizer._sum_over_axis(statistic, axes)
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
        optimizer._incoming_statistic = statistic
        try:
            trainable, optimizer_values = optimizer.stateless_apply(optimizer_values, grads, trainable)
        finally:
            optimizer._incoming_statistic = None
        logs, metrics = self._update_metrics_variables(metrics, unscaled_loss, x, y, y_pred, sample_weight)
        return logs, (trainable, non_trainable, optimizer_values, metrics)


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
