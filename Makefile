# `make demo` and `make test` each create .venv and install the project into it first
# (demo: with the runner and examples extras; test: with the runner, examples and test extras).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2
# pytest-xdist workers for `make test`: one per core of the 2-core CI machine. Each test file runs
# whole on one worker (--dist loadscope), so a module's fixtures are made once.
TEST_WORKERS ?= 2

.PHONY: demo test docs docs-serve compat compat-oldest clean

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

test: $(VENV)/.test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope

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

# What CI runs besides `make test`: the oldest supported pair, the lower bounds of pyproject.toml.
compat-oldest:
	$(PYTHON) tools/compat.py --pairs oldest

clean:
	rm -rf $(VENV) runs site .compat
