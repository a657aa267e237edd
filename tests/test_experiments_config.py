"""Experiment configs: defaults, validation errors that name the key, overrides, runs."""

import json
import pathlib

import pytest

from keras_adascale.experiments import config

REPO_DEMO = pathlib.Path(__file__).resolve().parent.parent / "saved_configs" / "demo.yaml"


def test_an_empty_config_is_one_run_with_every_default():
    (run,) = config.resolve({}, name="empty")
    expected = config.defaults()
    expected.pop("runs")
    expected["name"] = "empty"
    assert run == {**expected, "run": "adascale"}


def test_runs_override_the_top_level_keys_deeply():
    raw = {
        "optimizer": {"scale": 4, "momentum": 0.5},
        "runs": [{"name": "a"}, {"name": "b", "optimizer": {"name": "lsr"}}],
    }
    a, b = config.resolve(raw, name="x")
    assert (a["run"], a["optimizer"]["name"], a["optimizer"]["scale"]) == ("a", "adascale", 4)
    assert (b["run"], b["optimizer"]["name"], b["optimizer"]["scale"], b["optimizer"]["momentum"]) == (
        "b", "lsr", 4, 0.5)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"optimiser": {}}, "unknown config key 'optimiser'; did you mean 'optimizer'"),
        ({"optimizer": {"scal": 2}}, "unknown config key 'optimizer.scal'; did you mean 'optimizer.scale'"),
        ({"optimizer": {"name": "adamw"}}, "'optimizer.name' must be one of adascale, sgd, lsr, lsr_warmup, "
         "adascale_adam, adam, adam_fixed, adam_sqrt, adam_linear; got 'adamw'"),
        ({"optimizer": {"statistics": "adaptdl"}}, "'optimizer.statistics' must be one of raw, preconditioned"),
        ({"optimizer": {"beta_2": 1.0}}, "optimizer.beta_2 must be in \\[0, 1\\)"),
        ({"optimizer": {"scale": 0}}, "'optimizer.scale' must be >= 1"),
        ({"optimizer": {"scale": 2.5}}, "N = 2.5 gradient samples of dataset.batch_size=32; N must be a whole"),
        ({"optimizer": {"scale": True}}, "'optimizer.scale' must be a number"),
        ({"optimizer": {"scale": "8"}}, "'optimizer.scale' must be a number"),
        ({"optimizer": {"baseline_batch_size": 0}}, "'optimizer.baseline_batch_size' must be >= 1"),
        ({"optimizer": {"momentum": 1.5}}, "optimizer.momentum must be in \\[0, 1\\]"),
        ({"optimizer": {"scale": float("inf")}}, "optimizer.scale must be a finite number >= 1; got inf"),
        ({"optimizer": {"scale": float("nan")}}, "'optimizer.scale' must be >= 1; got nan"),
        ({"schedule": {"learning_rate": float("nan")}}, "'schedule.learning_rate' must be >= 0.0; got nan"),
        ({"optimizer": {"warmup_fraction": 1.5}}, "optimizer.warmup_fraction must be in \\[0, 1\\]; got 1.5"),
        ({"optimizer": {"smoothing": 1.0}}, "optimizer.smoothing must be in \\[0, 1\\)"),
        ({"dataset": {"batch_size": None}}, "'dataset.batch_size' must not be null"),
        ({"dataset": 3}, "config section 'dataset' must be a mapping"),
        ({"strategy": {"name": "mirrored", "devices": 4}, "optimizer": {"scale": 6}},
         "optimizer.scale=6 .* N = 6 gradient samples .* whole multiple of the 4 replicas"),
        ({"strategy": {"name": "mirrored", "devices": 3}, "optimizer": {"name": "lsr", "scale": 2},
          "dataset": {"batch_size": 16}}, "global batch .* = 32 must be a whole number that splits evenly over 3 replicas"),
        ({"schedule": {"decay_at": [0.75, 0.5]}}, "schedule.decay_at must be increasing fractions"),
        ({"schedule": {"decay_at": [1.5]}}, "schedule.decay_at must be increasing fractions"),
        ({"model": {"name": "mlp", "hidden_units": []}}, "model.hidden_units must be a non-empty list"),
        ({"runs": [{"optimizer": {}}]}, "runs\\[0\\] must be a mapping with a non-empty string 'name'"),
        ({"runs": [{"name": "a"}, {"name": "a"}]}, "the run name 'a' is used twice"),
        ({"runs": [{"name": "a", "optimizer": {"scale": -1}}]}, "'optimizer.scale' must be >= 1"),
    ],
)
def test_bad_configs_are_refused_with_a_message_naming_the_key(raw, message):
    with pytest.raises(config.ConfigError, match=message):
        config.resolve(raw, name="bad")


