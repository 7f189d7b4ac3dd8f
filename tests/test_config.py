import re
from pathlib import Path

import pytest
import yaml

from medldm.config import STAGES, ConfigError, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_tiny_yaml_equals_builtin_defaults(stage):
    # a subcommand without --config runs the built-in defaults and says they are configs/<stage>/tiny.yaml
    assert (yaml.safe_load((ROOT / "configs" / stage / "tiny.yaml").read_text(encoding="utf-8"))
            == to_dict(STAGES[stage]()))


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
    ("train.grad_clip=0", r"grad_clip must be > 0"),  # clip_grad_norm_ would zero every gradient
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


NON_FINITE = ["nan", "inf", "-inf", ".nan", ".inf", "-.inf", "1e999"]


@pytest.mark.parametrize("value", NON_FINITE)
def test_non_finite_numbers_are_refused_from_overrides_and_yaml(value, tmp_path):
    shown = {"nan": "nan", ".nan": "nan", "-inf": "-inf", "-.inf": "-inf"}.get(value, "inf")
    with pytest.raises(ConfigError, match=rf"^diffusion\.train\.lr: {shown} is not a finite number$"):
        load_config("diffusion", None, [f"train.lr={value}"])
    path = tmp_path / "ldm.yaml"
    path.write_text(f"train:\n  lr: {value}\n", encoding="utf-8")
    in_file = re.escape(f"(in {path})")
    with pytest.raises(ConfigError, match=rf"^diffusion\.train\.lr: {shown} is not a finite number {in_file}$"):
        load_config("diffusion", path)


@pytest.mark.parametrize("stage, override, key", [
    ("preprocess", "spacing=[2.0,.nan,2.0]", r"preprocess\.spacing\[1\]"),
    ("autoencoder", "kl_weight=.inf", r"autoencoder\.kl_weight"),
    ("diffusion", "train.time_limit_minutes=.inf", r"diffusion\.train\.time_limit_minutes"),  # 0 is "no limit"
    ("evaluate", "plausibility_z=nan", r"evaluate\.plausibility_z"),
])
def test_every_float_field_of_every_stage_refuses_non_finite_numbers(stage, override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: -?(nan|inf) is not a finite number$"):
        load_config(stage, None, [override])


def test_the_cli_refuses_a_nan_learning_rate_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    run = tmp_path / "ldm"
    # the medldm of this checkout first, whichever one is pip-installed; the config is refused before --data is read
    done = subprocess.run([str(Path(sys.executable).with_name("medldm")), "train", "diffusion", "--data",
                           str(tmp_path / "data"), "--autoencoder", str(tmp_path / "ae"), "--run-dir", str(run),
                           "--set", "train.lr=nan"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("medldm ")]
    assert errors == ["medldm train: error: diffusion.train.lr: nan is not a finite number"], done.stderr
    assert not run.exists()
