"""What a run records (experiments/recording.py): metrics.jsonl one row per update, evaluations.jsonl."""

import json

import pytest

from conftest import read_jsonl


def test_metrics_have_one_row_per_update(finished):
    experiment, _ = finished
    rows = read_jsonl(experiment / "adascale" / "metrics.jsonl")
    final = json.loads((experiment / "adascale" / "final.json").read_text())
    assert [row["update"] for row in rows] == list(range(1, final["updates"] + 1))


def test_metrics_columns_agree_with_each_other(finished):
    experiment, _ = finished
    rows = read_jsonl(experiment / "adascale" / "metrics.jsonl")
    final = json.loads((experiment / "adascale" / "final.json").read_text())
    taus = [row["tau"] for row in rows]
    gains = [row["gain"] for row in rows]
    assert all(1.0 <= gain <= 2.0 for gain in gains)
    # tau advances by each update's gain
    assert taus[-1] == pytest.approx(sum(gains), rel=1e-5)
    # the effective rate is the gain times the constant single-batch rate
    assert all(row["learning_rate"] == pytest.approx(0.1 * row["gain"], rel=1e-5) for row in rows)
    assert all(row["loss"] > 0 for row in rows)
    assert rows[-1]["examples"] == final["updates"] * 2 * 16


def test_evaluations_have_one_row_per_evaluation_the_last_at_t_si(finished):
    experiment, _ = finished
    evaluations = read_jsonl(experiment / "adascale" / "evaluations.jsonl")
    assert len(evaluations) == 2 and evaluations[-1]["tau"] >= 40


def test_metrics_record_the_gradient_statistics(finished):
    experiment, _ = finished
    for row in read_jsonl(experiment / "adascale" / "metrics.jsonl"):
        assert row["gradient_variance"] >= 0 and row["gradient_sqr_norm"] > 0
        assert row["gradient_noise_scale"] == pytest.approx(row["gradient_variance"] / row["gradient_sqr_norm"])
        s = 2.0  # the run's scale: the recorded gain is r(S) of the recorded averages
        v, m = row["gradient_variance"], row["gradient_sqr_norm"]
        assert row["gain"] == pytest.approx((v + m) / (v / s + m), rel=1e-5)
