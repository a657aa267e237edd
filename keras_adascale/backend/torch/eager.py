"""AdaScale's generic mechanics on PyTorch: eager, the accumulation and the update rule in place.

PyTorch is eager: a Python `if` on the micro-batch that completes an update, and the accumulation and the
update rule in place. One replica (Keras has no multi-device PyTorch fit); see `backend.common.mechanics`.
"""

from keras import ops

from keras_adascale import gain as gain_lib
from keras_adascale import setting as setting_lib
from keras_adascale.backend.common.block_float import LARGEST_FAST_SUM, _scaled_sqr_norm_sum, _squared_norm
from keras_adascale.backend.common.mechanics import AccumulationMechanics


class EagerMechanics(AccumulationMechanics):
    """The Keras optimizer hooks of AdaScale on PyTorch (one replica, gradient accumulation)."""

    def _replicas_in_sync(self):
        """R = 1: Keras has no multi-device PyTorch fit."""
        return 1

    @staticmethod
    def _has_64_bits():
        """float64 tensors (for views such as tau): PyTorch has them but on Apple's MPS (where Keras places
        tensors when there is no CUDA device)."""
        import torch

        return torch.cuda.is_available() or not torch.backends.mps.is_available()

    def _executing_eagerly(self):
        import torch

        return not torch.compiler.is_compiling()

    def _sqr_norm_sum(self, tensors):
        """`sum_k ||t_k||^2` as a block number `(float32 mantissa, int32 exponent)`: the float32 sum where it
        lies in [1e-20, 1e20], else the sum over the tensors scaled by a power of two (`_scaled_sqr_norm_sum`)."""
        fast = sum(_squared_norm(t) for t in tensors)
        usable = ops.logical_and(ops.isfinite(fast), ops.logical_and(fast >= gain_lib.SMALLEST_FAST_SUM,
                                                                     fast <= LARGEST_FAST_SUM))
        # eager: the exponent of the usual case as a Python 0
        return (fast, 0) if bool(usable) else _scaled_sqr_norm_sum(tensors)

    def _apply_micro_batch(self, grads, trainable_variables, local, setting, micro_step):
        self._eager_apply(grads, trainable_variables, local, setting, micro_step)

    def _eager_apply(self, grads, trainable_variables, local, setting, micro_step):
        """PyTorch (eager): accumulate in place; on the micro-batch that completes an update (one read of a
        scalar), the statistics, then the update rule in place where the gradients are finite."""
        accumulators = self._accumulators(trainable_variables)
        if accumulators:
            # In place (Keras's `assign_add` on PyTorch makes a new tensor and copies it back).
            for accumulator, grad in zip(accumulators, grads):
                accumulator.value.add_(ops.cast(grad, accumulator.dtype))
            count = self._sample_count_accumulator.value  # in place, from Python numbers: no tensor per micro-batch
            replicas = float(self._configuration.replicas)
            for index, increment in enumerate(self._count_increment()):
                count[index].add_(replicas * increment)
            statistic = self._sample_sqr_norm_accumulator
            if isinstance(local[1], int) and float(statistic.value[1]) == 0.0:
                statistic.value[0].add_(local[0])  # the usual case: both of exponent 0, in place
            else:
                statistic.assign(self._accumulated_statistic(ops.convert_to_tensor(statistic.value), local))
            if not bool(setting_lib.is_update_step(setting, micro_step)):
                return
            sums = [ops.convert_to_tensor(a.value) for a in accumulators]
            accumulated = ops.convert_to_tensor(statistic.value)
            statistic_sum = (accumulated[0], ops.cast(accumulated[1], "int32"))
            counted = ops.convert_to_tensor(self._sample_count_accumulator.value)
            accumulators = accumulators + [statistic, self._sample_count_accumulator]
        else:
            sums, statistic_sum, counted = list(grads), local, None
        state, finite, grads, values = self._statistics_step(sums, statistic_sum, trainable_variables, setting,
                                                             micro_step, counted)
        if bool(finite):
            self._apply_update(None, list(zip(grads, trainable_variables)), state.effective_learning_rate, state)
        for variable, value in zip(self._state_variables(), values):
            variable.assign(value)
        for accumulator in accumulators:
            accumulator.value.zero_()
