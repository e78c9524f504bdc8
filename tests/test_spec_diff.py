"""Saved vs new model configs compared on the built model (mmdit/model/spec_diff.py): resuming a workdir
and a distillation teacher accept one model spelled two ways and refuse a real difference, naming it."""

import os

import pytest

from mmdit import config_lib
from mmdit.distill import teacher as teacher_lib
from mmdit.train import checkpoint


def spelled_out(cfg):
    """``cfg`` (the tiny demo: a derived ``first_frame`` condition, dim/length unset) with every value the
    model spec derives written explicitly: the same model."""
    cfg = config_lib.override(cfg, [])
    video = cfg.model.streams.video
    tokens_per_frame = (video.shape[1] // video.patch[1]) * (video.shape[2] // video.patch[2])
    cfg.model.conditions.first_frame.dim = video.channels * video.patch[0] * video.patch[1] * video.patch[2]
    cfg.model.conditions.first_frame.length = video.shape[0] // video.patch[0] * tokens_per_frame
    cfg.model.time_reference = "video"  # the default: the first grid stream
    cfg.model.joint_layers = tuple(range(cfg.model.num_layers))  # the default: every layer
    return cfg


def workdir_with_checkpoints(tmp_path, cfg):
    work = str(tmp_path / "run")
    config_lib.write_resolved(cfg, work)
    os.makedirs(checkpoint.checkpoint_dir(work))
    return work


def test_resume_accepts_the_same_model_spelled_differently(tmp_path):
    saved = config_lib.load("configs/demo.py:tiny")
    assert saved.model.conditions.first_frame.get("dim", None) is None  # the case this covers
    work = workdir_with_checkpoints(tmp_path, saved)
    checkpoint.check_config_matches(work, spelled_out(saved))
    # and the other way round: saved explicitly, resumed with the values left to the spec
    checkpoint.check_config_matches(workdir_with_checkpoints(tmp_path / "b", spelled_out(saved)), saved)
    # execution choices may change
    checkpoint.check_config_matches(work, config_lib.override(saved, ["model.remat=full", "model.scan=False"]))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["model.streams.video.channels=4"], "model.streams.video.channels was 8, now 4"),
        (["model.joint_guidance=False"], "model.joint_guidance was True, now False"),
        (["model.text_encoder.layers=3"], "model.text_encoder.layers was 2, now 3"),  # not a spec field: as written
        (["model.mask=full"], "model.mask was"),
    ],
)
def test_resume_refuses_a_different_model_naming_the_field(tmp_path, overrides, field):
    saved = config_lib.load("configs/demo.py:tiny")
    work = workdir_with_checkpoints(tmp_path, spelled_out(saved))
    with pytest.raises(ValueError, match="holds checkpoints of a different model") as e:
        checkpoint.check_config_matches(work, config_lib.override(saved, overrides))
    assert field in str(e.value)


def test_resume_refuses_a_derived_condition_that_now_differs(tmp_path):
    """The derived condition's built width follows its stream: a stream change shows there too."""
    saved = spelled_out(config_lib.load("configs/demo.py:tiny"))
    work = workdir_with_checkpoints(tmp_path, saved)
    cfg = config_lib.override(config_lib.load("configs/demo.py:tiny"), ["model.streams.video.patch=(1, 2, 2)"])
    with pytest.raises(ValueError) as e:
        checkpoint.check_config_matches(work, cfg)
    assert "model.conditions.first_frame.dim was 128, now 32" in str(e.value)
    assert "model.streams.video.patch was [1, 4, 4], now [1, 2, 2]" in str(e.value)


def test_a_teacher_spelled_differently_is_the_students_twin():
    teacher = spelled_out(config_lib.load("configs/demo.py:tiny"))
    student = config_lib.override(config_lib.load("configs/demo.py:tiny"), ["model.chunk_frames=1.0", "model.dtype=bfloat16"])
    assert teacher_lib.model_differences(teacher, student) == []
    other = config_lib.override(student, ["model.heads=4"])  # the derived head_dim follows: both named
    assert teacher_lib.model_differences(teacher, other) == [
        "model.head_dim: teacher 24, student 12",
        "model.heads: teacher 2, student 4",
    ]
