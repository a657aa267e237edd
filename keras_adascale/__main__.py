"""`keras-adascale` and `python -m keras_adascale`: the runner's command line, once its packages are there."""

import importlib.util
import sys

# What the runner imports beyond the optimizer's needs: the `runner` extra (module -> distribution).
RUNNER_PACKAGES = {
    "yaml": "pyyaml",
    "matplotlib": "matplotlib",
    "tensorflow_datasets": "tensorflow-datasets",
    "importlib_resources": "importlib_resources",
}


def missing_runner_packages():
    """The distributions of the `runner` extra that are not installed (found without importing them)."""
    return [dist for module, dist in RUNNER_PACKAGES.items() if importlib.util.find_spec(module) is None]


def main(argv=None):
    """Entry point of the `keras-adascale` console script: exits 2 without the `runner` extra."""
    missing = missing_runner_packages()
    if missing:
        print(
            f"keras-adascale: error: the experiment runner needs {', '.join(RUNNER_PACKAGES.values())}, which "
            f"`pip install keras-adascale` leaves out (missing here: {', '.join(missing)}). Install them "
            "with: pip install 'keras-adascale[runner]'",
            file=sys.stderr,
        )
        return 2
    from keras_adascale.experiments import cli

    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
