"""The runner's `optimizer.scale: auto` end to end (tiny, real MNIST, 2 mirrored replicas): S per update in
metrics.jsonl, the examples in final.json, `compare` and `advise` on a run whose S changed."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import assert_same_finished_models, read_jsonl, straight_and_killed
from keras_adascale import autoscale
from keras_adascale.experiments import config

AUTO = {
    "total_steps": 80,
    "evaluations": 2,
    "dataset": {"train_split": "train[:5%]", "test_split": "test[:10%]", "batch_size": 16},
    "model": {"name": "mlp", "hidden_units": [32]},
    "schedule": {"name": "constant", "learning_rate": 0.1},
    "optimizer": {"scale": "auto"},
    "strategy": {"name": "mirrored", "devices": 2},
    # update_cost 64: S* = 8 sqrt(noise scale), so S grows from 2 within the run.
    "autoscale": {"max_scale": 8, "update_cost": 64.0, "warmup": 4, "decisions": 10},
    "runs": [{"name": "auto"}],
}


def keras_adascale(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "keras_adascale", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


@pytest.fixture(scope="module")
def auto_run(tfds_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    (root / "auto.yaml").write_text(yaml.safe_dump(AUTO))
    result = keras_adascale("train", root / "auto.yaml", "--output-dir", root / "runs",
                            "--set", f"dataset.data_dir={tfds_data_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs" / "auto" / "auto", result.stdout


def test_an_auto_run_records_s_and_n_per_update_and_changes_s(auto_run):
    run_dir, stdout = auto_run
    rows = read_jsonl(run_dir / "metrics.jsonl")
    scales = [row["scale"] for row in rows]
    assert scales[0] == 2 and max(scales) > 2  # 2 replicas x 1 step, then grown
    assert set(scales) <= {2, 4, 8}  # powers of two of the steps, up to max_scale
    assert all(row["samples"] == row["scale"] for row in rows)  # B = B0: S = N
    assert "S = auto (budget)" in stdout


def test_each_change_is_what_the_policy_says_for_the_statistics_of_an_update_shortly_before_it(auto_run):
    # A change waits for an update boundary where the micro-batches done are a multiple of its count
    # (`align`): it follows its decision by at most new k / old k - 1 updates.
    run_dir, _ = auto_run
    rows = read_jsonl(run_dir / "metrics.jsonl")
    changes = 0
    for index, (before, after) in enumerate(zip(rows, rows[1:])):
        if after["scale"] != before["scale"]:
            changes += 1
            lag = max(1, int(after["scale"] // before["scale"]))
            decided = []
            for row in rows[max(0, index + 1 - lag):index + 1]:
                noise_scale = row["gradient_variance"] / row["gradient_sqr_norm"]
                decided.append(autoscale.decide(noise_scale, int(before["scale"] // 2), 2.0, "budget", min_steps=1,
                                                max_steps=4, update_cost=64.0, allowed_steps=[1, 2, 4]).scale)
            assert after["scale"] in decided
    assert changes


def test_final_json_counts_the_examples_of_every_update(auto_run):
    run_dir, _ = auto_run
    final = json.loads((run_dir / "final.json").read_text())
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert final["scale_setting"] == "auto" and final["final_scale"] == rows[-1]["scale"]
    assert final["examples"] == sum(row["samples"] * 16 for row in rows)
    assert final["baseline_batches"] == pytest.approx(final["examples"] / 16)
    assert final["scale"] == pytest.approx(sum(row["scale"] for row in rows) / len(rows))
    assert final["tau"] >= 80 and final["test_accuracy"] > 0.5


def test_compare_shows_an_auto_runs_range_and_mean_s(auto_run):
    run_dir, _ = auto_run
    result = keras_adascale("compare", run_dir, "--output", run_dir.parent / "compared.png")
    assert result.returncode == 0, result.stderr[-2000:]
    final = json.loads((run_dir / "final.json").read_text())
    assert f"auto {final['min_scale_used']:g}-{final['max_scale_used']:g}, mean {final['scale']:.1f}" in result.stdout


def test_advise_on_a_run_whose_s_changed_tells_its_path_and_advises_a_fixed_s(auto_run):
    run_dir, _ = auto_run
    result = keras_adascale("advise", run_dir, "--scales", "1,2,8")
    assert result.returncode == 0, result.stderr[-2000:]
    out = " ".join(result.stdout.split())  # the paragraphs are wrapped
    rows = read_jsonl(run_dir / "metrics.jsonl")
    final = json.loads((run_dir / "final.json").read_text())
    assert "a run that chose S during training" in out
    first_change = next(index for index, row in enumerate(rows) if row["scale"] != 2)
    assert f"S = 2 for tau 0-{rows[first_change - 1]['tau']:.0f} ({first_change} updates)" in out
    assert f"{final['updates']} updates in all, at a mean S of {final['scale']:.1f} per update" in out
    assert "Recommendation for a fixed S: S = " in out
    # No row at the mean S (no one ran at it), and S printed as people write it.
    table_scales = re.findall(r"^ *(\S+) +\d+ +[\d,]+ +\d+% ", result.stdout, re.M)
    assert table_scales[:3] == ["1", "2", "8"]
    if not float(final["scale"]).is_integer():
        assert f"{final['scale']:g}" not in result.stdout


def test_scale_auto_needs_an_adascale_optimizer():
    with pytest.raises(config.ConfigError, match="optimizer.scale=auto needs an AdaScale optimizer"):
        config.resolve({**AUTO, "optimizer": {"name": "sgd", "scale": "auto"}}, name="bad")


def test_a_scale_word_other_than_auto_is_refused():
    with pytest.raises(config.ConfigError, match="must be a number >= 1 or 'auto'"):
        config.resolve({**AUTO, "optimizer": {"scale": "big"}}, name="bad")


def test_a_max_scale_below_the_least_s_is_refused():
    with pytest.raises(config.ConfigError, match="autoscale.max_scale=1 is below the least S = 2"):
        config.resolve({**AUTO, "autoscale": {"max_scale": 1}}, name="bad")


def test_a_killed_auto_run_resumes_and_ends_where_an_uninterrupted_run_ends(tfds_data_dir, tmp_path):
    # As the fixed-S test in test_experiments_training.py, for a run whose S changes: the decisions come on a grid
    # of tau and each change waits for an update boundary aligned with its count, so the epochs end on update
    # boundaries and the backup at an epoch end resumes exactly.
    recipe = {**AUTO, "total_steps": 160, "evaluations": 8,
              "autoscale": {**AUTO["autoscale"], "decisions": 20}, "strategy": {"name": "default"},
              "dataset": {**AUTO["dataset"], "batch_size": 8}}
    (tmp_path / "auto.yaml").write_text(yaml.safe_dump(recipe))

    def command(output):
        return [sys.executable, "-m", "keras_adascale", "train", str(tmp_path / "auto.yaml"),
                "--output-dir", str(output), "--set", f"dataset.data_dir={tfds_data_dir}"]

    straight, killed, _ = straight_and_killed(command, lambda output: output / "auto" / "auto.incomplete", tmp_path)
    assert not (killed / "auto" / "auto").exists()
    resumed_run = subprocess.run(command(killed), check=True, capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert "resuming auto/auto from epoch" in resumed_run.stdout
    assert_same_finished_models(straight / "auto" / "auto" / "model.keras", killed / "auto" / "auto" / "model.keras")
    rows = [read_jsonl(folder / "auto" / "auto" / "metrics.jsonl") for folder in (straight, killed)]
    assert [row["update"] for row in rows[1]] == [row["update"] for row in rows[0]]
    assert [row["scale"] for row in rows[1]] == [row["scale"] for row in rows[0]]
    assert len({row["scale"] for row in rows[0]}) > 1  # S changed, also across the kill


def test_advise_with_its_default_scales_on_a_run_whose_s_changed(auto_run):
    # The default path (no --scales): the table's cut below 10% efficiency is taken against the run's mean S.
    run_dir, _ = auto_run
    result = keras_adascale("advise", run_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Recommendation for a fixed S: S = " in " ".join(result.stdout.split())
    table_scales = re.findall(r"^ *(\S+) +\d+ +[\d,]+ +\d+% ", result.stdout, re.M)
    assert table_scales[:2] == ["1", "2"] and all(float(scale).is_integer() for scale in table_scales)