def overridden_runs():
    raw = {"runs": [{"name": "a"}, {"name": "b"}]}
    raw = config.apply_overrides(raw, ["optimizer.scale=8", "runs.b.optimizer.name=lsr", "dataset.augment=true"])
    return config.resolve(raw, name="x")


def test_set_overrides_parse_values_as_yaml():
    a, b = overridden_runs()
    assert a["optimizer"]["scale"] == b["optimizer"]["scale"] == 8
    assert a["dataset"]["augment"] is True


def test_a_set_override_of_one_run_reaches_that_run_only():
    a, b = overridden_runs()
    assert (a["optimizer"]["name"], b["optimizer"]["name"]) == ("adascale", "lsr")


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.scale", "--set expects key.path=value"),
        ("runs.c.optimizer.scale=2", "no run named 'c'"),
        ("seed.value=1", "'seed' is not a section"),
    ],
)
def test_bad_overrides_are_refused(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.apply_overrides({"seed": 0, "runs": [{"name": "a"}]}, [override])


def test_load_reads_yaml_and_json(tmp_path):
    (tmp_path / "a.yaml").write_text("optimizer:\n  scale: 2\n")
    (tmp_path / "b.json").write_text(json.dumps({"optimizer": {"scale": 3}}))
    assert config.load(tmp_path / "a.yaml")[0]["optimizer"]["scale"] == 2
    assert config.load(tmp_path / "a.yaml")[0]["name"] == "a"
    assert config.load(tmp_path / "b.json", ["optimizer.scale=5"])[0]["optimizer"]["scale"] == 5


def test_load_names_a_missing_file(tmp_path):
    with pytest.raises(config.ConfigError, match="config file not found: .*missing.yaml"):
        config.load(tmp_path / "missing.yaml")


def test_load_names_a_file_that_is_not_yaml(tmp_path):
    (tmp_path / "broken.yaml").write_text("optimizer: [1,\n")
    with pytest.raises(config.ConfigError, match="broken.yaml: not valid YAML"):
        config.load(tmp_path / "broken.yaml")


def test_load_refuses_a_top_level_that_is_not_a_mapping(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(config.ConfigError, match="the top level must be a mapping"):
        config.load(tmp_path / "list.yaml")


def test_describe_lists_every_key_with_its_default():
    text = config.describe()
    assert "optimizer.scale = 1:" in text
    assert "strategy.name = \"default\"" in text and "one of: default, mirrored, multi_worker, tpu" in text
    assert "dataset.batch_size = 32:" in text


def float_scale(name="adascale"):
    # Recipe tuned at B0 = 16; samples of 8 examples; S = 2.5 -> 40 examples = N = 5 samples.
    return {"optimizer": {"name": name, "scale": 2.5, "baseline_batch_size": 16}, "dataset": {"batch_size": 8}}


def test_a_float_scale_with_a_baseline_batch_round_trips(tmp_path):
    (run,) = config.resolve(float_scale(), "x")
    assert run["optimizer"]["scale"] == 2.5
    assert json.loads(json.dumps(run)) == run  # config.json keeps the float S as it is
    (tmp_path / "x.yaml").write_text("optimizer: {scale: 2.5, baseline_batch_size: 16}\ndataset: {batch_size: 8}\n")
    assert config.load(tmp_path / "x.yaml") == [run]


def test_a_float_scale_with_a_baseline_batch_sets_the_samples():
    (run,) = config.resolve(float_scale(), "x")
    assert config.batches_per_update(run, replicas=1) == (8, 5)


def test_a_float_scale_under_the_linear_scaling_rule_is_one_global_batch_of_s_baseline_batches():
    (lsr,) = config.resolve(float_scale("lsr"), "x")
    assert config.batches_per_update(lsr, replicas=1) == (40, 1)  # one global batch of S x B0


def test_a_bigger_sample_batch_than_the_baseline_lowers_the_samples_per_update():
    raw = {"optimizer": {"scale": 8, "baseline_batch_size": 32}, "dataset": {"batch_size": 64},
           "strategy": {"name": "mirrored", "devices": 4}}
    (run,) = config.resolve(raw, "x")
    assert config.batches_per_update(run, replicas=4) == (256, 1)  # N = 4 = 8 x 32 / 64


def test_every_mistake_of_a_config_is_reported_at_once(tmp_path):
    (tmp_path / "typos.yaml").write_text(
        "dataset: {batch_sise: 64}\noptimizer: {momentun: 0.9, scale: 0}\n"
        "runs:\n  - {name: a, schedule: {decay_at: [0.9, 0.1]}}\n  - {name: b, model: {nmae: mlp}}\n"
    )
    with pytest.raises(config.ConfigError) as error:
        config.load(tmp_path / "typos.yaml")
    message = str(error.value)
    assert message.startswith("the config has 5 errors:\n")
    for expected in ("unknown config key 'dataset.batch_sise'; did you mean 'dataset.batch_size'",
                     "unknown config key 'optimizer.momentun'; did you mean 'optimizer.momentum'",
                     "'optimizer.scale' must be >= 1",
                     "run 'a': schedule.decay_at must be increasing fractions",
                     "run 'b': unknown config key 'model.nmae'; did you mean 'model.name'"):
        assert message.count(expected) == 1, expected


def test_a_top_level_value_that_breaks_a_rule_is_reported_once_for_all_runs():
    with pytest.raises(config.ConfigError) as error:
        config.resolve({"optimizer": {"momentum": 1.5}, "runs": [{"name": "a"}, {"name": "b"}]}, name="x")
    assert str(error.value) == "runs 'a', 'b': optimizer.momentum must be in [0, 1]; got 1.5"


def accepts(make):
    """Whether `make()` runs without refusing its arguments."""
    try:
        make()
    except ValueError:  # config.ConfigError is one too
        return False
    return True


@pytest.mark.parametrize("momentum", [0.0, 0.5, 1.0, 1.5, -0.1])
def test_the_config_the_optimizer_and_keras_agree_on_momentum(momentum):
    import keras

    import keras_adascale

    keras_accepts = accepts(lambda: keras.optimizers.SGD(momentum=momentum))
    assert keras_accepts == (0 <= momentum <= 1)  # Keras's rule, which the other two follow
    assert accepts(lambda: keras_adascale.AdaScaleSGD(momentum=momentum)) == keras_accepts
    assert accepts(lambda: config.resolve({"optimizer": {"momentum": momentum}}, name="x")) == keras_accepts


@pytest.mark.parametrize("smoothing", [0.0, 0.99, 1.0, -0.1])
def test_the_config_and_the_optimizer_agree_on_smoothing(smoothing):
    import keras_adascale

    optimizer_accepts = accepts(lambda: keras_adascale.AdaScaleSGD(smoothing=smoothing))
    config_accepts = accepts(lambda: config.resolve({"optimizer": {"smoothing": smoothing}}, name="x"))
    assert optimizer_accepts == config_accepts == (0 <= smoothing < 1)


@pytest.mark.parametrize("scale", [1, 2.5, 0.5, float("inf"), float("nan")])
def test_the_config_and_the_optimizer_agree_on_scale(scale):
    import keras_adascale

    raw = {"optimizer": {"scale": scale, "baseline_batch_size": 16}, "dataset": {"batch_size": 8}}
    optimizer_accepts = accepts(lambda: keras_adascale.AdaScaleSGD(scale=scale, gradient_accumulation_steps=5))
    assert optimizer_accepts == accepts(lambda: config.resolve(raw, name="x")) == (1 <= scale < float("inf"))


def test_the_model_choices_are_the_model_registrys_names():
    from keras_adascale.experiments import models

    with pytest.raises(config.ConfigError) as error:
        config.resolve({"model": {"name": "vgg"}}, name="x")
    assert str(error.value) == (
        "config key 'model.name' must be one of " + ", ".join(models.REGISTRY) + "; got 'vgg'")
    assert set(models.REGISTRY) == {"mlp", "small_cnn", "resnet20", "resnet18", "resnet50", "char_lm"}


def test_a_refused_value_is_not_judged_again_through_the_default_left_in_its_place():
    raw = config.apply_overrides(config.load_raw(REPO_DEMO), ["optimizer.scale=0"])
    with pytest.raises(config.ConfigError) as error:
        config.resolve(raw, name="demo")
    message = str(error.value)
    assert "'optimizer.scale' must be >= 1; got 0" in message
    assert "whole multiple" not in message and "optimizer.scale=1" not in message


def test_groups_need_an_adascale_optimizer_and_keras_s_jax_backend():
    with pytest.raises(config.ConfigError, match=r"optimizer.groups=2 gives an AdaScale optimizer \(adascale, "
                                                 r"adascale_adam\) several gradient samples of each device's batch; "
                                                 r"got optimizer.name=sgd"):
        config.resolve({"optimizer": {"name": "sgd", "groups": 2}}, "x")
    runs = config.resolve({"optimizer": {"scale": 4, "groups": 2}, "runs": [{"name": "grouped"}]}, "x")
    # N = 4 samples: 2 groups x 2 accumulation steps of one replica; each fit step holds 2 x 32 rows.
    assert config.batches_per_update(runs[0], 1) == (64, 2)
    with pytest.raises(config.ConfigError, match=r"N must be a whole multiple of the 1 replica x optimizer.groups=3"):
        config.resolve({"optimizer": {"scale": 4, "groups": 3}}, "x")
    from keras_adascale.experiments import strategies

    with pytest.raises(config.ConfigError, match=r"optimizer.groups > 1 \(run 'grouped'\) splits each device's batch "
                                                 r"into gradient samples on Keras's JAX backend only"):
        strategies.check_backend(runs, backend="tensorflow")
