"""A short real training run: AdaScale at S = 4 against single-batch SGD on scikit-learn's digits."""

import time

import keras
import numpy as np
import tensorflow as tf

from keras_adascale.callbacks import AdaScaleCallback
from keras_adascale.optimizer import AdaScaleSGD
from keras_adascale.schedules import ScaleInvariantSchedule

BATCH_SIZE = 32
SCALE = 4
TOTAL_STEPS = 600  # scale-invariant iterations: 600 single-batch steps


def load_digits():
    """The 1,797 real 8x8 handwritten digits bundled with scikit-learn, split 1,500 / 297."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int64)
    order = np.random.RandomState(0).permutation(len(labels))
    images, labels = images[order], labels[order]
    return (images[:1500], labels[:1500]), (images[1500:], labels[1500:])


def build_model(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def schedule():
    return ScaleInvariantSchedule(
        keras.optimizers.schedules.PiecewiseConstantDecay([400, 500], [0.1, 0.01, 0.001]),
        total_steps=TOTAL_STEPS,
    )


def train(name, optimizer, micro_batches_per_update, train_data, test_data, verbose):
    model = build_model(seed=1)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    (x, y), (x_test, y_test) = train_data, test_data
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(y), seed=0)
        .batch(BATCH_SIZE, drop_remainder=True)
        .repeat()
        .prefetch(tf.data.AUTOTUNE)
    )
    # 40 batches an epoch: a multiple of SCALE, and 15 epochs make the 600 steps of S = 1.
    steps_per_epoch = 40
    callbacks = [AdaScaleCallback()] if isinstance(optimizer, AdaScaleSGD) else []
    epochs = TOTAL_STEPS * micro_batches_per_update // steps_per_epoch
    start = time.perf_counter()
    history = model.fit(
        dataset,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        callbacks=callbacks,
        verbose=verbose,
    )
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    updates = int(optimizer.iterations)
    row = {"run": name, "updates": updates, "test_accuracy": accuracy, "seconds": seconds}
    if isinstance(optimizer, AdaScaleSGD):
        row["mean_gain"] = float(np.mean(history.history["gain"]))
        row["tau"] = float(optimizer.scale_invariant_iterations)
    return row


def main(verbose=2):
    """Trains single-batch SGD (S = 1) and AdaScale (S = 4) and prints a comparison."""
    train_data, test_data = load_digits()
    print(f"scikit-learn digits: {len(train_data[1])} train / {len(test_data[1])} test images")
    print(f"\n== SGD, S = 1, batch {BATCH_SIZE}, {TOTAL_STEPS} steps ==")
    baseline = train(
        "sgd S=1",
        keras.optimizers.SGD(schedule(), momentum=0.9),
        1,
        train_data,
        test_data,
        verbose,
    )
    print(f"\n== AdaScale, S = {SCALE} (gradient accumulation), same schedule, until tau >= {TOTAL_STEPS} ==")
    adascale = train(
        f"adascale S={SCALE}",
        AdaScaleSGD(schedule(), momentum=0.9, gradient_accumulation_steps=SCALE),
        SCALE,
        train_data,
        test_data,
        verbose,
    )
    print("\nrun             updates  test acc  mean gain      tau  seconds")
    for row in (baseline, adascale):
        print(
            f"{row['run']:<15} {row['updates']:>7}  {row['test_accuracy']:>8.4f}"
            f"  {row.get('mean_gain', 1.0):>9.3f}  {row.get('tau', row['updates']):>7.1f}"
            f"  {row['seconds']:>7.1f}"
        )
