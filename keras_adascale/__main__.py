"""`python -m keras_adascale train CONFIG`: the same as the `keras-adascale` console script."""

import sys

from keras_adascale.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
