from pathlib import Path

import pytest
import yaml

from medldm.config import STAGES, ConfigError, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_tiny_yaml_equals_builtin_defaults(stage):
    # a subcommand without --config runs the built-in defaults and says they are configs/<stage>/tiny.yaml
    assert yaml.safe_load((ROOT / "configs" / stage / "tiny.yaml").read_text(encoding="utf-8")) == to_dict(STAGES[stage]())


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads(path):
    load_config(path.parent.name, path)


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    bad = tmp_path / "ae.yaml"
    bad.write_text("train:\n  stepz: 10\n")
    with pytest.raises(ConfigError, match=r"autoencoder\.train.*stepz.*valid keys"):
        load_config("autoencoder", bad)


@pytest.mark.parametrize("override, match", [
    ("train.lr=fast", r"diffusion\.train\.lr: expected a number"),
    ("train.steps=1.5", r"diffusion\.train\.steps: expected an integer"),
    ("model.channels=[30,64]", r"divisible by norm_num_groups"),
    ("conditioning.keys=[age,age]", r"lists a condition twice"),
    ("conditioning.drop_all_prob=1.0", r"drop_all_prob must be in \[0, 1\)"),
    ("latents_on=gpu", r"use auto, device or host"),
    ("scheduler.beta_end=0.001", r"beta_start < beta_end"),
    ("nonsense", r"expected key=value"),
])
def test_bad_values_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("diffusion", None, [override])


def test_overrides_change_nested_values_and_keep_stage_defaults():
    cfg = load_config("autoencoder", None, ["train.steps=7", "model.channels=[8,16]",
                                            "model.attention_levels=[false,false]"])
    assert cfg.train.steps == 7
    assert cfg.model.channels == (8, 16)
    assert cfg.train.lr == STAGES["autoencoder"]().train.lr  # the stage's default, not TrainConfig's
    assert load_config("autoencoder", None, ["train.lr=3e-4"]).train.lr == 3e-4  # YAML reads this as a string


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config("preprocess", "nope.yaml")
