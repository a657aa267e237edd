"""AdaScale on TensorFlow: `mechanics` (the optimizer's, under `tf.distribute`), `statistics` (the squared norms and
their all-reduce), `variables` (the per-replica accumulators), `keras_fixes` (`enable_multi_worker_fit`)."""
