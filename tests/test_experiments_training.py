"""One run of the runner (`training.train`): its folder, its updates, resuming it, refusing to overwrite it;
the optimizer plans (`training.plan`) of the Adam family."""

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import yaml

import keras_adascale
from conftest import TINY, assert_same_finished_models, read_jsonl, straight_and_killed
from keras_adascale.experiments import cli, config, data, models, training


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


def test_each_run_learns_the_digits(finished):
    experiment, _ = finished
    for run in ("adascale", "baseline", "lsr"):
        assert json.loads((experiment / run / "final.json").read_text())["test_accuracy"] > 0.5  # chance is 0.1


def test_an_existing_finished_run_is_not_overwritten_without_asking(finished):
    experiment, _ = finished
    run = config.resolve(TINY, name="tiny")[1]
    with pytest.raises(config.ConfigError, match="exists; pass --overwrite"):
        training.train(run, experiment.parent)


def test_a_finished_run_is_found_only_for_the_config_it_was_trained_from(finished):
    experiment, _ = finished
    run = json.loads((experiment / "adascale" / "config.json").read_text())
    assert training.finished_run(run, experiment.parent) == experiment / "adascale"
    other = json.loads(json.dumps(run))
    other["optimizer"]["momentum"] = 0.5
    assert training.finished_run(other, experiment.parent) is None
    assert training.finished_run({**run, "run": "not_trained"}, experiment.parent) is None


