"""AdaScale SGD for Keras 3 and tf.distribute (Johnson et al., ICML 2020)."""

from keras_adascale.callbacks import AdaScaleCallback
from keras_adascale.keras_fixes import enable_multi_worker_fit
from keras_adascale.optimizer import AdaScaleSGD
from keras_adascale.schedules import ScaleInvariantSchedule

__all__ = ["AdaScaleCallback", "AdaScaleSGD", "ScaleInvariantSchedule", "enable_multi_worker_fit"]
__version__ = "0.1.0"
