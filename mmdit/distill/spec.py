"""The ``distill`` config section (declared with its defaults in ``configs/base.py``), validated once
into a frozen :class:`DistillSpec`.

A distillation run is an ordinary experiment config (its ``model`` is the *student*: usually the
teacher's world with ``model.chunk_frames`` set and ``chunk_causal`` in ``model.mask``; ``train``
gives the student's optimizer, batch, steps, checkpointing and EMA) plus a ``distill`` section:

=========================  =====================================================================
field                      meaning
=========================  =====================================================================
teacher                    a training workdir (``mmdit-train --workdir``) of the teacher (required)
teacher_step               its checkpoint step (None: the latest good one)
teacher_params             ``ema`` (default) or ``params`` of that checkpoint
student_init               None (the student starts as the teacher) or a run whose EMA params start
                           the student (the fake score still starts as the teacher): a regression
                           warm-up's ``W/student`` or distill workdir ``W``, or a training workdir;
                           its param tree must be the student's. Only a fresh run reads it.
guidance                   the teacher's (real score's) CFG scales, ``sample.guidance``'s form;
                           None: the teacher config's ``sample.guidance``
guidance_interval          ``(lo, hi)``: the teacher guides only where the σ it is queried at lies in
                           ``(lo, hi]`` (the DMD real score at its re-noised σ, the regression
                           pairs' ODE at each step), unguided elsewhere, as ``sample.guidance_interval``
                           does in the sampler; None: the teacher config's ``sample.guidance_interval``
denoising_step_list        the student's fixed σ list, descending, first 1.0 (e.g. ``(1.0, 0.75)``)
rollout                    ``self`` (Self-Forcing: chunks conditioned on the student's own output)
                           or ``teacher_forced`` (CausVid: chunks conditioned on ground truth)
critic_steps               critic updates per generator update (Self-Forcing: 5)
critic_lr                  the fake score's learning rate (None: ``train.lr``)
dmd_weight                 weight of the DMD generator loss (0: the regression-only ODE warm-up:
                           every iteration updates the student, the fake score is never trained)
regression_weight          weight of the regression loss on teacher ODE pairs (0: off)
regression_pairs           ``on_the_fly`` (teacher ODE each generator step) or ``records`` (fields
                           written by ``mmdit distill prepare`` into the training records, per task
                           of ``tasks``: each sample regresses on the pair of the task it drew)
ode_steps                  Euler steps of the teacher ODE for regression pairs (None: the teacher
                           config's ``sample.steps``)
ode_shift                  σ shift of that ODE (None: the teacher config's ``sample.shift``)
dmd_sigma_min, _max        range of the re-noising σ of the DMD loss (uniform, then ``flow.shift``)
tasks                      task weights of the student's rollouts (``t2av``, ``a2v``)
=========================  =====================================================================
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping

from mmdit import config_spec
from mmdit.util.plain import plain

ROLLOUTS = ("self", "teacher_forced")
REGRESSION_PAIRS = ("on_the_fly", "records")
TEACHER_PARAMS = ("ema", "params")
DISTILL_TASKS = ("t2av", "a2v")

# Fields of the record a prepared regression pair adds per task and stream the task generates (``mmdit distill
# prepare``; :func:`mmdit.distill.ode_pairs.pair_fields`).
PAIR_TARGET = "ode_{task}_target_{stream}"  # float32 [S, C]: the teacher's ODE endpoint (tokens)
PAIR_STATE = "ode_{task}_state{k}_{stream}"  # float32 [S, C]: the ODE's state at denoising_step_list[k] (k = 0: the noise)


@dataclasses.dataclass(frozen=True)
class DistillSpec:
    teacher: str
    teacher_step: int | None
    teacher_params: str
    student_init: str | None
    guidance: Mapping[str, Any] | None
    guidance_interval: tuple[float, float] | None
    denoising_step_list: tuple[float, ...]
    rollout: str
    critic_steps: int
    critic_lr: float | None
    dmd_weight: float
    regression_weight: float
    regression_pairs: str
    ode_steps: int | None
    ode_shift: float | None
    dmd_sigma_min: float
    dmd_sigma_max: float
    tasks: tuple[tuple[str, float], ...]

    @property
    def num_steps(self) -> int:
        return len(self.denoising_step_list)

    @property
    def drawn_tasks(self) -> tuple[str, ...]:
        """The tasks a sample can get (positive weight), in ``tasks`` order: what prepared pairs must cover."""
        return tuple(t for t, w in self.tasks if w > 0)

    @property
    def trains_critic(self) -> bool:
        """False for the regression-only warm-up (``dmd_weight=0``): the fake score serves only DMD."""
        return self.dmd_weight > 0

    def runs_generator(self, iteration: int) -> bool:
        """Whether iteration ``iteration`` (0-based) updates the student: every ``critic_steps``-th,
        every one in the warm-up."""
        return not self.trains_critic or iteration % self.critic_steps == 0


def _fail(field: str, value, want: str):
    raise ValueError(f"distill.{field}={value!r}: {want}; fix distill.{field} in the config or with --set")


def _num(field, value, *, lo=None, hi=None, integer=False, none_ok=False):
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (integer and not float(value).is_integer()):
        _fail(field, value, "must be an integer" if integer else "must be a number")
    v = int(value) if integer else float(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        _fail(field, value, f"must be in [{lo}, {hi}]")
    return v


def distill_spec(cfg) -> DistillSpec:
    """Validates ``cfg.distill`` (missing fields take ``configs/base.py``'s); ValueError naming the field."""
    fields = config_spec.base_defaults()["distill"]
    d = plain(config_spec.complete(cfg).distill)
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"distill.{unknown[0]} is not a distill field; the fields are {', '.join(fields)}")
    if not isinstance(d["teacher"], str) or not d["teacher"]:
        _fail("teacher", d["teacher"], "give the teacher's training workdir (mmdit-train --workdir; or mmdit distill --teacher)")
    if d["student_init"] is not None and (not isinstance(d["student_init"], str) or not d["student_init"]):
        _fail("student_init", d["student_init"], "give a warm-up run's workdir (W/student or W) or None")
    steps = tuple(float(s) for s in (d["denoising_step_list"] or ()))
    if not steps or steps[0] != 1.0 or any(b >= a for a, b in zip(steps, steps[1:])) or steps[-1] <= 0.0:
        _fail("denoising_step_list", d["denoising_step_list"], "give σ's strictly descending from 1.0, all > 0, e.g. (1.0, 0.75)")
    for field, choices in (("rollout", ROLLOUTS), ("regression_pairs", REGRESSION_PAIRS), ("teacher_params", TEACHER_PARAMS)):
        if d[field] not in choices:
            _fail(field, d[field], f"use one of {', '.join(choices)}")
    tasks = dict(d["tasks"] or {})
    bad = [t for t in tasks if t not in DISTILL_TASKS]
    if not tasks or bad or sum(tasks.values()) <= 0 or min(tasks.values()) < 0:
        _fail("tasks", tasks, f"give non-negative weights over {', '.join(DISTILL_TASKS)} with a positive sum")
    if _num("dmd_weight", d["dmd_weight"], lo=0.0) + _num("regression_weight", d["regression_weight"], lo=0.0) <= 0:
        _fail("dmd_weight", d["dmd_weight"], "with distill.regression_weight=0 nothing trains; set either above 0")
    interval = d["guidance_interval"]
    if interval is not None:
        try:
            interval = config_spec.check_guidance_interval(interval)
        except ValueError:
            _fail(
                "guidance_interval",
                interval,
                "give (lo, hi) with 0 <= lo < hi (the teacher guides where lo < sigma <= hi), or None",
            )
    lo = _num("dmd_sigma_min", d["dmd_sigma_min"], lo=0.0, hi=1.0)
    hi = _num("dmd_sigma_max", d["dmd_sigma_max"], lo=0.0, hi=1.0)
    if hi <= lo:
        _fail("dmd_sigma_max", hi, f"must exceed distill.dmd_sigma_min={lo}")
    return DistillSpec(
        teacher=d["teacher"],
        teacher_step=_num("teacher_step", d["teacher_step"], lo=0, integer=True, none_ok=True),
        teacher_params=d["teacher_params"],
        student_init=d["student_init"],
        guidance=None if d["guidance"] is None else dict(d["guidance"]),
        guidance_interval=interval,
        denoising_step_list=steps,
        rollout=d["rollout"],
        critic_steps=_num("critic_steps", d["critic_steps"], lo=1, integer=True),
        critic_lr=_num("critic_lr", d["critic_lr"], lo=0.0, none_ok=True),
        dmd_weight=_num("dmd_weight", d["dmd_weight"], lo=0.0),
        regression_weight=_num("regression_weight", d["regression_weight"], lo=0.0),
        regression_pairs=d["regression_pairs"],
        ode_steps=_num("ode_steps", d["ode_steps"], lo=1, integer=True, none_ok=True),
        ode_shift=_num("ode_shift", d["ode_shift"], lo=0.0, none_ok=True),
        dmd_sigma_min=lo,
        dmd_sigma_max=hi,
        tasks=tuple((t, float(w)) for t, w in tasks.items()),
    )
