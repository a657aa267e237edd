"""The `keras-adascale` command end to end on real MNIST: a tiny config, three runs, run folders."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from keras_adascale.experiments import cli, config, training

TINY = {
    "total_steps": 40,
    "evaluations": 2,
    "dataset": {"train_split": "train[:5%]", "test_split": "test[:10%]", "batch_size": 16},
    "model": {"name": "mlp", "hidden_units": [32]},
    "schedule": {"name": "constant", "learning_rate": 0.1},
    "optimizer": {"scale": 2},
    "strategy": {"name": "mirrored", "devices": 2},
    "runs": [
        {"name": "baseline", "optimizer": {"name": "sgd", "scale": 1}, "strategy": {"name": "default"}},
        {"name": "adascale"},
        {"name": "lsr", "optimizer": {"name": "lsr"}},
        # S = 4 baseline batches of 8 from N = 2 samples of 16 (one per replica).
        {"name": "adascale_b0", "optimizer": {"scale": 4, "baseline_batch_size": 8}},
    ],
}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tfds_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    (root / "tiny.yaml").write_text("# tiny\n" + yaml.safe_dump(TINY))
    command = [
        sys.executable, "-m", "keras_adascale", "train", str(root / "tiny.yaml"),
        "--output-dir", str(root / "runs"), "--set", f"dataset.data_dir={tfds_data_dir}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs" / "tiny", result.stdout


def test_each_run_leaves_a_complete_folder(finished):
    experiment, _ = finished
    assert sorted(path.name for path in experiment.iterdir()) == [
        "adascale", "adascale_b0", "baseline", "comparison.png", "lsr"]
    for run in ("adascale", "adascale_b0", "baseline", "lsr"):
        files = {path.name for path in (experiment / run).iterdir()}
        assert files == {"config.json", "metrics.jsonl", "evaluations.jsonl", "final.json", "model.keras",
                         "curves.png", "gain_lr.png"}
        assert json.loads((experiment / run / "config.json").read_text())["run"] == run


def test_update_counts_follow_each_optimizers_rule(finished):
    experiment, _ = finished
    finals = {run: json.loads((experiment / run / "final.json").read_text()) for run in ("adascale", "baseline", "lsr")}
    assert finals["baseline"]["updates"] == 40  # plain SGD: T updates
    assert finals["lsr"]["updates"] == 20  # linear scaling rule: T / S updates
    assert 20 <= finals["adascale"]["updates"] <= 40  # gain in [1, S]
    assert finals["adascale"]["tau"] >= 40
    assert (finals["adascale"]["replicas"], finals["adascale"]["accumulation"]) == (2, 1)
    for final in finals.values():
        assert final["test_accuracy"] > 0.5  # real digits; chance is 0.1


def test_metrics_have_one_row_per_update_and_consistent_columns(finished):
    experiment, _ = finished
    rows = read_jsonl(experiment / "adascale" / "metrics.jsonl")
    final = json.loads((experiment / "adascale" / "final.json").read_text())
    assert [row["update"] for row in rows] == list(range(1, final["updates"] + 1))
    taus = [row["tau"] for row in rows]
    gains = [row["gain"] for row in rows]
    assert all(1.0 <= gain <= 2.0 for gain in gains)
    # tau advances by each update's gain
    assert taus[-1] == pytest.approx(sum(gains), rel=1e-5)
    # the effective rate is the gain times the constant single-batch rate
    assert all(row["learning_rate"] == pytest.approx(0.1 * row["gain"], rel=1e-5) for row in rows)
    assert all(row["loss"] > 0 for row in rows)
    assert rows[-1]["examples"] == final["updates"] * 2 * 16
    evaluations = read_jsonl(experiment / "adascale" / "evaluations.jsonl")
    assert len(evaluations) == 2 and evaluations[-1]["tau"] >= 40


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


def test_help_and_compare_do_not_import_tensorflow(finished, tmp_path):
    experiment, _ = finished
    console_script = ("import sys; sys.argv = ['keras-adascale', 'train', '--help']; "
                      "from keras_adascale.experiments.cli import main; main()")
    for command in (["-m", "keras_adascale", "train", "--help"], ["-c", console_script]):
        result, packages = imported_packages(command)
        assert result.returncode == 0 and "optimizer.scale = 1:" in result.stdout
        assert "yaml" in packages and not {"tensorflow", "keras"} & packages
    result, packages = imported_packages(["-m", "keras_adascale", "compare", str(experiment / "adascale"),
                                          str(experiment / "lsr"), "--output", str(tmp_path / "c.png")])
    assert result.returncode == 0 and (tmp_path / "c.png").is_file()
    assert "matplotlib" in packages and not {"tensorflow", "keras"} & packages


def test_a_library_import_still_registers_the_optimizer_with_keras():
    script = ("import keras_adascale, keras; "
              "print(keras.saving.get_registered_object('keras_adascale>AdaScaleSGD').__name__)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "AdaScaleSGD", result.stderr[-2000:]


def test_training_one_run_compares_every_finished_run_of_the_experiment(finished, tfds_data_dir):
    experiment, _ = finished
    command = [sys.executable, "-m", "keras_adascale", "train", str(experiment.parent.parent / "tiny.yaml"),
               "--output-dir", str(experiment.parent), "--set", f"dataset.data_dir={tfds_data_dir}",
               "--only", "lsr", "--overwrite"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.index("run  optimizer"):].splitlines()
    assert [line.split()[0] for line in table[2:5]] == ["baseline", "adascale", "lsr"]


def test_an_existing_finished_run_is_not_overwritten_without_asking(finished):
    experiment, _ = finished
    run = config.resolve(TINY, name="tiny")[1]
    with pytest.raises(config.ConfigError, match="exists; pass --overwrite"):
        training.train(run, experiment.parent)


def test_an_interrupted_run_with_another_config_is_refused_naming_the_keys_that_differ(tmp_path):
    run = config.resolve(TINY, name="tiny")[1]
    started = json.loads(json.dumps(run))
    started["optimizer"]["momentum"], started["seed"] = 0.5, 7
    (tmp_path / "tiny" / "adascale.incomplete").mkdir(parents=True)
    (tmp_path / "tiny" / "adascale.incomplete" / "config.json").write_text(json.dumps(started))
    with pytest.raises(config.ConfigError) as error:
        training.train(run, tmp_path)
    assert "another config (optimizer.momentum: 0.5 there, 0.9 now, seed: 7 there, 0 now)" in str(error.value)


def test_cli_errors_name_the_problem_and_exit_2(tmp_path):
    (tmp_path / "bad.yaml").write_text("optimizer: {scal: 2}\n")
    result = subprocess.run([sys.executable, "-m", "keras_adascale", "train", str(tmp_path / "bad.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown config key 'optimizer.scal'; did you mean 'scale'" in result.stderr
    result = subprocess.run([sys.executable, "-m", "keras_adascale", "compare", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not a finished run folder" in result.stderr


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(tfds_data_dir, tmp_path):
    import signal
    import time

    import keras

    config = {
        "total_steps": 240, "evaluations": 8,
        "dataset": {"train_split": "train[:5%]", "test_split": "test[:5%]", "batch_size": 16},
        "model": {"name": "mlp", "hidden_units": [32]},
        "schedule": {"name": "piecewise_constant", "learning_rate": 0.1, "decay_at": [0.5]},
        "optimizer": {"scale": 2},
    }
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(config))

    def command(output):
        return [sys.executable, "-m", "keras_adascale", "train", str(tmp_path / "resume.yaml"),
                "--output-dir", str(output), "--set", f"dataset.data_dir={tfds_data_dir}"]

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run(command(tmp_path / "straight"), check=True, capture_output=True, timeout=300, env=env)

    process = subprocess.Popen(command(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    incomplete = tmp_path / "killed" / "resume" / "adascale.incomplete"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # kill it once a few epochs are backed up
            metadata = incomplete / "backup" / "training_metadata.json"
            if metadata.exists() and json.loads(metadata.read_text())["epoch"] >= 3:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the run never reached its third epoch")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert incomplete.exists() and not (tmp_path / "killed" / "resume" / "adascale").exists()
    epochs_backed_up = json.loads((incomplete / "backup" / "training_metadata.json").read_text())["epoch"]
    resumed_run = subprocess.run(command(tmp_path / "killed"), check=True, capture_output=True, text=True,
                                 timeout=300, env=env)
    # 240 steps in 8 evaluations at S = 2: 15 updates per epoch
    assert (f"resuming resume/adascale from epoch {epochs_backed_up} (after {epochs_backed_up} epochs, "
            f"{15 * epochs_backed_up} updates)") in resumed_run.stdout

    straight, resumed = (keras.models.load_model(tmp_path / name / "resume" / "adascale" / "model.keras")
                         for name in ("straight", "killed"))
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(straight.optimizer.variables, resumed.optimizer.variables):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7, err_msg=a.path)
    rows = [read_jsonl(tmp_path / name / "resume" / "adascale" / "metrics.jsonl") for name in ("straight", "killed")]
    assert [row["update"] for row in rows[1]] == [row["update"] for row in rows[0]]  # no update logged twice
    assert [row["loss"] for row in rows[1]] == pytest.approx([row["loss"] for row in rows[0]], rel=1e-4)


def test_a_baseline_batch_sets_scale_apart_from_samples(finished):
    experiment, stdout = finished
    final = json.loads((experiment / "adascale_b0" / "final.json").read_text())
    assert (final["scale"], final["samples"], final["batch_size"], final["baseline_batch_size"]) == (4, 2, 16, 8)
    assert "S = 4 baseline batches of 8 per update: N = 2 gradient samples of 16 examples" in stdout
    gains = [row["gain"] for row in read_jsonl(experiment / "adascale_b0" / "metrics.jsonl")]
    assert all(1.0 <= gain <= 4.0 for gain in gains) and max(gains) > 2.0  # only S = 4, not N = 2, allows it
    assert 10 <= final["updates"] <= 40  # T_SI = 40 at a gain in [1, 4]


def test_metrics_record_the_gradient_statistics(finished):
    experiment, _ = finished
    for row in read_jsonl(experiment / "adascale" / "metrics.jsonl"):
        assert row["gradient_variance"] >= 0 and row["gradient_sqr_norm"] > 0
        assert row["gradient_noise_scale"] == pytest.approx(row["gradient_variance"] / row["gradient_sqr_norm"])
        s = 2.0  # the run's scale: the recorded gain is r(S) of the recorded averages
        v, m = row["gradient_variance"], row["gradient_sqr_norm"]
        assert row["gain"] == pytest.approx((v + m) / (v / s + m), rel=1e-5)


def advise(run_dir, *options):
    return subprocess.run([sys.executable, "-m", "keras_adascale", "advise", str(run_dir), *options],
                          capture_output=True, text=True, timeout=120)


def table_rows(stdout):
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["S", "updates"]) + 2
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        cells = line.split()
        rows[float(cells[0])] = {"updates": int(cells[1]), "examples": int(cells[2].replace(",", "")),
                                 "efficiency": float(cells[3].rstrip("%")) / 100}
    return rows


@pytest.mark.parametrize("run", ["adascale", "adascale_b0"])
def test_advise_reproduces_the_runs_own_update_count(finished, run):
    experiment, _ = finished
    result = advise(experiment / run, "--scales", "1,2,4,8,64")
    assert result.returncode == 0, result.stderr
    final = json.loads((experiment / run / "final.json").read_text())
    rows = table_rows(result.stdout)
    assert sorted(rows) == sorted({1.0, 2.0, 4.0, 8.0, 64.0, float(final["scale"])})
    own = rows[float(final["scale"])]
    assert own["updates"] == pytest.approx(final["updates"], rel=0.02)
    assert rows[1.0]["updates"] == 40 and rows[1.0]["efficiency"] == 1.0  # S = 1: T_SI updates, no loss
    updates = [rows[s]["updates"] for s in sorted(rows)]
    assert updates == sorted(updates, reverse=True) and rows[64.0]["updates"] >= 1
    assert rows[8.0]["examples"] == rows[8.0]["updates"] * 8 * final["baseline_batch_size"]
    assert "critical scale: S = " in result.stdout and "B_simple" in result.stdout
    assert (experiment / run / "advice.png").stat().st_size > 10_000


def test_advise_uses_measured_step_times_and_refuses_other_runs(finished):
    experiment, _ = finished
    result = advise(experiment / "adascale", "--scales", "2,8", "--step-time", "8=0.5")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["8"])
    updates = int(line.split()[1])
    assert "500.0 ms" in line and f"{updates * 0.5:.1f} s" in line
    result = advise(experiment / "lsr")
    assert result.returncode == 2 and "advise needs an AdaScale run" in result.stderr
    result = advise(experiment / "adascale", "--step-time", "8")
    assert result.returncode == 2 and "expected S=SECONDS" in result.stderr


def test_char_lm_trains_on_python_chars_and_records_bits_per_character(python_chars_data_dir, tmp_path, capsys):
    lm = {
        "total_steps": 6, "evaluations": 2,
        "dataset": {"name": "python_chars", "data_dir": str(python_chars_data_dir), "train_split": "train[:1000]",
                    "test_split": "validation[:200]", "input_feature": "inputs", "target_feature": "targets",
                    "batch_size": 8, "shuffle_buffer": 100},
        "model": {"name": "char_lm"},
        "schedule": {"name": "constant", "learning_rate": 0.03},
        "optimizer": {"name": "sgd"},
    }
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(lm))
    assert cli.main(["train", str(tmp_path / "lm.yaml"), "--output-dir", str(tmp_path / "runs")]) == 0
    run_dir = tmp_path / "runs" / "lm" / "sgd"
    final = json.loads((run_dir / "final.json").read_text())
    evaluations = read_jsonl(run_dir / "evaluations.jsonl")
    assert final["updates"] == 6 and len(evaluations) == 2 and final["test_loss"] == evaluations[-1]["test_loss"]
    for row in evaluations + [final]:
        assert row["test_bits_per_character"] == pytest.approx(row["test_loss"] / math.log(2), rel=1e-12)
        assert 0 < row["test_accuracy"] < 1  # per character
        assert 0 < row["test_bits_per_character"] < 9  # ~8 = log2(256) for the untrained model
    stdout = capsys.readouterr().out
    header, _, row = stdout[stdout.index("run  optimizer"):].splitlines()[:3]
    assert header.split()[-4:] == ["test", "bpc", "wall", "s"]
    assert row.split()[0] == "sgd" and row.split()[-2] == f"{final['test_bits_per_character']:.4f}"
