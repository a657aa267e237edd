"""`keras-adascale advise` (experiments/advice.py) on the tiny experiment's AdaScale runs, replayed from their
recorded statistics."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest


def copied_run(finished, run, destination):
    """A copy of the tiny experiment's `run` folder under `destination`: advise writes its plot into the copy."""
    experiment, _ = finished
    return pathlib.Path(shutil.copytree(experiment / run, destination / run))


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


@pytest.fixture(scope="module", params=["adascale", "adascale_b0"])
def advice(request, finished, tmp_path_factory):
    """`advise RUN --scales 1,2,4,8,64` on each AdaScale run: `(run folder, its final.json, stdout, table rows)`."""
    run_dir = copied_run(finished, request.param, tmp_path_factory.mktemp("advice"))
    result = advise(run_dir, "--scales", "1,2,4,8,64")
    assert result.returncode == 0, result.stderr
    return run_dir, json.loads((run_dir / "final.json").read_text()), result.stdout, table_rows(result.stdout)


def test_advise_reproduces_the_runs_own_update_count(advice):
    _, final, _, rows = advice
    assert rows[float(final["scale"])]["updates"] == pytest.approx(final["updates"], rel=0.02)


def test_advise_lists_the_asked_scales_and_the_runs_own(advice):
    _, final, _, rows = advice
    assert sorted(rows) == sorted({1.0, 2.0, 4.0, 8.0, 64.0, float(final["scale"])})


def test_advise_at_scale_one_predicts_t_si_updates_at_full_efficiency(advice):
    _, _, _, rows = advice
    assert rows[1.0]["updates"] == 40 and rows[1.0]["efficiency"] == 1.0  # S = 1: T_SI updates, no loss


def test_advise_predicts_fewer_updates_at_larger_scales(advice):
    _, _, _, rows = advice
    updates = [rows[s]["updates"] for s in sorted(rows)]
    assert updates == sorted(updates, reverse=True) and rows[64.0]["updates"] >= 1


def test_advise_counts_the_examples_in_baseline_batches(advice):
    _, final, _, rows = advice
    assert rows[8.0]["examples"] == rows[8.0]["updates"] * 8 * final["baseline_batch_size"]


def test_advise_names_the_critical_scale_and_the_noise_scale(advice):
    _, _, stdout, _ = advice
    assert "critical scale: S = " in stdout and "B_simple" in stdout


def test_advise_writes_its_plot_beside_the_run(advice):
    run_dir, _, _, _ = advice
    assert (run_dir / "advice.png").stat().st_size > 10_000


def test_advise_uses_measured_step_times(finished, tmp_path):
    result = advise(copied_run(finished, "adascale", tmp_path), "--scales", "2,8", "--step-time", "8=0.5")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["8"])
    updates = int(line.split()[1])
    assert "500.0 ms" in line and f"{updates * 0.5:.1f} s" in line


def test_advise_refuses_a_run_that_is_not_adascale(finished):
    experiment, _ = finished
    result = advise(experiment / "lsr")
    assert result.returncode == 2 and "advise needs an AdaScale run" in result.stderr


def test_advise_refuses_a_step_time_without_its_scale(finished, tmp_path):
    result = advise(copied_run(finished, "adascale", tmp_path), "--step-time", "8")
    assert result.returncode == 2 and "expected S=SECONDS" in result.stderr


def test_advise_help_prints_percent_signs_once():
    result = subprocess.run([sys.executable, "-m", "keras_adascale", "advise", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    assert "50% efficiency" in result.stdout and "%%" not in result.stdout


def test_advise_recommends_the_largest_scale_that_keeps_half_its_examples(advice):
    """Without step times: the largest listed S with efficiency >= 50%, said in one plain line with why."""
    _, _, stdout, rows = advice
    expected = max(scale for scale, row in rows.items() if row["efficiency"] >= 0.5)
    paragraph = " ".join(stdout.split("Recommendation: ", 1)[1].split())
    assert paragraph.startswith(f"S = {expected:g}, the largest listed S that keeps at least 50% efficiency")
    assert f"{rows[expected]['updates']} updates" in paragraph


def test_advise_recommends_the_fastest_measured_scale_when_step_times_are_given(finished, tmp_path):
    result = advise(copied_run(finished, "adascale", tmp_path), "--scales", "1,2,8",
                    "--step-time", "1=0.01", "--step-time", "2=0.004", "--step-time", "8=0.2")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    walls = {scale: rows[scale]["updates"] * seconds for scale, seconds in ((1.0, 0.01), (2.0, 0.004), (8.0, 0.2))}
    fastest = min(walls, key=walls.get)
    assert f"Recommendation: S = {fastest:g}, the least predicted wall time" in result.stdout
    assert "WARNING: no step times given" not in result.stdout


def test_advise_warns_prominently_that_unmeasured_wall_times_are_assumed(advice):
    """Above the table, not in a footnote: the wall-time column is the run's own step time at every S."""
    _, final, stdout, _ = advice
    warning, header = stdout.index("WARNING: no step times given"), stdout.index("S  updates")
    assert warning < header
    own_ms = 1000 * final["wall_time"] / final["updates"]
    assert f"{own_ms:.1f} ms per update at every S" in " ".join(stdout[warning:header].split())


def test_advise_says_the_rows_far_above_the_runs_scale_are_conservative(finished, tmp_path):
    run_dir = copied_run(finished, "adascale", tmp_path)
    own = json.loads((run_dir / "final.json").read_text())["scale"]
    far = advise(run_dir, "--scales", f"1,{4 * own:g}")
    near = advise(run_dir, "--scales", f"1,{2 * own:g}")
    assert far.returncode == near.returncode == 0, far.stderr + near.stderr
    assert f"CONSERVATIVE at S >= {4 * own:g}" in far.stdout and "+80%" in " ".join(far.stdout.split())
    assert "CONSERVATIVE" not in near.stdout


def test_advise_stops_its_default_table_where_efficiency_is_negligible(finished, tmp_path):
    result = advise(copied_run(finished, "adascale", tmp_path))
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    scales = sorted(rows)
    assert rows[scales[-1]]["efficiency"] < 0.1 <= min(rows[s]["efficiency"] for s in scales[:-1])
    assert scales[-1] < 1024 and f"(stopped at S = {scales[-1]:g}: efficiency below 10%" in result.stdout
