"""The private Keras / TensorFlow names the package relies on (keras_adascale/_private_api.py): all there on
the installed releases, and none used that the list leaves out."""

import ast
import importlib
import inspect
import pathlib
import pkgutil

import keras
import pytest
import tensorflow as tf

import keras_adascale
from keras_adascale import _private_api

PACKAGE = pathlib.Path(keras_adascale.__file__).parent
# Private-looking names that are public API of their owners.
PUBLIC = {
    "_replace": "NamedTuple's method",
    "_fields": "NamedTuple's attribute",
    "_asdict": "NamedTuple's method",
    "_core": "numpy's module, named in bundled_mnist's pickle allow-list",
    "_reconstruct": "numpy's function, named in bundled_mnist's pickle allow-list",
}


def test_every_private_name_the_package_uses_is_there():
    problems = _private_api.missing()
    assert problems == [], "\n".join(problems)


def test_a_missing_name_is_reported_with_its_owner_the_versions_and_its_user():
    entry = _private_api.PrivateName("a built keras.optimizers.SGD", "_no_such_hook", "backend/tensorflow/mechanics.py", "a test")
    (message,) = _private_api.missing([entry])
    assert "a built keras.optimizers.SGD has no `_no_such_hook`" in message
    assert f"Keras {keras.version()} with TensorFlow {tf.__version__}" in message
    assert "backend/tensorflow/mechanics.py" in message


def test_a_name_needed_only_by_older_keras_is_not_checked_on_newer_ones():
    entry = _private_api.PrivateName("keras.Variable(0.0)", "_gone", "backend/tensorflow/mechanics.py", "a test", keras_below=(3, 0))
    assert _private_api.missing([entry]) == []


def _sources():
    return sorted(path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def _private_reads_and_definitions():
    """(private attributes the package reads from upstream objects, private names it defines itself)."""
    upstream, defined = set(), set()
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    for leaf in ast.walk(target):
                        if isinstance(leaf, ast.Attribute):
                            defined.add(leaf.attr)
                        elif isinstance(leaf, ast.Name):
                            defined.add(leaf.id)
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                through_super = isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "super"
                upstream.add((node.attr, through_super))
    return upstream, defined


def test_every_private_attribute_the_package_reads_from_keras_or_tensorflow_is_listed():
    upstream, defined = _private_reads_and_definitions()
    listed = {entry.name for entry in _private_api.NAMES}
    # A name the package defines is its own, unless it reaches it through super() (Keras's).
    unlisted = sorted(name for name, through_super in upstream
                      if (through_super or name not in defined) and name not in listed and name not in PUBLIC)
    assert unlisted == [], f"private names used but not listed in keras_adascale/_private_api.py: {unlisted}"


def test_every_private_keras_method_the_package_overrides_is_listed():
    listed = {entry.name for entry in _private_api.NAMES}
    overridden = set()
    for module_info in pkgutil.walk_packages([str(PACKAGE)], "keras_adascale."):
        try:
            module = importlib.import_module(module_info.name)
        except ImportError:  # the runner's modules need its extra (yaml, matplotlib, tfds)
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if not cls.__module__.startswith("keras_adascale"):
                continue
            # Keras's and TensorFlow's (tensorflow_datasets's `_info` / `_split_generators` are its
            # documented builder hooks).
            upstream_bases = [base for base in cls.__mro__ if base.__module__.startswith(("keras.", "tensorflow."))]
            own_names = {name for own in cls.__mro__ if own.__module__.startswith("keras_adascale") for name in vars(own)}
            for name in own_names:
                if (name.startswith("_") and not name.startswith("__") and name != "_abc_impl"
                        and any(hasattr(base, name) for base in upstream_bases)):
                    overridden.add(name)
    assert overridden - listed == set(), f"overrides of private upstream names not listed: {overridden - listed}"


def test_private_upstream_modules_are_imported_only_where_listed():
    owners = {entry.owner for entry in _private_api.NAMES}
    imported = set()
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                    ("keras.src", "tensorflow.python")):
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names
                                if alias.name.startswith(("keras.src", "tensorflow.python")))
    assert imported <= owners, f"private modules imported but not listed: {imported - owners}"


@pytest.mark.parametrize("entry", _private_api.NAMES, ids=lambda entry: f"{entry.owner}.{entry.name}")
def test_each_listed_name_says_where_and_why(entry):
    assert entry.owner in _private_api._OWNERS
    assert entry.used_by and entry.why
    for used_in in entry.used_by.split(", "):
        path = used_in.split(" ")[0]
        if path != "tests":
            assert (PACKAGE / path).exists(), f"{entry.name}: no {path} in the package"
