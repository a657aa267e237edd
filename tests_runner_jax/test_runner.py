"""`keras-adascale train` on JAX: data_parallel runs (keras.distribution.DataParallel over 4 host devices) with
AdaScaleModel, their folders, resuming a killed run, choosing S during training, and the refusals."""

import json
import math

import keras
import numpy as np
import pytest
import yaml

import keras_adascale
from conftest import ENV, assert_same_finished_models, read_jsonl, run, straight_and_killed, train_command
from conftest import TINY as TENSORFLOW_TINY

# The TensorFlow tests' tiny experiment on 4 devices under DataParallel, with an auto-scale run.
TINY = {
    **TENSORFLOW_TINY,
    "optimizer": {"scale": 4},
    "strategy": {"name": "data_parallel", "devices": 4},
    "runs": [
        {"name": "baseline", "optimizer": {"name": "sgd", "scale": 1}, "strategy": {"name": "default"}},
        {"name": "adascale"},
        {"name": "lsr", "optimizer": {"name": "lsr"}},
        # S chosen during training: 4 x k for k in 1, 2, 4 accumulation steps of the 4 replicas.
        {"name": "adascale_auto", "optimizer": {"scale": "auto"},
         "autoscale": {"max_scale": 16, "update_cost": 64.0, "warmup": 4, "decisions": 8}},
    ],
}
RUN_FILES = {"config.json", "metrics.jsonl", "evaluations.jsonl", "final.json", "model.keras", "curves.png",
             "gain_lr.png"}


