"""Replica-local variables on TensorFlow: the accumulators, one per replica, summed on read.

Accumulators are sync-on-read variables, filled without a merge_call (Keras's mirrored accumulators need
one inside a cond, which MirroredStrategy rejects: keras-team/keras#20582).
"""

import inspect

import keras
import tensorflow as tf

from keras_adascale.backend.tensorflow.statistics import encode_statistic

# Keras 3.10 gave `keras.Variable` its `synchronization` argument.
_KERAS_VARIABLE_TAKES_SYNCHRONIZATION = "synchronization" in inspect.signature(keras.Variable.__init__).parameters


class _OnReadVariable(keras.Variable):
    """A Keras variable held once per replica and summed on read, for Keras releases whose
    `keras.Variable` has no `synchronization` argument (and makes every variable mirrored)."""

    def _initialize(self, value):
        self._value = tf.Variable(
            value,
            dtype=self._dtype,
            trainable=False,
            name=self.name,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.SUM,
        )

    def _initialize_with_initializer(self, initializer):
        self._initialize(lambda: initializer(self._shape, dtype=self._dtype))


def _tf_variable(variable):
    """The tf.Variable behind a Keras variable. Not `isinstance(v, keras.Variable)`: in Keras < 3.10
    (3.5 at least) layers make variables of a backend class that `keras.Variable` only derives from."""
    return variable if isinstance(variable, tf.Variable) else variable.value


class ReplicaLocalAccumulators:
    """The per-replica accumulators of `AdaScaleMechanics` (TensorFlow), for a Keras optimizer class after it
    in the MRO: the gradients', the statistic's and the count's."""

    def _add_statistic_accumulator(self, variables):
        """The per-replica accumulator of the micro-batches' sums of squares (in the words it travels as)."""
        dtypes = {tf.as_dtype(v.dtype) for v in variables}
        # The statistic travels in the gradients' all-reduce, in their dtype where it can.
        self._statistic_words_dtype = dtypes.pop() if len(dtypes) == 1 else None
        words = encode_statistic(tf.zeros((), self._statistics_dtype), self._statistic_words_dtype)
        words = words[0] if words is not None else tf.zeros((), self._statistics_dtype)
        return self._add_replica_local_variable(words.shape, words.dtype, "sample_sqr_norm_accumulator")

    def _add_count_accumulator(self):
        """The per-replica count of what entered the accumulators (in the statistic's words' dtype, to travel
        in the same all-reduce)."""
        return self._add_replica_local_variable((2,), self._sample_sqr_norm_accumulator.dtype,
                                                "sample_count_accumulator")

    def _add_replica_local_variable(self, shape, dtype, name):
        variable_class = keras.Variable if _KERAS_VARIABLE_TAKES_SYNCHRONIZATION else _OnReadVariable
        options = {"synchronization": "on_read"} if _KERAS_VARIABLE_TAKES_SYNCHRONIZATION else {}
        with keras.name_scope(self.name, caller=self):
            variable = variable_class(
                initializer=keras.initializers.Zeros(),
                shape=shape,
                dtype=dtype,
                trainable=False,
                aggregation="sum",
                name=name,
                **options,
            )
        self._track_variable(variable)
        return variable

    def add_variable_from_reference(self, reference_variable, name=None, initializer="zeros"):
        if name != "gradient_accumulator":
            return super().add_variable_from_reference(reference_variable, name, initializer)
        with self._strategy.extended.colocate_vars_with(reference_variable.value):
            return self._add_replica_local_variable(
                reference_variable.shape,
                reference_variable.dtype,
                f"{reference_variable.path.replace('/', '_')}_{name}",
            )
