import math

import pytest

from privatune.common.config import PRESETS, ConfigError, RunConfig


def test_presets_resolve_their_defaults():
    for name, preset in PRESETS.items():
        cfg = RunConfig.create(preset=name)
        assert cfg.model == preset.model and cfg.dataset == preset.dataset
        assert cfg.lr == preset.lr and cfg.batch_size == preset.batch_size
        assert len(cfg.label_names) >= 2


def test_flower_kebab_keys_and_string_values_are_coerced():
    cfg = RunConfig.from_flower({"preset": "trec6", "target-epsilon": "1.5", "dp": "false", "num-server-rounds": "3"})
    assert cfg.target_epsilon == 1.5 and cfg.dp is False and cfg.num_server_rounds == 3
    assert not cfg.private
    back = RunConfig.from_flower(cfg.to_flower())
    assert back == cfg


@pytest.mark.parametrize(
    "values, key",
    [
        ({"preset": "imagenet"}, "unknown preset"),
        ({"target-epsilon": 0}, "target-epsilon"),
        ({"target-epsilon": -1}, "target-epsilon"),
        ({"target-epsilon": 1e308}, r"target-epsilon: .*\[0.01, 100\]"),
        ({"target-epsilon": 1e-300}, r"target-epsilon: .*\[0.01, 100\]"),
        ({"accountant": "gdp"}, "accountant"),
        ({"mode": "lora-xl"}, "mode"),
        ({"mode": "lora", "lora-blocks": -1}, "lora-blocks: must be >= 0"),
        ({"delta": 1.5}, "delta"),
        ({"partition": "shards"}, "partition"),
        ({"alpha": 0}, "alpha"),
        ({"num-server-rounds": "two"}, "num-server-rounds"),
        ({"no-such-key": 1}, "unknown run-config key"),
        ({"labels": "a,a"}, "labels"),
    ],
)
def test_bad_configuration_is_refused_with_the_key_named(values, key):
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_flower(values)


def test_infinite_epsilon_means_no_dp():
    cfg = RunConfig.create(target_epsilon=math.inf)
    assert not cfg.private


def test_prv_is_the_default_accountant_everywhere():
    import tomllib
    from pathlib import Path

    from privatune.common.accountants import ACCOUNTANTS, DEFAULT_ACCOUNTANT

    toml = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert RunConfig.create().accountant == DEFAULT_ACCOUNTANT == "prv"
    assert toml["tool"]["flwr"]["app"]["config"]["accountant"] == DEFAULT_ACCOUNTANT
    for name in ACCOUNTANTS:
        assert RunConfig.create(accountant=name).accountant == name


def test_an_explicit_noise_multiplier_needs_no_calibration_range():
    cfg = RunConfig.create(target_epsilon=1e308, noise_multiplier=1.0)  # the target is never calibrated to
    assert cfg.private and cfg.noise_multiplier == 1.0
