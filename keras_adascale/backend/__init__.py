"""The backend's mechanics: how an AdaScale optimizer gathers its statistic and applies an update.

`AdaScaleMechanics` is the running Keras backend's (`keras.backend.backend()`), chosen at import as Keras
lays out its own backends (`keras/src/backend/<name>/`):

- `tensorflow/`: per-replica squared norms carried in the gradients' all-reduce under `tf.distribute`,
  float64 statistics, replica-local accumulators; `keras_fixes` (`enable_multi_worker_fit`).
- `jax/`: the update one branch of `lax.cond`; `AdaScaleModel`'s per-replica train step (`train_step`,
  `distribution`) and its one-pass group norms (`group_norms`).
- `torch/`: eager, in place.
- `common/`: what JAX and PyTorch share: the block floating-point sums of squares and the accumulation
  mechanics (`AccumulationMechanics`), in `keras.ops`.

`base.AdaScaleBase` mixes `AdaScaleMechanics` in before a Keras optimizer class. TensorFlow is imported only
on its own backend.
"""

import keras

if keras.backend.backend() == "tensorflow":
    from keras_adascale.backend.tensorflow.mechanics import AdaScaleMechanics
elif keras.backend.backend() == "jax":
    from keras_adascale.backend.jax.mechanics import AdaScaleMechanics
else:
    from keras_adascale.backend.torch.mechanics import AdaScaleMechanics

__all__ = ["AdaScaleMechanics"]
