"""Side-by-side timing shared by the benchmarks that time `model.fit` windows: a batch-end clock and the
A, B, B, A, ... order that lets the machine's drift fall on both alike."""

import time


def batch_end_timer():
    """A Keras callback that notes the time of every batch end (from `on_train_begin`, per fit).

    Listed last, the time from one batch end to the next covers the step and every callback, not `fit`'s
    set-up before the first batch.
    """
    import keras

    class BatchEnds(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    return BatchEnds()


def alternated(index, names):
    """The name timed in window `index`: A, B, B, A, A, B, ... for `names` (A, B)."""
    return names[(index // 2 + index) % 2]
