"""Smoke tests of the benchmarks' --quick modes on tiny settings: they run and end with a JSON line.

No timing is asserted here: benchmarks/ measures, the tests only check the output's form.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def run_script(arguments, cwd):
    """A benchmark's printed lines."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / arguments[0]), *arguments[1:]],
                            capture_output=True, text=True, timeout=600, cwd=cwd,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()


def run_benchmark(arguments, cwd):
    """A benchmark's JSON summary, its last line."""
    return json.loads(run_script(arguments, cwd)[-1])


def test_overhead_quick_prints_ratios(tmp_path):
    summary = run_benchmark(["overhead.py", "--quick", "--models", "small_cnn", "--settings",
                             "default,mirrored4,accumulation4", "--windows", "2", "--steps", "2"], tmp_path)
    assert summary["machine"]["tensorflow"] and summary["windows"] == 2 and summary["family"] == "sgd"
    assert [row["setting"] for row in summary["train_step"]] == ["default", "mirrored4", "accumulation4"]
    for row in summary["train_step"]:
        assert row["adascale_ms"] > 0 and row["sgd_ms"] > 0
        assert math.isclose(row["ratio_median"], row["ratio_median"]) and row["ratio_q1"] <= row["ratio_q3"]
        assert row["state_bytes"]["adascale"] - row["state_bytes"]["sgd"] < 200  # O(1) extra state
        assert row["traced_ops"]["adascale"] > row["traced_ops"]["sgd"] > 0 and row["batch_per_replica"] == 32
    assert summary["apply_only"] is None  # only measured on mlp_5m


@pytest.fixture(scope="module")
def adam_overhead(tmp_path_factory):
    """The printed lines of a quick `--family adam` run on the small CNN, one device."""
    return run_script(["overhead.py", "--family", "adam", "--quick", "--models", "small_cnn", "--settings", "default",
                       "--windows", "2", "--steps", "2"], tmp_path_factory.mktemp("adam_overhead"))


def test_overhead_adam_family_prints_adascale_adam_against_adam(adam_overhead):
    lines = adam_overhead
    summary = json.loads(lines[-1])
    assert summary["family"] == "adam" and summary["optimizers"] == {"adascale": "AdaScaleAdam", "adam": "Adam"}
    [row] = summary["train_step"]
    assert row["setting"] == "default" and "sgd_ms" not in row and row["adam_ms"] > 0 and row["adascale_ms"] > 0
    assert 0 < row["ratio_median"] < math.inf and row["ratio_q1"] <= row["ratio_median"] <= row["ratio_q3"]
    assert row["traced_ops"]["adascale"] > row["traced_ops"]["adam"] > 0
    assert row["state_bytes"]["adam"] >= 2 * 4 * row["params"]  # both of Adam's moments, so not SGD's state
    assert 0 < row["state_bytes"]["adascale"] - row["state_bytes"]["adam"] < 200  # O(1) extra state
    assert summary["apply_only"] is None and summary["fixed_cost_us"] == {}  # only measured on mlp_5m
    header = next(line for line in lines if line.split()[:1] == ["model"])
    assert "Adam ms" in header and "AdaScaleAdam ms" in header and "ops Adam/AdaScaleAdam" in header
    assert "SGD" not in header
    printed = next(line for line in lines if line.split()[:2] == ["small_cnn", "default"]).split()
    assert printed[4:7] == [f"{row['adam_ms']:.2f}", f"{row['adascale_ms']:.2f}", f"{row['ratio_median']:.3f}"]
    assert printed[-1] == f"{row['traced_ops']['adam']}/{row['traced_ops']['adascale']}"


def test_overhead_adam_preconditioned_family_traces_the_extra_pass(adam_overhead, tmp_path):
    lines = run_script(["overhead.py", "--family", "adam-preconditioned", "--quick", "--models", "small_cnn",
                        "--settings", "default", "--windows", "1", "--steps", "1"], tmp_path)
    summary, raw = json.loads(lines[-1]), json.loads(adam_overhead[-1])
    assert summary["family"] == "adam-preconditioned"
    assert summary["optimizers"] == {"adascale": "AdaScaleAdam", "adam": "Adam"}
    [row], [raw_row] = summary["train_step"], raw["train_step"]
    assert row["adam_ms"] > 0 and row["adascale_ms"] > 0
    assert row["traced_ops"]["adam"] == raw_row["traced_ops"]["adam"]  # the same plain Adam
    assert row["traced_ops"]["adascale"] > raw_row["traced_ops"]["adascale"]  # g / (sqrt(v_hat) + epsilon)
    assert "AdaScaleAdam(pre) ms" in next(line for line in lines if line.split()[:1] == ["model"])


