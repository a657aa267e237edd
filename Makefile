# `make demo` and `make test` each create .venv and install the project into it first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[examples,test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/keras-adascale train saved_configs/demo.yaml --overwrite

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
