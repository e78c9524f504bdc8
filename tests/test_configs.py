"""Every preset initialises under eval_shape; parameter counts match the published models."""

import subprocess
import sys

import pytest

from mmdit import config_lib
from mmdit.cli.info import model_info

PRESETS = ["demo", "unitalking", "talkingmachines", "mirage", "jamflow"]


@pytest.mark.parametrize("name", PRESETS)
def test_tiny_variants_build(name):
    info = model_info(config_lib.load(f"configs/{name}.py:tiny"))
    assert info["params_total"] > 0 and info["flops_train_step"] > 0


@pytest.mark.slow
def test_full_presets_match_published_parameter_counts():
    ut = model_info(config_lib.load("configs/unitalking.py"))
    v = ut["streams"]["video"]["params"]
    assert abs(v - 5.0e9) / 5.0e9 < 0.03, v  # Wan2.2-TI2V-5B
    a = ut["streams"]["audio"]
    assert a["params"] - a["params_cross_attention"]["ref_audio"] == pytest.approx(v, rel=0.01)  # identical twin
    assert ut["streams"]["video"]["tokens"] == 31 * 22 * 22 and ut["streams"]["audio"]["tokens"] == 157

    tm = model_info(config_lib.load("configs/talkingmachines.py"))
    s = tm["streams"]["video"]
    base = s["params"] - s["params_cross_attention"]["audio_features"]
    assert abs(base - 14.29e9) / 14.29e9 < 0.03, base  # Wan2.1-14B
    assert 17e9 < s["params"] < 19.5e9  # paper: 18B with audio attention
    assert 0.3 < tm["attended_fraction"] < 0.45  # chunk_causal over 7 chunks

    mi = model_info(config_lib.load("configs/mirage.py"))
    assert 9e9 < mi["params_total"] < 11e9
    jf = model_info(config_lib.load("configs/jamflow.py"))
    assert jf["joint_layers"] == list(range(0, 22, 2)) and jf["attended_fraction"] < 1.0


def test_mmdit_info_cli_reports_and_errors():
    out = subprocess.run([sys.executable, "-m", "mmdit.cli.info", "--config", "configs/jamflow.py:tiny"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "motion" in out.stdout and "FLOPs per training step" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "mmdit.cli.info", "--config", "configs/jamflow.py:tiny", "--set", "model.heads=3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "not divisible by model.heads=3" in bad.stderr


def test_config_overrides_and_missing_files():
    cfg = config_lib.override(config_lib.load("configs/unitalking.py:tiny"), ["model.num_layers=3", "sample.steps=7"])
    assert cfg.model.num_layers == 3 and cfg.sample.steps == 7
    with pytest.raises(KeyError, match="no field 'model.nope'"):
        config_lib.override(cfg, ["model.nope=1"])
    with pytest.raises(FileNotFoundError, match="presets"):
        config_lib.load("configs/does_not_exist.py")
