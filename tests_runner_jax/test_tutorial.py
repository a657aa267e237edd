"""The JAX tutorial (tutorials/05_jax_data_parallel.ipynb) runs top to bottom on KERAS_BACKEND=jax with small
settings: with no accelerator here, AdaScaleModel under DataParallel over the 4 host CPU devices it asks for."""

import re

from notebooks import TUTORIALS, execute, images, is_jax, printed


def test_jax_tutorial_trains_on_four_host_devices_and_plots(tfds_data_dir, tmp_path, monkeypatch):
    (path,) = [path for path in TUTORIALS if is_jax(path)]
    notebook = execute(path, tfds_data_dir, tmp_path, monkeypatch)
    text = printed(notebook)
    assert "4 CPU device(s)" in text, text
    assert "S = 4: 4 replica(s) x 1 accumulation step(s) of B = 32" in text, text
    found = re.search(r"AdaScale S = 4: (\d+) updates for tau = (\d+) in \d+ s, test accuracy ([\d.]+)", text)
    assert found, text
    updates, tau, accuracy = int(found[1]), int(found[2]), float(found[3])
    baseline = float(re.search(r"single batch: 300 updates in \d+ s, test accuracy ([\d.]+)", text)[1])
    assert tau >= 300 and updates < 300, text  # stopped at tau >= T_SI, in fewer updates than the single batch
    assert accuracy > 0.8 and baseline > 0.8, text
    assert images(notebook), "the tutorial shows its plot"
