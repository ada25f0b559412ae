import pytest

from crate_lm.config import (
    MODEL_PRESETS,
    ConfigError,
    ModelConfig,
    apply_overrides,
    load_yaml,
    model_config_from_dict,
    parse_overrides,
)


def test_presets_and_overrides():
    cfg = ModelConfig.from_preset("125m", ista="overcomplete")
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.ista) == (768, 12, 12, "overcomplete")
    assert set(MODEL_PRESETS) >= {"tiny", "125m", "350m", "760m", "1.3b", "2.7b", "7b"}


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"unknown model preset '125M'.*did you mean '125m'"):
        model_config_from_dict({"preset": "125M"})


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.d_modle'.*did you mean 'd_model'"):
        model_config_from_dict({"d_modle": 64})


@pytest.mark.parametrize(
    "data,message",
    [
        ({"d_model": "wide"}, r"model.d_model: expected an integer, got 'wide'"),
        ({"ista": "dense"}, r"model.ista: 'dense' is not one of"),
        ({"d_model": 100, "n_heads": 3}, r"divisible by model.n_heads"),
        ({"dropout": 1.5}, r"model.dropout must be in \[0, 1\)"),
        ({"activation_checkpointing": "maybe"}, r"expected true or false"),
    ],
)
def test_bad_values_are_clear_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        model_config_from_dict(data)


def test_yaml_loading_and_malformed_yaml(tmp_path):
    good = tmp_path / "m.yaml"
    good.write_text("model:\n  preset: tiny\n  ista_eta: 3e-1\n")
    cfg = model_config_from_dict(load_yaml(good)["model"])
    assert cfg.ista_eta == pytest.approx(0.3) and cfg.d_model == 128
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: tiny\n   d_model: [1,\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*bad.yaml at line"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_dotted_overrides():
    overrides = parse_overrides(["--model.d_model", "256", "--train.lr=3e-4", "--model.arch", "gpt"])
    data = apply_overrides({"model": {"preset": "tiny"}}, overrides)
    cfg = model_config_from_dict(data["model"])
    assert cfg.d_model == 256 and cfg.arch == "gpt"
    assert data["train"]["lr"] == "3e-4" or data["train"]["lr"] == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--model.d_model"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["model.d_model", "3"])


def test_global_batch_rounds_to_the_nearest_multiple_when_asked():
    from crate_lm.config import run_config_from_dict

    exact = run_config_from_dict({"train": {"micro_batch": 8, "global_batch": 512}})
    with pytest.raises(ConfigError, match=r"not divisible .* 8 x 24 = 192.*round_global_batch"):
        exact.batch_plan(24)
    rounding = run_config_from_dict({"train": {"micro_batch": 8, "global_batch": 512, "round_global_batch": True}})
    assert rounding.batch_plan(24) == (8, 3, 576)  # 576 is 64 away from 512, 384 is 128
    assert rounding.batch_plan(3) == (8, 21, 504)
    assert rounding.batch_plan(96) == (8, 1, 768)  # fewer samples than one micro-batch per rank: one step
    assert rounding.batch_plan(16) == (8, 4, 512)  # where it divides, nothing changes


def test_every_recipe_has_a_batch_plan_for_any_cluster_size():
    """The README's claim: exact on powers of two up to 64, rounded (and said) on other counts."""
    from pathlib import Path

    from crate_lm.config import load_run_config

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        cfg = load_run_config(path)
        for world in (1, 2, 4, 8, 16, 32, 64):
            assert cfg.batch_plan(world)[2] == (cfg.train.global_batch or cfg.train.micro_batch * world), path
        if cfg.train.global_batch:  # the cluster recipes
            assert cfg.train.round_global_batch, path
            for world in (3, 6, 12, 24, 40, 48, 72, 96, 128):
                micro, accum, total = cfg.batch_plan(world)
                assert total == micro * accum * world and abs(total - cfg.train.global_batch) < micro * world
