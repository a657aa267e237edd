"""A number quoted on several pages is the same everywhere, and a page's copy of a file or of printed output is
the file or the output: the measured source is named in each test, and every other page is read against it.

These read text only (no training), except the AutoScale example's printed lines, which one small fit checks."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_FENCED = re.compile(r"```(?P<language>\w+)\n(?P<code>.*?)```", re.S)


def read(path):
    return (ROOT / path).read_text()


def fenced_after(text, anchor, language):
    """The first ```language block after the text `anchor`."""
    start = text.index(anchor)
    match = next(match for match in _FENCED.finditer(text, start) if match["language"] == language)
    return match["code"]


def number(text):
    return float(text.replace(",", ""))


def demo_table():
    """The README's `make demo` table (the measured source), as {run: {column: text}}."""
    table = fenced_after(read("README.md"), "## The demo", "text").splitlines()
    header = re.split(r"\s{2,}", table[0].strip())
    rows = {}
    for line in table[2:]:
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_the_demo_table_is_the_same_in_the_readme_and_getting_started():
    readme = fenced_after(read("README.md"), "## The demo", "text")
    started = fenced_after(read("docs/getting-started.md"), "`make demo` trains", "text")
    assert started == readme


def test_the_readme_s_seed_table_starts_with_the_demo_table_s_run():
    """Seed 0 of the 3-seed table is the demo's own run: its accuracy and updates."""
    demo = demo_table()
    text = read("README.md")
    seeds = text[text.index("| run | test accuracy, 3 seeds |"):]
    for run, row in demo.items():
        match = re.search(rf"^\| {run} \| ([0-9.]+) / [^|]+\| ([0-9,]+)", seeds, re.M)
        assert match, run
        assert match[1] == row["test acc"], run
        assert number(match[2]) == number(row["updates"]), run


def test_the_demo_s_numbers_quoted_elsewhere_are_the_demo_table_s():
    demo = demo_table()
    baseline, adascale, auto = demo["baseline_s1"], demo["adascale"], demo["adascale_auto"]
    yaml = read("saved_configs/demo.yaml")
    header = yaml[yaml.index("Measured then"):yaml.index("\nseed:")]  # the header comment's results
    for run, words in ((baseline, "baseline"), (adascale, "AdaScale at S = 4"), (auto, "AdaScale choosing S"),
                       (demo["lsr"], "LSR"), (demo["lsr_warmup"], "LSR with warm-up")):
        percent = re.search(rf"{re.escape(words)}[^%]*? ([0-9.]+)%", header)
        assert percent and float(percent[1]) == pytest.approx(100 * float(run["test acc"])), words
    assert f"{number(adascale['updates']):,.0f}" in header and f"{number(auto['updates']):.0f} updates" in header
    changing = read("docs/guides/changing-scale.md")
    assert f"took {auto['updates']} updates against {number(adascale['updates']):,.0f} at fixed S = 4" in changing
    advise = fenced_after(read("docs/guides/choosing-scale.md"), "keras-adascale advise runs/demo/adascale", "text")
    assert f"(this run: {adascale['updates']} updates)" in advise
    assert f"{adascale['wall s']} s (this run" in advise
    backends = read("docs/guides/backends.md")
    assert f"(the demo on TensorFlow: {baseline['wall s']} s and\n{adascale['wall s']} s)" in backends
    assert f"against {baseline['wall s']} s" in backends and f"against {adascale['wall s']} s" in backends


def test_the_jax_slowdown_ratios_are_the_tables_ratios():
    """backends.md's 1.7x and 2.3x: make demo-jax's wall times over the TensorFlow demo's."""
    demo = demo_table()
    backends = read("docs/guides/backends.md")
    jax_table = fenced_after(backends, "`make demo-jax` itself", "text").splitlines()[2:]
    jax = {re.split(r"\s{2,}", line.strip())[0]: float(line.split()[-1]) for line in jax_table}
    for run, words in (("baseline_s1", "on one device, takes "), ("adascale", "AdaScale on 4 host devices ")):
        ratio = re.search(rf"{re.escape(words)}([0-9.]+)x", backends)
        assert ratio, words
        assert float(ratio[1]) == round(jax[run] / float(demo[run]["wall s"]), 1), run


def test_make_test_and_make_demo_take_the_same_minutes_on_every_page():
    readme = read("README.md")
    started = read("docs/getting-started.md")
    minutes = re.search(r"make test .*\(about (\d+) min on 2 CPU cores\)", readme)[1]
    assert f"about {minutes} minutes on 2 CPU cores, as the README says" in started
    low, high = re.search(r"make demo .*\(5 runs, (\d+)-(\d+) min on 2 CPU cores\)", readme).groups()
    assert f"It takes {low} to {high} minutes on 2 CPU cores" in started


def advise_table():
    """Benchmarks, section 6: the 3-seed check of `advise` from the S = 4 runs, {S: (mean error, actual updates)}."""
    text = read("docs/benchmarks.md")
    table = text[text.index("| S | error, seed 0 | error, seed 1 | error, seed 2 | mean (range) |"):]
    table = table[:table.index("\n\n")]
    means = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        mean = re.match(r"([+-][0-9.]+%) \(", cells[4])
        if mean:
            means[int(cells[0])] = mean[1], cells[5]
    assert sorted(means) == [2, 8, 16, 32]
    return means


def advise_means():
    return {scale: mean for scale, (mean, _) in advise_table().items()}


def test_advise_s_accuracy_is_quoted_as_the_3_seed_means_everywhere():
    means = advise_means()
    quotes = {
        "README.md": (f"{means[2]} at S = 2 and {means[8]} at S = 8",
                      f"{means[16]} at S = 16 and {means[32]} at S = 32"),
        "docs/guides/choosing-scale.md": (f"({means[2]} at S = 2, {means[8]} at S = 8)",
                                          f"predicted {means[16][1:]} more updates than real runs needed at S = 16 "
                                          f"and {means[32][1:]} more at\nS = 32"),
        "docs/benchmarks.md": (f"its means, {means[2]} at S = 2, {means[8]} at S = 8,\n{means[16]} at S = 16 and "
                               f"{means[32]} at S = 32",),
    }
    for page, phrases in quotes.items():
        text = read(page)
        for phrase in phrases:
            assert phrase in text, (page, phrase)
    table = read("docs/guides/choosing-scale.md")
    for scale, (mean, updates) in advise_table().items():
        assert re.search(rf"^\| {scale} \| {re.escape(mean)} \([^|]+\| {re.escape(updates)} \|$", table, re.M), scale
    # The single-seed and 0.2.0 figures are gone from the pages that quote the advice's accuracy.
    for page in ("README.md", "docs/guides/choosing-scale.md"):
        for stale in ("within 11%", "within 4%", "31% and 48%", "+33.5%", "+84.6%"):
            assert stale not in read(page), (page, stale)


def test_the_advise_warning_rounds_the_3_seed_means():
    """`advise`'s CONSERVATIVE line (keras_adascale/experiments/advice.py) quotes S = 16 and 32 rounded."""
    means = advise_means()
    code = read("keras_adascale/experiments/advice.py")
    sixteen, thirty_two = (round(float(means[scale].rstrip("%"))) for scale in (16, 32))
    assert f"+{sixteen}% too many predicted at S = 16, +{thirty_two}% at S = 32" in code


def test_the_runner_page_s_demo_config_is_saved_configs_demo_yaml():
    """docs/runner.md shows the demo's config: the file itself, less its header of comments."""
    lines = read("saved_configs/demo.yaml").splitlines(keepends=True)
    body = "".join(lines[next(index for index, line in enumerate(lines) if not line.startswith("#")):])
    assert fenced_after(read("docs/runner.md"), "## A config", "yaml") == body


def test_the_autoscale_example_prints_what_its_page_shows(tmp_path):
    """changing-scale.md's AutoScale example (a small fit of a linear model) prints the lines pasted under it."""
    page = read("docs/guides/changing-scale.md")
    code = fenced_after(page, "## Automatically: `AutoScale` for `model.fit`", "python")
    shown = fenced_after(page, "It prints each change as it makes it", "text")
    final = re.search(r"then `([^`]+)`:", page[page.index("It prints each change as it makes it"):])[1]
    script = tmp_path / "autoscale_example.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.splitlines()
    assert printed[:-1] == shown.splitlines()
    assert printed[-1] == final


def test_every_tutorial_has_an_entry_on_the_tutorials_page_and_in_the_site_s_nav():
    notebooks = sorted(path.name for path in (ROOT / "tutorials").glob("*.ipynb"))
    page, nav = read("docs/tutorials.md"), read("mkdocs.yml")
    entries = re.findall(r"^## \[\d+\. [^\]]+\]\(tutorials/([^)]+)\)", page, re.M)
    assert entries == notebooks
    assert re.findall(r"^\s+- [^:]+: tutorials/(\S+\.ipynb)$", nav, re.M) == notebooks
    count = {4: "Four", 5: "Five", 6: "Six", 7: "Seven"}.get(len(notebooks), str(len(notebooks)))
    assert f"\n{count} notebooks" in page, "the page's count of notebooks"
