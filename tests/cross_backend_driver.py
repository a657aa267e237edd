"""One backend's half of the cross-backend resume tests (tests/test_cross_backend.py), run in its own process.

    KERAS_BACKEND=<backend> python tests/cross_backend_driver.py save OUT
        trains 12 micro-batches of AdaScaleSGD (momentum 0.9, k = 2) on one device, saving `.keras` files in the
        middle of an update (after 5 micro-batches) and at an update boundary (after 6), and writes the
        uninterrupted run's end to OUT/uninterrupted.npz;
    KERAS_BACKEND=<backend> python tests/cross_backend_driver.py resume IN OUT
        loads IN's two files, trains each to the 12th micro-batch, writes OUT/mid.npz and OUT/boundary.npz.
"""

import pathlib
import sys

import keras
import numpy as np

import keras_adascale
from problems import BATCH, LeastSquares, flat_weights

MICRO_BATCHES = 12
ROWS = 2 * BATCH  # one micro-batch
PROBLEM = LeastSquares(num_examples=MICRO_BATCHES * ROWS, dim=4, seed=11)
SAVED = {"mid": 5, "boundary": 6}


def fit(model, first, stop):
    model.fit(PROBLEM.x[first * ROWS:stop * ROWS], PROBLEM.y[first * ROWS:stop * ROWS], batch_size=ROWS,
              shuffle=False, verbose=0)


def write(model, path):
    snapshot = model.optimizer.snapshot()
    np.savez(path, weights=flat_weights(model), updates=int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
             backend=keras.backend.backend(),
             **{key: snapshot[key] for key in ("gain", "scale_invariant_iterations", "gradient_variance",
                                                "gradient_sqr_norm", "effective_learning_rate")})


def save(out):
    model = PROBLEM.model()
    model.compile(optimizer=keras_adascale.AdaScaleSGD(0.05, momentum=0.9, gradient_accumulation_steps=2), loss="mse")
    done = 0
    for name, stop in SAVED.items():
        fit(model, done, stop)
        model.save(out / f"{name}.keras")
        done = stop
    fit(model, done, MICRO_BATCHES)
    write(model, out / "uninterrupted.npz")


def resume(source, out):
    for name, first in SAVED.items():
        model = keras.models.load_model(source / f"{name}.keras")
        fit(model, first, MICRO_BATCHES)
        write(model, out / f"{name}.npz")


if __name__ == "__main__":
    command, *paths = sys.argv[1:]
    paths = [pathlib.Path(p) for p in paths]
    for path in paths[-1:]:
        path.mkdir(parents=True, exist_ok=True)
    save(*paths) if command == "save" else resume(*paths)
