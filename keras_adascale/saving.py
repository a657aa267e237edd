"""The portable layout of a saved AdaScale optimizer: one layout on every backend, and the older ones.

`PortableSaving` is mixed into `base.AdaScaleBase`: Keras's `save_own_variables` / `load_own_variables`
through a backend's mechanics (`_backend_only_variables`, `_portable_floats`, `_assign_floats`,
`_statistic_number`, `_statistic_value`), and the migrations of 0.2.0's and 0.3.0's stores.
"""

import keras
import numpy as np

from keras_adascale import numerics
from keras_adascale import setting as setting_lib


class PortableSaving:
    """`save_own_variables` and `load_own_variables` of an AdaScale optimizer, in the portable layout."""

    # Saving. A `.keras` or `.weights.h5` file holds the optimizer in one layout on every backend, so that a
    # file saved on one loads on any other (train on JAX, fine-tune on TensorFlow): every variable but the
    # backend's own (the statistics' exponent on JAX and PyTorch), the state and the statistic accumulator
    # in float64 numbers (not a backend's mantissas or all-reduce words), the statistic as the sum of the
    # samples' squared norms. TensorFlow's layout of 0.3.0 is this one without the count accumulator; JAX's
    # and PyTorch's of 0.3.0 had the exponent and no count: both still load (`_from_0_3_0`).

    def _portable_variables(self):
        """The variables a saved store holds, in its order: all but the backend's own."""
        own = {id(v) for v in self._backend_only_variables()}
        return [v for v in self.variables if id(v) not in own]

    def save_own_variables(self, store):
        for index, variable in enumerate(self._portable_variables()):
            store[str(index)] = self._portable_value(variable)

    def _portable_value(self, variable):
        """A variable's value as a saved store holds it (NumPy)."""
        value = self._portable_number(variable)
        # An accumulator whose sums were applied already (PyTorch's fused update keeps them): 0, as elsewhere.
        return np.zeros_like(value) if self._spent_sums(variable) else value

    def _portable_number(self, variable):
        if variable is self._state_floats:
            return self._portable_floats(variable.numpy())
        if variable is getattr(self, "_sample_sqr_norm_accumulator", None):
            return np.float64(self._statistic_number(np.asarray(variable.numpy())))
        if variable is getattr(self, "_sample_count_accumulator", None):
            return np.asarray(variable.numpy(), np.float64)
        return variable.numpy()

    def _assign_portable(self, variable, value):
        """`variable = value`, a value as a saved store holds it."""
        if variable is self._state_floats:
            self._assign_floats(np.asarray(value, np.float64))
        elif variable is getattr(self, "_sample_sqr_norm_accumulator", None):
            variable.assign(self._statistic_value(float(np.asarray(value, np.float64))))
        elif variable is getattr(self, "_sample_count_accumulator", None):
            variable.assign(np.asarray(value, keras.backend.standardize_dtype(variable.dtype)))
        else:
            variable.assign(value)

    def _from_0_3_0(self, values, portable):
        """A 0.3.0 store's values (a list) in this version's layout, or the values as they are."""
        accumulating = hasattr(self, "_sample_count_accumulator")
        if not accumulating and len(values) != len(portable) + 1:
            return values
        index = {id(v): i for i, v in enumerate(portable)}
        scales = index[id(self._setting_scales)]
        exponent = None
        if len(values) == len(portable) + (0 if accumulating else 1) and len(values) > scales + 1:
            candidate = np.asarray(values[scales + 1])
            if candidate.shape == () and np.issubdtype(candidate.dtype, np.integer):
                exponent = int(candidate)  # JAX's or PyTorch's: the statistics' exponent after S
        if exponent is None and not (accumulating and len(values) == len(portable) - 1):
            return values
        original, values = values, list(values)
        if exponent is not None:
            del values[scales + 1]
            floats = np.asarray(values[index[id(self._state_floats)]], np.float64).copy()
            floats[:2] = np.ldexp(floats[:2], exponent)
            values[index[id(self._state_floats)]] = floats
        if not accumulating:
            return values if len(values) == len(portable) else original
        counters = np.asarray(values[index[id(self._setting_counters)]])
        iterations = int(np.asarray(values[index[id(self._iterations)]]))
        replicas = int(counters[setting_lib.COUNTERS.index("replicas")])
        in_progress = iterations - int(counters[setting_lib.COUNTERS.index("update_start")])
        statistic = index[id(self._sample_sqr_norm_accumulator)]
        words = np.asarray(values[statistic])
        if exponent is not None:  # [mantissa, exponent] of the replicas' own squared norms
            values[statistic] = np.ldexp(np.float64(words[0]), int(words[1]))
        else:  # TensorFlow's all-reduce words of the squared norms of g_i / R
            values[statistic] = numerics.decoded_words(words) * replicas**2
        # 0.3.0 counted nothing: the micro-batches in progress came from the saved replicas.
        values.insert(index[id(self._sample_count_accumulator)],
                      np.asarray([replicas * in_progress, replicas**2 * in_progress], np.float64))
        # Another optimizer's store (other slots) may have the same number of values: only a store whose
        # every value has its variable's shape is taken for 0.3.0's.
        if any(tuple(np.shape(value)) != self._portable_shape(variable) for value, variable in zip(values, portable)):
            return original
        return values

    def load_own_variables(self, store):
        # Keras warns and skips a mismatched optimizer: that would silently restart
        # tau, the gain statistics and the moments. Refuse instead.
        portable = self._portable_variables()
        keys = sorted(store.keys(), key=lambda key: int(key) if key.isdigit() else key)
        values = self._from_0_2_0([np.asarray(store[key]) for key in keys], portable)
        values = self._from_0_3_0(values, portable)
        saved = len(values)
        name = type(self).__name__
        if saved != len(portable):
            raise ValueError(
                f"Cannot restore {name} '{self.name}': the checkpoint holds {saved} optimizer "
                f"variables and this optimizer has {len(portable)}. Build it first "
                "(`optimizer.build(model.trainable_variables)`) with the same arguments "
                f"({self._shape_arguments}, `gradient_accumulation_steps`) as the saved one, "
                "or load the model with `compile=False` to restore only the weights."
                + (" If it was saved by keras-adascale 0.1.0, which kept 2 fewer (S and the accumulation "
                   "count became optimizer variables in 0.2.0), load it with `compile=False`."
                   if saved == len(portable) - 2 else "")
            )
        for value, variable in zip(values, portable):
            shape, expected = tuple(np.shape(value)), self._portable_shape(variable)
            if shape != expected:
                raise ValueError(
                    f"Cannot restore {name} '{self.name}': variable {variable.path} has shape "
                    f"{expected} but the checkpoint's has {shape}."
                )
        for value, variable in zip(values, portable):
            self._assign_portable(variable, value)

    def _portable_shape(self, variable):
        """A variable's shape in a saved store."""
        if variable is getattr(self, "_sample_sqr_norm_accumulator", None):
            return ()
        return tuple(variable.shape)

    def _from_0_2_0(self, values, portable):
        """A 0.2.0 store's setting in this version's layout (`setting.from_0_2_0`), else the values as they are.

        0.2.0's variables before the statistic accumulator are where this version's are."""
        index = {id(v): i for i, v in enumerate(portable)}
        counters_at, scales_at = index[id(self._setting_counters)], index[id(self._setting_scales)]
        if len(values) <= scales_at:
            return values
        migrated = setting_lib.from_0_2_0(np.asarray(values[counters_at]), np.asarray(values[scales_at]),
                                          int(np.asarray(values[index[id(self._iterations)]])))
        if migrated is None:
            return values
        values = list(values)
        values[counters_at], values[scales_at] = migrated
        return values