def test_overhead_apply_only_reports_the_floor(tmp_path):
    summary = run_benchmark(["overhead.py", "--quick", "--models", "mlp_5m", "--settings", "default",
                             "--batch", "8", "--windows", "2", "--steps", "1"], tmp_path)
    row = summary["apply_only"]
    assert row["floor_ms"] > 0 and row["ratio_to_floor_median"] > 0
    assert summary["train_step"][0]["batch_per_replica"] == 8
    assert set(summary["fixed_cost_us"]) == {"default", "mirrored4"}
    assert all(row["sgd"] > 0 and row["adascale"] > 0 for row in summary["fixed_cost_us"].values())


@pytest.fixture(scope="module")
def quick_study(tfds_data_dir, tmp_path_factory):
    """The quick SGD study at S = 2 on slices of MNIST: its folder, its arguments and its JSON summary."""
    output = tmp_path_factory.mktemp("quick_study")
    arguments = ["scale_study.py", "--quick", "--scales", "2", "--total-steps", "30",
                 "--set", f"dataset.data_dir={tfds_data_dir}", "--set", "dataset.train_split=train[:2%]",
                 "--set", "dataset.test_split=test[:5%]", "--output-dir", str(output)]
    return output, arguments, run_benchmark(arguments, output)


def test_scale_study_quick_prints_every_method_and_scale(quick_study):
    tmp_path, _, summary = quick_study
    assert {(row["method"], row["scale"]) for row in summary["results"]} == {
        ("baseline", 1), ("adascale", 2), ("lsr", 2), ("lsr_warmup", 2)}
    for row in summary["results"]:
        assert 0.0 <= row["test_accuracy_mean"] <= 1.0 and row["seeds"] == 1
    rows = {row["method"]: row for row in summary["results"]}
    assert rows["baseline"]["updates_mean"] == 30 and rows["lsr"]["updates_mean"] == 15
    assert 15 <= rows["adascale"]["updates_mean"] <= 30
    assert (tmp_path / "scale_study" / "scale_study.png").stat().st_size > 0
    assert (tmp_path / "scale_study" / "accuracy_vs_scale.png").stat().st_size > 0


def test_scale_study_report_reads_the_finished_runs_and_trains_none(quick_study):
    output, arguments, trained = quick_study
    folders = sorted(path.name for path in (output / "scale_study").iterdir())
    lines = run_script(arguments + ["--report", "--scales", "2,4", "--seeds", "2"], output)
    assert json.loads(lines[-1])["results"] == trained["results"]  # the S = 2, seed 0 rows, read back
    assert sorted(path.name for path in (output / "scale_study").iterdir()) == folders  # nothing trained
    left_out = {line.split()[1].rstrip(":") for line in lines if line.endswith("not finished from this config, left out")}
    assert left_out == {"baseline_s1_seed1", "adascale_s4_seed0", "lsr_s4_seed0", "lsr_warmup_s4_seed0",
                        "adascale_s2_seed1", "lsr_s2_seed1", "lsr_warmup_s2_seed1",
                        "adascale_s4_seed1", "lsr_s4_seed1", "lsr_warmup_s4_seed1"}


