"""The teacher of a distillation run: a trained workdir whose model must be the student's twin.

Teacher, fake score and student share ONE param tree: the student may differ from the teacher only
in fields that carry no params (:data:`FREE_FIELDS`: the attention mask rule, ``chunk_frames``
and execution choices). :func:`check_compatible` compares the models the two configs' ``model``
sections build (:func:`mmdit.model.spec_diff.model_differences`: one model spelled two ways is no
difference) and refuses any other difference, naming every differing field, before anything is written.
"""

from __future__ import annotations

import json
import os

from mmdit import config_lib
from mmdit.distill.spec import distill_spec
from mmdit.model import spec_diff
from mmdit.train import checkpoint

# model.* fields the student may change: no params depend on them.
FREE_FIELDS = ("mask", "chunk_frames", "attention", "remat", "scan", "sequence_parallel", "dtype")


def _teacher_student(path: str, teacher, student) -> str:
    return f"{path}: teacher {teacher!r}, student {student!r}"


def model_differences(teacher_cfg, student_cfg) -> list[str]:
    """The ``model.*`` fields (outside :data:`FREE_FIELDS`) in which the built models differ, one line each."""
    t = json.loads(config_lib.to_json(teacher_cfg)).get("model", {})
    s = json.loads(config_lib.to_json(student_cfg)).get("model", {})
    return spec_diff.model_differences(t, s, ignore=FREE_FIELDS, say=_teacher_student)


def load_teacher_config(teacher: str):
    """The teacher workdir's resolved config (``config.json``); FileNotFoundError naming the field."""
    if not os.path.isfile(os.path.join(teacher, "config.json")):
        raise FileNotFoundError(
            f"distill.teacher={teacher!r} is not a training workdir (no config.json); give the --workdir of a "
            "trained teacher (mmdit-train)"
        )
    return checkpoint.load_config(teacher)


def check_compatible(teacher_cfg, student_cfg, teacher: str) -> None:
    """ValueError naming every differing ``model`` field when the student is not the teacher's twin."""
    diffs = model_differences(teacher_cfg, student_cfg)
    if diffs:
        raise ValueError(
            f"distill.teacher={teacher} does not match the student's model (" + "; ".join(diffs) + "); the student may "
            f"differ only in model.{{{', '.join(FREE_FIELDS)}}}: distil from a teacher of the same streams, shapes and "
            "conditions, or fix the student config"
        )


def load_teacher(teacher: str, step: int | None, which: str, *, verify: bool = True):
    """``(teacher config, unboxed params, step)`` of the teacher workdir's checkpoint (host arrays)."""
    cfg, params, restored = checkpoint.restore_inference(teacher, step=step, which=which, verify=verify)
    return cfg, params, restored


def check_teacher(cfg):
    """``(distill spec, teacher config)`` of a distill config once its student is known to be the
    teacher's twin; ValueError / FileNotFoundError naming the field otherwise. Writes nothing."""
    dspec = distill_spec(cfg)
    teacher_cfg = load_teacher_config(dspec.teacher)
    check_compatible(teacher_cfg, cfg, dspec.teacher)
    return dspec, teacher_cfg
