"""`keras.distribution` on JAX: the devices along a distribution's batch axis, and the checks, before
training, that every batch splits over them (and over `AdaScaleModel(groups=n)`'s groups).

Pure `keras` at import (JAX is imported where a check needs it): `model.AdaScaleModel` reads
`replicas_in_distribution` on every backend.
"""

import keras


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
