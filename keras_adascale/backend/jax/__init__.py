"""AdaScale on JAX: `mechanics` (the optimizer's), `train_step` (`AdaScaleModel`'s per-replica step), `distribution`
(the batch axis of `keras.distribution` and the checks that batches split over it), `group_norms` (the groups'
norms in one backward pass). Only `group_norms` imports JAX at import; the others where they run."""