def test_an_interrupted_run_with_another_config_is_refused_naming_the_keys_that_differ(tmp_path):
    run = config.resolve(TINY, name="tiny")[1]
    started = json.loads(json.dumps(run))
    started["optimizer"]["momentum"], started["seed"] = 0.5, 7
    (tmp_path / "tiny" / "adascale.incomplete").mkdir(parents=True)
    (tmp_path / "tiny" / "adascale.incomplete" / "config.json").write_text(json.dumps(started))
    with pytest.raises(config.ConfigError) as error:
        training.train(run, tmp_path)
    assert "another config (optimizer.momentum: 0.5 there, 0.9 now, seed: 7 there, 0 now)" in str(error.value)


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(tfds_data_dir, tmp_path):
    recipe = {
        "total_steps": 240, "evaluations": 8,
        "dataset": {"train_split": "train[:5%]", "test_split": "test[:5%]", "batch_size": 16},
        "model": {"name": "mlp", "hidden_units": [32]},
        "schedule": {"name": "piecewise_constant", "learning_rate": 0.1, "decay_at": [0.5]},
        "optimizer": {"scale": 2},
    }
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(recipe))

    def command(output):
        return [sys.executable, "-m", "keras_adascale", "train", str(tmp_path / "resume.yaml"),
                "--output-dir", str(output), "--set", f"dataset.data_dir={tfds_data_dir}"]

    straight, killed, epochs_backed_up = straight_and_killed(
        command, lambda output: output / "resume" / "adascale.incomplete", tmp_path)
    assert (killed / "resume" / "adascale.incomplete").exists() and not (killed / "resume" / "adascale").exists()
    resumed_run = subprocess.run(command(killed), check=True, capture_output=True, text=True,
                                 timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    # 240 steps in 8 evaluations at S = 2: 15 updates per epoch
    assert (f"resuming resume/adascale from epoch {epochs_backed_up} (after {epochs_backed_up} epochs, "
            f"{15 * epochs_backed_up} updates)") in resumed_run.stdout
    assert_same_finished_models(straight / "resume" / "adascale" / "model.keras",
                                killed / "resume" / "adascale" / "model.keras")
    rows = [read_jsonl(folder / "resume" / "adascale" / "metrics.jsonl") for folder in (straight, killed)]
    assert [row["update"] for row in rows[1]] == [row["update"] for row in rows[0]]  # no update logged twice
    assert [row["loss"] for row in rows[1]] == pytest.approx([row["loss"] for row in rows[0]], rel=1e-4)


def test_a_run_whose_backup_was_cut_short_is_refused_in_the_runners_words(tfds_data_dir, tmp_path):
    recipe = {
        "total_steps": 40, "evaluations": 2,
        "dataset": {"train_split": "train[:5%]", "test_split": "test[:5%]", "batch_size": 16,
                    "data_dir": str(tfds_data_dir)},
        "model": {"name": "mlp", "hidden_units": [32]},
        "optimizer": {"scale": 2},
    }
    (run,) = config.resolve(recipe, name="cut")
    # An interrupted run of this very config, killed while Keras's BackupAndRestore wrote its weights.
    incomplete = tmp_path / "cut" / "adascale.incomplete"
    (incomplete / "backup").mkdir(parents=True)
    (incomplete / "config.json").write_text(json.dumps(run))
    model = models.build(run["model"], *data.describe(run["dataset"]))
    model.compile(optimizer=training.plan(run, 1).optimizer, loss="sparse_categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
    weights = incomplete / "backup" / "latest.weights.h5"
    model.save_weights(weights)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (incomplete / "backup" / "training_metadata.json").write_text(json.dumps({"epoch": 1, "batch": 0}))
    with pytest.raises(config.ConfigError) as error:
        training.train(run, tmp_path)
    message = str(error.value)
    assert message.startswith(f"cannot resume from {weights}: the backup is unreadable (")
    assert "truncated file" in message  # h5py's diagnosis, quoted
    assert message.endswith(f"Delete {incomplete} to train the run from the start")


def test_a_backup_cut_between_its_weights_and_its_metadata_resumes_the_epoch_it_names(tmp_path, monkeypatch):
    def compiled():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer="sgd", loss="mse")
        return model

    model = compiled()
    saving = training._ChiefBackupAndRestore(str(tmp_path / "backup"), is_chief=True)
    saving.set_model(model)
    saving.on_epoch_end(1)  # the backup after epoch 2
    after_two = model.get_weights()
    model.set_weights([w + 1.0 for w in after_two])

    def killed(*args):  # the process dies once epoch 3's weights are written, before its metadata is
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        saving.on_epoch_end(2)
    monkeypatch.undo()

    resumed = compiled()
    restoring = training._ChiefBackupAndRestore(str(tmp_path / "backup"), is_chief=True)
    restoring.set_model(resumed)
    restoring.on_train_begin()
    assert resumed._initial_epoch == 2
    for restored, saved in zip(resumed.get_weights(), after_two, strict=True):
        np.testing.assert_array_equal(restored, saved)  # epoch 2's weights, not epoch 3's


def test_a_baseline_batch_sets_scale_apart_from_samples(finished):
    experiment, stdout = finished
    final = json.loads((experiment / "adascale_b0" / "final.json").read_text())
    assert (final["scale"], final["samples"], final["batch_size"], final["baseline_batch_size"]) == (4, 2, 16, 8)
    assert "S = 4 baseline batches of 8 per update: N = 2 gradient samples of 16 examples" in stdout
    gains = [row["gain"] for row in read_jsonl(experiment / "adascale_b0" / "metrics.jsonl")]
    assert all(1.0 <= gain <= 4.0 for gain in gains) and max(gains) > 2.0  # only S = 4, not N = 2, allows it
    assert 10 <= final["updates"] <= 40  # T_SI = 40 at a gain in [1, 4]


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


PLAN_STEPS, PLAN_SCALE = 400, 4


def planned(name, replicas=1, **optimizer):
    raw = {"total_steps": PLAN_STEPS, "schedule": {"name": "constant", "learning_rate": 0.002},
           "optimizer": {"name": name, "scale": PLAN_SCALE, **optimizer}}
    (run,) = config.resolve(raw, name="plan")
    return training.plan(run, replicas)


def test_adascale_adam_takes_n_samples_and_its_statistics():
    steps = planned("adascale_adam", statistics="preconditioned", beta_2=0.99)
    assert isinstance(steps.optimizer, keras_adascale.AdaScaleAdam)
    assert steps.optimizer.statistics == "preconditioned" and steps.optimizer.beta_2 == 0.99
    assert (steps.accumulation, steps.batch_size) == (PLAN_SCALE, 32)
    assert (steps.min_updates, steps.max_updates) == (PLAN_STEPS // PLAN_SCALE, PLAN_STEPS)


@pytest.mark.parametrize(
    "name, rate, beta_1, beta_2, epsilon, updates",
    [
        ("adam", 0.002, 0.9, 0.999, 1e-7, PLAN_STEPS),
        ("adam_fixed", 0.002, 0.9, 0.999, 1e-7, PLAN_STEPS // PLAN_SCALE),
        ("adam_linear", 0.002 * PLAN_SCALE, 0.9, 0.999, 1e-7, PLAN_STEPS // PLAN_SCALE),
        # Malladi et al.'s square-root rule at kappa = S = 4: 1 - beta x 4, epsilon / 2.
        ("adam_sqrt", 0.002 * 2, 0.6, 0.996, 5e-8, PLAN_STEPS // PLAN_SCALE),
    ],
)
def test_each_adam_baseline_scales_as_its_rule_says(name, rate, beta_1, beta_2, epsilon, updates):
    steps = planned(name)
    optimizer = steps.optimizer
    assert type(optimizer) is keras.optimizers.Adam
    assert float(optimizer.learning_rate) == pytest.approx(rate, rel=1e-6)
    assert (optimizer.beta_1, optimizer.beta_2) == (pytest.approx(beta_1), pytest.approx(beta_2))
    assert optimizer.epsilon == pytest.approx(epsilon)
    assert steps.min_updates == steps.max_updates == updates
    assert steps.batch_size == PLAN_SCALE * 32 and steps.accumulation == 1


def test_the_square_root_rule_caps_one_minus_beta_at_one():
    optimizer = planned("adam_sqrt", beta_1=0.5).optimizer  # 1 - beta_1 = 0.5 x 4 > 1
    assert optimizer.beta_1 == 0.0 and optimizer.epsilon == pytest.approx(1e-7 / math.sqrt(PLAN_SCALE))
