"""Reading run folders: their JSON-lines files and an experiment's finished runs (no TensorFlow)."""

import json


def read_jsonl(path):
    """The rows of a JSON-lines file, or [] when it does not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished_runs(experiment_dir, first=()):
    """The finished run folders of an experiment.

    A run folder is finished when it holds a `final.json` for the run it is
    named after (not `<run>.incomplete`, nor a non-chief worker's
    `<run>.worker<i>`).

    Args:
        experiment_dir: `pathlib.Path`, `<output_dir>/<experiment>`.
        first: run names to put first, in this order (e.g. the config's).

    Returns:
        A list of `pathlib.Path`: the runs named in `first`, then the others by name.
    """
    found = {}
    for path in sorted(experiment_dir.iterdir()) if experiment_dir.is_dir() else ():
        final = path / "final.json"
        if final.is_file() and json.loads(final.read_text())["run"] == path.name:
            found[path.name] = path
    names = [name for name in first if name in found] + [name for name in found if name not in first]
    return [found[name] for name in names]
