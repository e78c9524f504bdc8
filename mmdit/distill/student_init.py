"""``distill.student_init``: the run whose params start the student (an ODE-regression warm-up).

The source is read by :mod:`mmdit.train.init_from` (metadata first, then only the params, straight
into the student's shardings) and is one of

* a **distill workdir** ``W`` (it holds ``teacher.json``): the EMA student of its latest complete
  checkpoint (``student/ema`` of the :class:`mmdit.distill.state.DistillState`);
* a **training workdir**, e.g. a finished distill run's ``W/student``: the latest step's EMA params;
* a serving bundle (``mmdit export``).

Its param tree must be the student's, path for path and shape for shape (a warm-up of the same
student config, or any run of the teacher's twin); anything else is refused naming
``distill.student_init`` and the differing paths, before the workdir is touched.
"""

from __future__ import annotations

import os

from mmdit.train import init_from
from mmdit.util import converted

DISTILL_RECORD = "teacher.json"  # mmdit.distill.loop.TEACHER_RECORD: what marks a distill workdir
DISTILL_SOURCE_TREE = "student/ema"


def open_source(path: str) -> init_from.Source:
    """The :class:`mmdit.train.init_from.Source` of ``path`` (module docstring); reads metadata only."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(os.path.join(path, DISTILL_RECORD)):
        try:
            return init_from.open_source(path)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"distill.student_init: {str(e).replace('train.init_from', 'the path')}") from None
    root = os.path.join(path, "checkpoints")
    steps = sorted((int(s) for s in os.listdir(root) if s.isdigit()), reverse=True) if os.path.isdir(root) else []
    for step in steps:
        d = os.path.join(root, str(step), "state")
        if os.path.isfile(os.path.join(d, "_METADATA")):
            prefix = DISTILL_SOURCE_TREE + "/"
            spec = {k[len(prefix) :]: v for k, v in converted.tree_metadata(d).items() if k.startswith(prefix)}
            return init_from.Source("distill workdir", path, d, DISTILL_SOURCE_TREE, spec, f"step {step} student EMA")
    raise FileNotFoundError(
        f"distill.student_init={path!r}: a distill workdir without a complete checkpoint in {root}; let the warm-up "
        "run save one (train.checkpoint_every) or give its finished W/student"
    )


def check(source: init_from.Source, student_params) -> None:
    """ValueError naming ``distill.student_init`` and the differing paths unless ``source`` holds
    exactly the params of ``student_params`` (a tree of arrays or ``ShapeDtypeStruct``s)."""
    want = {k: list(shape) for k, (shape, _) in converted.tree_spec(student_params).items()}
    have = {k: list(shape) for k, (shape, _) in source.spec.items()}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shapes = sorted(f"{k}: {have[k]} there, {want[k]} in the student" for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or shapes:
        parts = [
            f"{len(v)} {what}: " + ", ".join(v[:4]) + (" ..." if len(v) > 4 else "")
            for what, v in (("student params it lacks", missing), ("params the student lacks", extra), ("shapes differ", shapes))
            if v
        ]
        raise ValueError(
            f"distill.student_init={source.path} ({source.kind}) does not hold the student's params ("
            + "; ".join(parts)
            + "); give a warm-up run of this student's model (mmdit distill --config ...:warmup) or unset distill.student_init"
        )


def load(source: init_from.Source, student_params, shardings=None):
    """``student_params`` (the same tree) with every leaf read from ``source`` into ``shardings``."""
    keys = list(converted.tree_spec(student_params))
    plan = init_from.Plan(prefix="", loaded={k: k for k in keys}, fresh=[], ignored=[])
    return init_from.load_params(source, plan, student_params, shardings)
