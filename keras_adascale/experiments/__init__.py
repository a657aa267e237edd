"""The experiment runner behind `keras-adascale train` and `keras-adascale compare`."""