@pytest.fixture(scope="module")
def finished(tfds_data_dir, tmp_path_factory):
    """TINY trained by `python -m keras_adascale train` with its defaults: `(experiment folder, stdout)`."""
    root = tmp_path_factory.mktemp("runner")
    (root / "tiny.yaml").write_text("# tiny\n" + yaml.safe_dump(TINY))
    result = run(train_command(root / "tiny.yaml", root / "runs", f"dataset.data_dir={tfds_data_dir}"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs" / "tiny", result.stdout


def final(experiment, name):
    return json.loads((experiment / name / "final.json").read_text())


def test_each_run_leaves_a_complete_folder_and_the_comparison(finished):
    experiment, stdout = finished
    assert sorted(path.name for path in experiment.iterdir()) == [
        "adascale", "adascale_auto", "baseline", "comparison.png", "lsr"]
    for name in ("adascale", "adascale_auto", "baseline", "lsr"):
        assert {path.name for path in (experiment / name).iterdir()} == RUN_FILES
    assert "adascale at S=4 on data_parallel" in stdout
    assert "N = 4 gradient samples of 16 examples (4 replicas x 1 accumulation steps)" in stdout
    assert "100.0% (40/40 scale-invariant steps)" in stdout  # the default progress lines (not a terminal)


def test_adascale_takes_one_sample_per_device_and_its_gain(finished):
    experiment, _ = finished
    adascale = final(experiment, "adascale")
    assert (adascale["replicas"], adascale["accumulation"], adascale["samples"]) == (4, 1, 4)
    assert adascale["tau"] >= 40 and 10 <= adascale["updates"] <= 40  # gain in [1, S]
    # Per-replica statistics: four different gradient samples per update, so a gain above 1 from the start
    # (Keras's own step would give the optimizer one all-reduced gradient, and the model refuses that).
    rows = read_jsonl(experiment / "adascale" / "metrics.jsonl")
    assert [row["samples"] for row in rows] == [4] * len(rows)
    assert all(1.0 < row["gain"] <= 4.0 for row in rows[1:])
    assert adascale["updates"] < 40 and adascale["mean_gain"] > 1.0
    for name in ("gradient_variance", "gradient_sqr_norm", "gradient_noise_scale"):
        assert all(math.isfinite(row[name]) and row[name] > 0 for row in rows), name


def test_the_other_optimizers_follow_their_rules_under_data_parallel(finished):
    experiment, _ = finished
    assert final(experiment, "baseline")["updates"] == 40  # plain SGD on one device: T updates
    lsr = final(experiment, "lsr")
    assert (lsr["updates"], lsr["replicas"]) == (10, 4)  # T / S updates of a global batch of 4 x 16
    for name in ("adascale", "adascale_auto", "baseline", "lsr"):
        assert final(experiment, name)["test_accuracy"] > 0.5, name  # chance is 0.1


def test_the_saved_adascale_model_is_an_adascale_model_that_resumes_where_it_ended(finished):
    experiment, _ = finished
    model = keras.models.load_model(experiment / "adascale" / "model.keras")
    assert isinstance(model, keras_adascale.AdaScaleModel)
    assert isinstance(model.optimizer, keras_adascale.AdaScaleSGD)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == final(experiment, "adascale")["updates"]
    rows = read_jsonl(experiment / "adascale" / "metrics.jsonl")
    tau = float(keras.ops.convert_to_numpy(model.optimizer.scale_invariant_iterations))
    assert tau == pytest.approx(rows[-1]["tau"], rel=1e-6)
    # the other optimizers' runs are Keras's own models
    assert type(keras.models.load_model(experiment / "lsr" / "model.keras")).__name__ == "Sequential"


def test_an_auto_scale_run_changes_its_accumulation_on_the_replicas(finished):
    experiment, _ = finished
    auto = final(experiment, "adascale_auto")
    rows = read_jsonl(experiment / "adascale_auto" / "metrics.jsonl")
    assert auto["scale_setting"] == "auto" and auto["replicas"] == 4
    assert {row["samples"] for row in rows} <= {4, 8, 16}
    assert all(row["scale"] == row["samples"] for row in rows)  # S = N: B is the baseline batch
    assert auto["max_scale_used"] > auto["min_scale_used"] == 4  # it chose a larger S than it started at
    assert rows[-1]["tau"] >= 40


def test_a_killed_data_parallel_run_resumes_and_ends_where_an_uninterrupted_run_ends(tfds_data_dir, tmp_path):
    recipe = {
        "total_steps": 240, "evaluations": 8,
        "dataset": {"train_split": "train[:5%]", "test_split": "test[:5%]", "batch_size": 16},
        "model": {"name": "mlp", "hidden_units": [32]},
        "schedule": {"name": "piecewise_constant", "learning_rate": 0.1, "decay_at": [0.5]},
        "optimizer": {"scale": 4},
        "strategy": {"name": "data_parallel", "devices": 4},
    }
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(recipe))

    def command(output):
        return train_command(tmp_path / "resume.yaml", output, f"dataset.data_dir={tfds_data_dir}")

    straight, killed, epochs_backed_up = straight_and_killed(
        command, lambda output: output / "resume" / "adascale.incomplete", tmp_path, epochs=2, timeout=300, env=ENV)
    assert not (killed / "resume" / "adascale").exists()
    resumed = run(command(killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # 240 steps in 8 evaluations at S = 4: at least 60 updates, so 8 per epoch
    assert (f"resuming resume/adascale from epoch {epochs_backed_up} (after {epochs_backed_up} epochs, "
            f"{8 * epochs_backed_up} updates)") in resumed.stdout
    assert_same_finished_models(straight / "resume" / "adascale" / "model.keras",
                                killed / "resume" / "adascale" / "model.keras")
    rows = [read_jsonl(folder / "resume" / "adascale" / "metrics.jsonl") for folder in (straight, killed)]
    assert [row["update"] for row in rows[1]] == [row["update"] for row in rows[0]]  # no update logged twice
    assert [row["loss"] for row in rows[1]] == pytest.approx([row["loss"] for row in rows[0]], rel=1e-4)


@pytest.mark.parametrize("setting, message", [
    ({"runs": None, "strategy": {"name": "mirrored", "devices": 2}},
     "strategy.name=mirrored (run 'adascale') trains on Keras's tensorflow backend (KERAS_BACKEND=tensorflow), but "
     "Keras runs on jax: on jax, use strategy.name=data_parallel or default"),
    # the baseline (one device) could evaluate it, but nothing trains: every run is checked first
    ({"dataset": {**TINY["dataset"], "test_split": "test[:1001]"}},
     "dataset.test_split: 'test[:1001]' holds 1001 examples, which strategy.name=data_parallel cannot split evenly "
     "over 4 devices (keras.distribution splits every batch evenly); choose a test split of a multiple of 4 "
     "examples, e.g. 'test[:1000]'"),
])
def test_what_cannot_run_on_jax_exits_2_naming_it_before_anything_trains(tfds_data_dir, tmp_path, setting, message):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**TINY, **setting}))
    result = run(train_command(tmp_path / "bad.yaml", tmp_path / "runs", f"dataset.data_dir={tfds_data_dir}"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_groups_on_one_device_end_where_accumulation_on_the_same_rows_ends(tfds_data_dir, tmp_path):
    """optimizer.groups=4 on one device (AdaScaleModel(groups=4): one batch of 4 x 16 rows per update, N = 4 from
    its groups) and accumulation (4 micro-batches of 16 rows): the same rows, the same updates, tau and weights."""
    recipe = {
        "total_steps": 60, "evaluations": 2,
        "dataset": {"train_split": "train[:5%]", "test_split": "test[:5%]", "batch_size": 16},
        "model": {"name": "mlp", "hidden_units": [32]},
        "schedule": {"name": "constant", "learning_rate": 0.1},
        "optimizer": {"scale": 4},
        "strategy": {"name": "default"},
        "runs": [{"name": "grouped", "optimizer": {"groups": 4}}, {"name": "accumulated"}],
    }
    (tmp_path / "groups.yaml").write_text(yaml.safe_dump(recipe))
    result = run(train_command(tmp_path / "groups.yaml", tmp_path / "runs", f"dataset.data_dir={tfds_data_dir}"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("S = 4 baseline batches of 16 per update: N = 4 gradient samples of 16 examples (1 replicas x 4 groups "
            "x 1 accumulation steps)") in result.stdout
    assert "1 x 1 (4 groups)" in result.stdout  # the comparison table's replicas x accumulation cell
    grouped, accumulated = (final(tmp_path / "runs" / "groups", name) for name in ("grouped", "accumulated"))
    assert (grouped["groups"], grouped["accumulation"], grouped["samples"]) == (4, 1, 4)
    assert (accumulated["groups"], accumulated["accumulation"], accumulated["samples"]) == (1, 4, 4)
    assert grouped["updates"] == accumulated["updates"]
    assert grouped["tau"] == pytest.approx(accumulated["tau"], rel=1e-5)
    assert grouped["mean_gain"] == pytest.approx(accumulated["mean_gain"], rel=1e-5)
    models = [keras.models.load_model(tmp_path / "runs" / "groups" / name / "model.keras")
              for name in ("grouped", "accumulated")]
    for one, other in zip(models[0].get_weights(), models[1].get_weights(), strict=True):
        np.testing.assert_allclose(one, other, rtol=1e-4, atol=1e-6)
    assert models[0].groups == 4 and models[1].groups == 1
    # `advise` replays the groups' run as it replays accumulation's: the same statistics, the same advice.
    from keras_adascale.experiments import advice

    replayed = [advice.advise(tmp_path / "runs" / "groups" / name, [2, 4, 8, 16]) for name in ("grouped", "accumulated")]
    assert [p.scale for p in replayed[0].predictions] == [2, 4, 8, 16]
    assert replayed[0].noise_scale > 0 and replayed[0].noise_scale == pytest.approx(replayed[1].noise_scale, rel=1e-3)
    for one, other in zip(replayed[0].predictions, replayed[1].predictions, strict=True):
        assert abs(one.updates - other.updates) <= 1  # (whole updates, rounded up)
