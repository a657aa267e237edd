"""The package's import (keras_adascale/__init__.py): what it registers with Keras."""

import subprocess
import sys


def test_a_library_import_still_registers_the_optimizer_with_keras():
    script = ("import keras_adascale, keras; "
              "print(keras.saving.get_registered_object('keras_adascale>AdaScaleSGD').__name__)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "AdaScaleSGD", result.stderr[-2000:]
