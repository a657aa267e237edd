"""The `keras-adascale` command line (experiments/cli.py): the comparison table, errors with exit code 2, and
commands that never import TensorFlow."""

import os
import shutil
import subprocess
import sys

import pytest


def test_the_comparison_table_is_printed(finished):
    _, stdout = finished
    table = stdout[stdout.index("run  optimizer"):]
    for run in ("baseline", "adascale", "lsr"):
        assert f"{run} " in table


def imported_packages(command):
    """Runs `python -X importtime ARGS...` and returns (result, the top-level packages it imported)."""
    result = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True, text=True,
                            timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    return result, {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in lines}


def test_help_does_not_import_tensorflow():
    console_script = ("import sys; sys.argv = ['keras-adascale', 'train', '--help']; "
                      "from keras_adascale.experiments.cli import main; main()")
    for command in (["-m", "keras_adascale", "train", "--help"], ["-c", console_script]):
        result, packages = imported_packages(command)
        assert result.returncode == 0 and "optimizer.scale = 1:" in result.stdout
        assert "yaml" in packages and not {"tensorflow", "keras"} & packages


def test_compare_does_not_import_tensorflow(finished, tmp_path):
    experiment, _ = finished
    result, packages = imported_packages(["-m", "keras_adascale", "compare", str(experiment / "adascale"),
                                          str(experiment / "lsr"), "--output", str(tmp_path / "c.png")])
    assert result.returncode == 0 and (tmp_path / "c.png").is_file()
    assert "matplotlib" in packages and not {"tensorflow", "keras"} & packages


def test_training_one_run_compares_every_finished_run_of_the_experiment(finished, tfds_data_dir, tmp_path):
    experiment, _ = finished
    shutil.copytree(experiment, tmp_path / "runs" / "tiny")  # the shared experiment stays as it is
    command = [sys.executable, "-m", "keras_adascale", "train", str(experiment.parent.parent / "tiny.yaml"),
               "--output-dir", str(tmp_path / "runs"), "--set", f"dataset.data_dir={tfds_data_dir}",
               "--only", "lsr", "--overwrite"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.index("run  optimizer"):].splitlines()
    assert [line.split()[0] for line in table[2:5]] == ["baseline", "adascale", "lsr"]


def test_a_config_error_is_named_and_exits_2(tmp_path):
    (tmp_path / "bad.yaml").write_text("optimizer: {scal: 2}\n")
    result = subprocess.run([sys.executable, "-m", "keras_adascale", "train", str(tmp_path / "bad.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown config key 'optimizer.scal'; did you mean 'optimizer.scale'" in result.stderr


def test_compare_on_a_folder_that_is_no_run_is_named_and_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "keras_adascale", "compare", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not a finished run folder" in result.stderr


def test_a_jax_strategy_on_tensorflow_exits_2_naming_the_backend_before_training(tmp_path):
    (tmp_path / "jax.yaml").write_text("strategy: {name: data_parallel, devices: 2}\noptimizer: {scale: 2}\n")
    result = subprocess.run([sys.executable, "-m", "keras_adascale", "train", str(tmp_path / "jax.yaml"),
                             "--output-dir", str(tmp_path / "runs")],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert ("strategy.name=data_parallel (run 'adascale') trains on Keras's jax backend (KERAS_BACKEND=jax), but "
            "Keras runs on tensorflow: on tensorflow, use strategy.name=mirrored or default") in result.stderr
    assert not (tmp_path / "runs").exists()


def test_every_strategy_is_checked_against_the_backend_and_all_wrong_runs_named_at_once():
    from keras_adascale.experiments import config, strategies

    runs = config.resolve({"optimizer": {"scale": 2}, "runs": [
        {"name": "one", "strategy": {"name": "mirrored", "devices": 2}},
        {"name": "two", "strategy": {"name": "mirrored", "devices": 2}},
        {"name": "tpu", "strategy": {"name": "tpu"}},
        {"name": "plain"}]}, name="x")
    strategies.check_backend(runs, backend="tensorflow")
    with pytest.raises(config.ConfigError) as error:
        strategies.check_backend(runs, backend="jax")
    assert str(error.value) == (
        "strategy.name=mirrored (runs 'one', 'two') trains on Keras's tensorflow backend (KERAS_BACKEND=tensorflow), "
        "but Keras runs on jax: on jax, use strategy.name=data_parallel or default; strategy.name=tpu (run 'tpu') "
        "trains on Keras's tensorflow backend (KERAS_BACKEND=tensorflow), but Keras runs on jax: on jax, use "
        "strategy.name=data_parallel or default")
    with pytest.raises(config.ConfigError, match="trains on Keras's TensorFlow or JAX backend, but Keras runs on "
                                                 "its 'torch' backend: set KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax"):
        strategies.check_backend(runs[3:], backend="torch")
