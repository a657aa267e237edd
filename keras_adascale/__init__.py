"""AdaScale SGD for Keras 3 and tf.distribute (Johnson et al., ICML 2020)."""

from keras_adascale.callbacks import AdaScaleCallback
from keras_adascale.optimizer import AdaScaleSGD
from keras_adascale.schedules import ScaleInvariantSchedule

__all__ = ["AdaScaleCallback", "AdaScaleSGD", "ScaleInvariantSchedule"]
__version__ = "0.1.0"