def test_scale_study_report_with_retrain_is_a_usage_error(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale_study.py"), "--report", "--retrain",
                             "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 2
    assert "--report trains nothing, so it cannot be given with --retrain" in result.stderr
    assert not any(tmp_path.iterdir())


def test_scale_study_report_on_an_empty_folder_says_nothing_is_finished(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale_study.py"), "--quick", "--report",
                             "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode != 0
    assert f"no run of this study is finished under {tmp_path / 'scale_study'}" in result.stderr


def test_advice_check_quick_compares_predicted_with_actual_updates(tfds_data_dir, tmp_path):
    summary = run_benchmark(["advice_check.py", "--quick", "--scales", "2,4", "--from-scale", "2", "--seeds", "0,1",
                             "--set", "total_steps=30", "--set", f"dataset.data_dir={tfds_data_dir}",
                             "--set", "dataset.train_split=train[:2%]", "--set", "dataset.test_split=test[:5%]",
                             "--output-dir", str(tmp_path)], tmp_path)
    assert [seed["seed"] for seed in summary["seeds"]] == [0, 1]
    for seed, folder in zip(summary["seeds"], ("advice_check", "advice_check_seed1")):
        rows = {row["scale"]: row for row in seed["results"]}
        assert sorted(rows) == [2, 4]
        own = rows[2]  # the predicting run replays its own count
        assert abs(own["predicted_updates"] - own["actual_updates"]) <= max(1, 0.02 * own["actual_updates"])
        for row in rows.values():
            assert 30 / row["scale"] <= row["predicted_updates"] <= 30
            assert row["error"] == row["predicted_updates"] / row["actual_updates"] - 1
        assert (tmp_path / folder / "advice_check.png").stat().st_size > 0
        # each seed in its own folder, trained with that seed
        assert json.loads((tmp_path / folder / "adascale_s2" / "config.json").read_text())["seed"] == seed["seed"]
    # Each S's error over the seeds: their mean and range.
    for row in summary["across_seeds"]:
        errors = [r["error"] for seed in summary["seeds"] for r in seed["results"] if r["scale"] == row["scale"]]
        assert row["seeds"] == 2
        assert row["mean_error"] == pytest.approx(sum(errors) / 2)
        assert (row["min_error"], row["max_error"]) == (min(errors), max(errors))


def test_scale_study_quick_adam_family_prints_every_method(tfds_data_dir, tmp_path):
    summary = run_benchmark(["scale_study.py", "--quick", "--family", "adam", "--scales", "2", "--total-steps", "30",
                             "--set", f"dataset.data_dir={tfds_data_dir}", "--set", "dataset.train_split=train[:2%]",
                             "--set", "dataset.test_split=test[:5%]", "--output-dir", str(tmp_path)], tmp_path)
    rows = {row["method"]: row for row in summary["results"]}
    assert set(rows) == {"baseline", "adascale_adam", "adascale_adam_pre", "adam_sqrt", "adam_linear", "adam_fixed"}
    assert rows["baseline"]["updates_mean"] == 30 and summary["family"] == "adam"
    for method in ("adam_sqrt", "adam_linear", "adam_fixed"):
        assert rows[method]["updates_mean"] == 15
    for method in ("adascale_adam", "adascale_adam_pre"):
        assert 15 <= rows[method]["updates_mean"] <= 30 and 1.0 <= rows[method]["mean_gain"] <= 2.0
    assert (tmp_path / "adam_scale_study" / "accuracy_vs_scale.png").stat().st_size > 0


def test_autoscale_study_quick_reports_the_targets_against_the_fixed_s_frontier(tfds_data_dir, tmp_path):
    arguments = ["autoscale_study.py", "--quick", "--set", f"dataset.data_dir={tfds_data_dir}",
                 "--set", "dataset.train_split=train[:2%]", "--set", "dataset.test_split=test[:5%]",
                 "--set", "total_steps=40", "--output-dir", str(tmp_path)]
    summary = run_benchmark(arguments, tmp_path)
    rows = {row["method"]: row for row in summary["results"]}
    assert set(rows) == {"fixed_s1", "fixed_s4", "auto_budget4"}
    assert rows["fixed_s1"]["updates_mean"] == 40 and rows["fixed_s1"]["examples_mean"] == 40
    assert rows["fixed_s4"]["examples_mean"] == 4 * rows["fixed_s4"]["updates_mean"]
    auto, target = rows["auto_budget4"], summary["targets"]["auto_budget4"]
    assert target["extra_examples_vs_s1"] == pytest.approx(auto["examples_mean"] / 40 - 1)
    assert target["fewer_updates_vs_s1"] == pytest.approx(1 - auto["updates_mean"] / 40)
    (x0, y0), (x1, y1) = sorted((rows[m]["examples_mean"], rows[m]["updates_mean"]) for m in ("fixed_s1", "fixed_s4"))
    if x0 <= auto["examples_mean"] <= x1:  # the frontier between S = 1 and 4, log-log
        t = math.log(auto["examples_mean"] / x0) / math.log(x1 / x0)
        frontier = y0 * (y1 / y0) ** t
        assert target["margin_vs_frontier"] == pytest.approx(1 - auto["updates_mean"] / frontier)
    else:
        assert target["margin_vs_frontier"] is None
    for plot in ("autoscale_plane.png", "autoscale_trajectory.png"):
        assert (tmp_path / "autoscale_study" / plot).stat().st_size > 0

    # --report trains nothing and prints the B_simple-by-S table and target (c)'s bound from the runs' files.
    folders = sorted(path.name for path in (tmp_path / "autoscale_study").iterdir())
    lines = run_script(arguments + ["--report"], tmp_path)
    report = json.loads(lines[-1])
    assert sorted(path.name for path in (tmp_path / "autoscale_study").iterdir()) == folders
    assert report["results"] == summary["results"]
    noise = report["noise_scale_by_scale"]
    assert noise["tau"] == [10, 20, 30, 39]  # 25%, 50%, 75% and 99.6% of T_SI, floored
    assert set(noise["fixed"]) == {"1", "4"}
    for scale, values in noise["fixed"].items():
        metrics = [json.loads(line) for line in
                   (tmp_path / "autoscale_study" / f"fixed_s{scale}_seed0" / "metrics.jsonl").read_text().splitlines()]
        expected = [[row for row in metrics if row["tau"] <= tau][-1]["gradient_noise_scale"] for tau in noise["tau"]]
        assert values == pytest.approx(expected)  # one seed: its value at the last update at or before each tau
    header = lines.index("fixed S: the recorded B_simple (baseline batches, mean over seeds) at tau, the value of "
                         "the last update at or before it")
    assert lines[header + 1].split() == ["fixed", "S", "tau", "10", "tau", "20", "tau", "30", "tau", "39"]
    for offset, scale in ((2, "1"), (3, "4")):
        assert lines[header + offset].split() == [scale] + [f"{value:.1f}" for value in noise["fixed"][scale]]
    bound = report["target_c_bound"]["seeds"]["0"]
    assert bound["reference"] == pytest.approx(40)  # the S = 1 run's updates and examples under the model
    assert bound["examples"] == pytest.approx(1.1 * bound["reference"])
    assert 0 < bound["fewer_updates"] < 1 and bound["lambda"] > 0
    assert bound["fewer_updates"] == pytest.approx(1 - bound["updates"] / bound["reference"])
    title = next(index for index, line in enumerate(lines) if line.startswith("(c) the gain model's bound"))
    assert lines[title + 1].startswith(f"  seed 0: {100 * bound['fewer_updates']:.1f}% fewer updates than S = 1")


def test_autoscale_study_bound_on_synthetic_statistics(monkeypatch):
    """`best_schedule_bound` against closed forms.

    r(S) = (b + 1) / (b / S + 1), U = sum of d tau / r(S), E = sum of d tau x S / r(S).
    """
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from autoscale_study import best_schedule_bound

    def rows(taus, variances, sqr_norms):
        return [{"tau": tau, "gradient_variance": variance, "gradient_sqr_norm": sqr_norm}
                for tau, variance, sqr_norm in zip(taus, variances, sqr_norms)]

    # Constant b = 9: E = T (b + S) / (b + 1) = 1.1 T at S = 2 = sqrt(b / lambda), lambda = 9 / 4,
    # and U = T (b / S + 1) / (b + 1) = 0.55 T.
    bound = best_schedule_bound(rows(range(1, 101), [9.0] * 100, [1.0] * 100), total_steps=100, max_scale=32)
    assert bound["reference"] == 100 and bound["lambda"] == pytest.approx(2.25)
    assert bound["examples"] == pytest.approx(110) and bound["updates"] == pytest.approx(55)
    assert bound["scale_mean"] == pytest.approx(2) and bound["fewer_updates"] == pytest.approx(0.45)

    # b = 9 on tau [0, 50], b = 0 after (S = 1 there), pieces of 0.5 and the last one cut at T_SI = 100:
    # 50 + 50 (9 + S) / 10 = 110 at S = 3 (lambda = 1), U = 50 + 50 (9 / 3 + 1) / 10 = 70.
    taus = [k / 2 for k in range(1, 200)] + [100.7]
    variances = [9.0 if tau <= 50 else 0.0 for tau in taus]
    bound = best_schedule_bound(rows(taus, variances, [1.0] * 200), total_steps=100, max_scale=32)
    assert bound["reference"] == pytest.approx(100) and bound["lambda"] == pytest.approx(1)
    assert bound["examples"] == pytest.approx(110) and bound["fewer_updates"] == pytest.approx(0.30)

    # b = 0 (both statistics 0) then b = inf (only the variance): S = 1, then S = max_scale at no extra examples.
    bound = best_schedule_bound(rows(range(1, 101), [0.0] * 50 + [1.0] * 50, [0.0] * 100), total_steps=100,
                                max_scale=32)
    assert bound["lambda"] is None and bound["examples"] == pytest.approx(100)
    assert bound["updates"] == pytest.approx(50 + 50 / 32) and bound["scale_mean"] == pytest.approx(16.5)


def test_auto_overhead_quick_prints_the_side_by_side_ratio_and_autoscales_own_time(tmp_path):
    summary = run_benchmark(["auto_overhead.py", "--quick", "--windows", "2", "--steps", "6"], tmp_path)
    assert summary["windows"] == 2 and summary["micro_batches_per_window"] == 6
    assert summary["ratio_q1"] <= summary["ratio_median"] <= summary["ratio_q3"]
    assert summary["fixed_ms_per_update"] > 0 and summary["auto_ms_per_update"] > 0
    assert 0 < summary["autoscale_hooks_ms_per_update"] < summary["auto_ms_per_update"]
    assert summary["changes"] == 0  # one count allowed: nothing changes
    # the warm-up's two fits and the timed windows, 3 updates each
    assert summary["updates"] == (2 + 2 * 2) * 3


def test_noise_scale_key_finds_the_key_on_which_synthetic_runs_agree(tmp_path):
    """Synthetic fixed-S runs where the noise scale is a function of the training loss alone (b = 1 / loss) and the
    loss falls twice as fast in tau at S = 4: compared at equal loss, b is the same at both S (spread 1); at equal
    tau it is not (S = 4's is larger, as the study's real runs show). Checks the script, not the hypothesis."""
    runs = tmp_path / "autoscale_study"
    for scale, gain, rate in ((1, 1.0, 0.002), (4, 2.0, 0.004)):
        folder = runs / f"fixed_s{scale}_seed0"
        folder.mkdir(parents=True)
        lines = []
        for update in range(1, 401):
            tau = update * gain
            loss = math.exp(-rate * tau)
            lines.append(json.dumps({"update": update, "tau": tau, "examples": 32 * scale * update, "loss": loss,
                                     "gradient_noise_scale": 1.0 / loss}))
        (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        (folder / "final.json").write_text("{}")
    (runs / "fixed_s8_seed0").mkdir()  # unfinished (no final.json): left out
    lines = run_script(["noise_scale_key.py", "--runs", str(runs), "--window", "1"], tmp_path)
    summary = json.loads(lines[-1])
    results = {result["key"]: result for result in summary["results"]}
    assert summary["seeds"] == {"1": 1, "4": 1} and set(results) == {"tau", "examples", "loss"}
    assert results["loss"]["spread_median"] == pytest.approx(1.0, abs=1e-3)
    assert results["loss"]["spread_max"] == pytest.approx(1.0, abs=1e-2)
    # At equal tau (within 1 - 400, both reached), b(S=4) / b(S=1) = exp(0.002 tau): at the midpoint tau = 200.5.
    assert results["tau"]["range"] == pytest.approx([2.0, 400.0])
    assert results["tau"]["last_over_first"][1] == pytest.approx(math.exp(0.002 * (2 + 400) / 2), rel=1e-2)
    assert results["tau"]["spread_median"] > 1.3
    assert (runs / "noise_scale_key.png").stat().st_size > 0
    # The default window (a moving mean over 50 updates, centred: no lag that differs between the S).
    default = {result["key"]: result for result in json.loads(
        run_script(["noise_scale_key.py", "--runs", str(runs)], tmp_path)[-1])["results"]}
    assert default["loss"]["spread_median"] == pytest.approx(1.0, abs=0.02)
    assert default["tau"]["spread_median"] > 1.3
