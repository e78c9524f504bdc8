"""The teacher of a distillation run: a trained workdir whose model must be the student's twin.

Teacher, fake score and student share ONE param tree: the student may differ from the teacher only
in fields that carry no params (:data:`FREE_FIELDS`: the attention mask rule, ``chunk_frames``
and execution choices). :func:`check_compatible` compares the two configs' ``model`` sections and
refuses any other difference, naming every differing field, before anything is written.
"""

from __future__ import annotations

import json
import os

from mmdit import config_lib
from mmdit.distill.spec import distill_spec
from mmdit.train import checkpoint

# model.* fields the student may change: no params depend on them.
FREE_FIELDS = ("mask", "chunk_frames", "attention", "remat", "scan", "sequence_parallel", "dtype")


def _diff(a, b, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if prefix == "model" and k in FREE_FIELDS:
                continue
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}")
        return out
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return [] if norm(a) == norm(b) else [f"{prefix}: teacher {a!r}, student {b!r}"]


def model_differences(teacher_cfg, student_cfg) -> list[str]:
    """The ``model.*`` fields (outside :data:`FREE_FIELDS`) whose values differ, one line each."""
    t = json.loads(config_lib.to_json(teacher_cfg)).get("model", {})
    s = json.loads(config_lib.to_json(student_cfg)).get("model", {})
    return _diff(t, s, "model")


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
    derived = [n for n, c in (cfg.model.get("conditions", None) or {}).items() if c.get("derived", None)]
    if derived:  # the KV-cached rollouts encode conditions per chunk and do not compute derived ones
        raise ValueError(
            f"model.conditions.{derived[0]}.derived: distillation does not support derived conditions yet; distil a "
            f"teacher without it (drop model.conditions.{derived[0]} and its model.streams.*.concat entry)"
        )
    teacher_cfg = load_teacher_config(dspec.teacher)
    check_compatible(teacher_cfg, cfg, dspec.teacher)
    return dspec, teacher_cfg
