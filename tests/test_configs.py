"""Every preset initialises under eval_shape; parameter counts match the published models."""

import os
import subprocess
import sys

import pytest

from mmdit import config_lib, config_spec
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
    out = subprocess.run(
        [sys.executable, "-m", "mmdit.cli.info", "--config", "configs/jamflow.py:tiny"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "motion" in out.stdout and "FLOPs per training step" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "mmdit.cli.info", "--config", "configs/jamflow.py:tiny", "--set", "model.heads=3"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not divisible by model.heads=3" in bad.stderr


def test_config_overrides_and_missing_files():
    cfg = config_lib.override(config_lib.load("configs/unitalking.py:tiny"), ["model.num_layers=3", "sample.steps=7"])
    assert cfg.model.num_layers == 3 and cfg.sample.steps == 7
    with pytest.raises(KeyError, match="no field 'model.nope'"):
        config_lib.override(cfg, ["model.nope=1"])
    with pytest.raises(FileNotFoundError, match="presets"):
        config_lib.load("configs/does_not_exist.py")


def test_config_paths_fall_back_to_presets_only_for_bare_names(tmp_path):
    assert config_lib.resolve_path("demo:tiny") == (os.path.join(config_lib._configs_dir(), "demo.py"), "tiny")
    assert config_lib.resolve_path("demo.py")[0] == os.path.join(config_lib._configs_dir(), "demo.py")
    with pytest.raises(FileNotFoundError, match="no file '/nonexistent/dir/demo.py'"):
        config_lib.resolve_path("/nonexistent/dir/demo.py:tiny")  # never silently the shipped demo.py
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(ValueError, match="not a Python config"):
        config_lib.load(str(tmp_path / "run.json"))
    with pytest.raises(ValueError, match="is a directory"):
        config_lib.load(str(tmp_path))
    for name in ("demo", "jamflow", "mirage", "talkingmachines", "unitalking"):  # --set data.dir= works on every preset
        cfg = config_lib.override(config_lib.load(f"{name}:tiny"), ["data.dir=/data/x"])
        assert cfg.data.dir == "/data/x"


def test_unknown_override_names_the_nearest_field():
    cfg = config_lib.load("configs/demo.py:tiny")
    with pytest.raises(KeyError, match="no field 'model.no_such_field'"):
        config_lib.override(cfg, ["model.no_such_field=1"])
    with pytest.raises(KeyError, match="did you mean 'train.steps'"):
        config_lib.override(cfg, ["train.stpes=3"])
    with pytest.raises(KeyError, match="did you mean 'model.streams.video.dim'"):
        config_lib.override(cfg, ["model.streams.video.dimm=3"])
    with pytest.raises(ValueError, match="train.steps=abc"):
        config_lib.override(cfg, ["train.steps=abc"])
    # names inside open mappings may be added
    assert config_lib.override(cfg, ["tasks.tts=0.0"]).tasks.tts == 0.0


def test_variants_combine_and_unknown_variants_fail():
    ovi = config_lib.load("configs/unitalking.py:tiny,ovi")
    assert ovi.model.streams.audio.time_factor == pytest.approx(0.19676) and ovi.model.num_layers == 2
    assert "time_factor" not in config_lib.load("configs/unitalking.py:tiny").model.streams.audio
    # the valid names, then ONE example with the file (not every variant glued together by commas)
    names = r"([a-z0-9]+, )*plain(, [a-z0-9]+)*, tiny(, [a-z0-9]+)*"
    with pytest.raises(
        ValueError,
        match=rf"^config configs/demo\.py: unknown variant\(s\) 'tinyy'; valid variants: {names} "
        r"\(one, or several joined by commas\), e\.g\. configs/demo\.py:tiny$",
    ):
        config_lib.load("configs/demo.py:tiny,tinyy")
    with pytest.raises(
        ValueError, match=r"unknown variant\(s\) 'x'; valid variants: full, steps4, tiny, warmup .* e\.g\. demo_distill:tiny$"
    ):
        config_lib.load("demo_distill:x")  # a preset name: the example names it as given


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_validates_every_section(name):
    from mmdit import config_spec

    for arg in ("", ":tiny"):
        run = config_spec.build_run_spec(config_lib.load(f"configs/{name}.py{arg}"))
        assert run.train.steps >= 1 and run.sample.tasks and all(w >= 0 for _, w in run.tasks)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("train.steps=-5", "train.steps=-5 must be >= 1"),
        ("train.steps=0", "train.steps=0 must be >= 1"),
        ("train.grad_accum=3", "not divisible by train.grad_accum=3"),
        ("train.schedule='linear'", "train.schedule='linear': choose one of"),
        ("train.ema_decay=1.0", "train.ema_decay=1.0 must be < 1"),
        ("sample.shift=-1", "sample.shift=-1.0 must be > 0"),
        ("sample.steps=0", "sample.steps=0 must be >= 1"),
        ("sample.num_per_task=0", "sample.num_per_task=0 must be >= 1"),
        ("sample.guidance_mode='x'", "sample.guidance_mode='x': choose one of"),
        ("sample.tasks=('t2x',)", "unknown task"),
        ("sample.tasks=('a2v_features',)", "sample.tasks="),
        ("sample.stream_shift.vidoe=2.0", "sample.stream_shift \\(or --stream-shift\\) names \\['vidoe'\\]"),
        ("flow.condition_dropout.txt=0.1", "flow.condition_dropout names \\['txt'\\]"),
        ("flow.independent_streams=1.5", "flow.independent_streams=1.5 must be <= 1"),
        ("flow.sigma_dist='gauss'", "flow.sigma_dist='gauss'"),
        ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
        ("mesh.data=0", "mesh.data=0 is not a valid mesh axis size"),
        ("tasks.t2av=-1.0", "weights must be >= 0"),
    ],
)
def test_bad_values_fail_naming_the_field(setting, message):
    from mmdit import config_spec

    cfg = config_lib.override(config_lib.load("configs/demo.py:tiny"), [setting])
    with pytest.raises(ValueError, match=message):
        config_spec.build_run_spec(cfg)


def test_override_returns_a_copy_and_opens_kind_specific_options():
    cfg = config_lib.load("configs/demo.py:tiny")
    out = config_lib.override(cfg, ["train.steps=11", "codecs.video.luma_coeffs=2"])
    assert out.train.steps == 11 and cfg.train.steps != 11  # the input is not mutated
    assert out.codecs.video.luma_coeffs == 2
    # a new option inside a codec/encoder sub-dict is accepted here and checked by its registry
    typo = config_lib.override(cfg, ["codecs.video.lumacoeffs=2"])
    with pytest.raises(ValueError, match="lumacoeffs"):
        config_spec.build_run_spec(typo)
    with pytest.raises(KeyError, match="no field 'codecs.video.nested'"):  # only one level down: codecs.<name>.<option>
        config_lib.override(cfg, ["codecs.video.nested.x=1"])
