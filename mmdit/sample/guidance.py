"""Multi-condition classifier-free guidance: CFG plans, batched evaluation layout, guided velocity,
scale schedules, and the resolved :class:`Guidance` setting of a sampler.

Conditions ``c_1..c_n`` are guided in order (e.g. text, ref_audio, audio). A *plan*
(:func:`cfg_batch_plan`) is the list of ``P = n + 1`` condition-keep patterns ``{c: bool}`` a step
evaluates; one batched forward pass covers them all, pattern-major: every ``[B, ...]`` input is tiled
to ``[P·B, ...]`` (:func:`repeat_for_cfg`) with keep flags ``{c: bool[P·B]}`` (:func:`cfg_keep_flags`),
and the ``[P·B, S, C]`` velocities are unstacked and combined (:func:`combine_cfg`,
:func:`guided_velocity`). Scales are per condition or per (condition, stream), and may be annealed
over the steps (:func:`guidance_scale`, :func:`step_progress`) and limited to an interval of noise levels
(``sample.guidance_interval``: Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves
Sample and Distribution Quality in Diffusion Models").

:func:`resolve_guidance` validates a user / config guidance setting against a model's condition
and stream names and returns a :class:`Guidance`; it takes plain arguments so that every sampler
(bidirectional, streaming) shares it. Velocities follow :mod:`mmdit.flow` (``v = ε − x_data``,
``{stream: [B, S, C]}``); the arithmetic runs in float32 at least.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmdit.config_spec import (
    GUIDANCE_MODES,
    GUIDANCE_SCHEDULES,
    SampleSpec,
    check_guidance_interval,
    check_guidance_mode_interval,
    is_full_interval,
    normalize_guidance,
)
from mmdit.flow import Array, Streams, _f32

__all__ = [
    "cfg_batch_plan",
    "cfg_keep_flags",
    "repeat_for_cfg",
    "guided_velocity",
    "combine_cfg",
    "guidance_scale",
    "step_progress",
    "is_full_interval",
    "Guidance",
    "resolve_guidance",
]


_MODES = GUIDANCE_MODES


def cfg_batch_plan(conditions: Sequence[str], mode: str = "nested") -> list[dict[str, bool]]:
    """The condition-keep patterns to evaluate for multi-condition CFG, in evaluation order.

    For conditions ``c_1..c_n`` (order matters in nested mode), returns n + 1 dicts
    ``{c_j: keep}``: entry 0 drops everything (v_0 = v_∅). ``nested``: entry k keeps the first k
    conditions. ``independent``: entry k keeps only c_k. See :func:`guided_velocity`.
    """
    conditions = list(conditions)
    if len(set(conditions)) != len(conditions):
        raise ValueError(f"duplicate condition names in {conditions}")
    if mode not in _MODES:
        raise ValueError(f"unknown CFG mode {mode!r}; use one of {_MODES}")
    plan = [{c: False for c in conditions}]
    for k in range(1, len(conditions) + 1):
        if mode == "nested":
            plan.append({c: j < k for j, c in enumerate(conditions)})
        else:
            plan.append({c: j == k - 1 for j, c in enumerate(conditions)})
    return plan


def _plan_mode(plan: Sequence[Mapping[str, bool]]) -> tuple[list[str], str]:
    """Recovers ``(conditions, mode)`` from a plan made by :func:`cfg_batch_plan`."""
    conditions = list(plan[0]) if plan else []
    for mode in _MODES:
        if [dict(p) for p in plan] == cfg_batch_plan(conditions, mode):
            return conditions, mode
    raise ValueError(f"not a CFG plan from cfg_batch_plan: {list(plan)}")


def cfg_keep_flags(plan: Sequence[Mapping[str, bool]], batch_size: int) -> dict[str, Array]:
    """Keep flags ``dict[cond, bool[P·B]]`` for ONE batched forward pass over the P plan patterns,
    pattern-major (rows ``p·B .. p·B + B − 1`` evaluate pattern p)."""
    conditions, _ = _plan_mode(plan)
    return {c: jnp.repeat(jnp.array([bool(p[c]) for p in plan]), batch_size) for c in conditions}


def repeat_for_cfg(tree, plan: Sequence[Mapping[str, bool]]):
    """Tiles every ``[B, ...]`` leaf of ``tree`` to ``[P·B, ...]`` pattern-major (P = len(plan)),
    matching :func:`cfg_keep_flags` and :func:`combine_cfg`."""
    return jax.tree.map(lambda a: jnp.concatenate([a] * len(plan), axis=0), tree)


def _scale(value, stream: str):
    if isinstance(value, Mapping):
        return value.get(stream, 1.0)
    return value


def guided_velocity(evaluations: Sequence[Streams], scales: Mapping[str, Any], mode: str = "nested") -> dict[str, Array]:
    """Multi-condition classifier-free guidance.

    Conditions ``c_1..c_n`` are the keys of ``scales`` *in order* (e.g. text, ref_audio, audio);
    ``evaluations`` are the n + 1 velocity dicts of :func:`cfg_batch_plan` ``(list(scales), mode)``.

    * ``nested`` (InstructPix2Pix-style): v_k has the first k conditions present (v_0: none);
      ``v = v_0 + Σ_k s_k·(v_k − v_{k−1})``. With every s_k = 1 it telescopes to v_n (fully
      conditional); s_k guides the step from "c_1..c_{k−1}" to "c_1..c_k".
    * ``independent``: v_k has only c_k present (v_0 = v_∅: none);
      ``v = v_∅ + Σ_k s_k·(v_k − v_∅)``.

    For n = 1 both are standard CFG ``v_u + s·(v_c − v_u)``; n = 0 returns v_0.

    Args:
      evaluations: n + 1 dicts ``{stream: [B, S, C]}`` in plan order.
      scales: ``{cond: s}`` or ``{cond: {stream: s}}`` (per-stream scales; a stream missing from
        a condition's dict gets 1.0). Scales may be Python floats or traced scalars (e.g. from
        :func:`guidance_scale`).
      mode: "nested" or "independent".

    Returns:
      ``{stream: [B, S, C]}`` in float32 (at least).
    """
    conditions = list(scales)
    if mode not in _MODES:
        raise ValueError(f"unknown CFG mode {mode!r}; use one of {_MODES}")
    if len(evaluations) != len(conditions) + 1:
        raise ValueError(f"{len(conditions)} conditions need {len(conditions) + 1} evaluations, got {len(evaluations)}")
    out = {}
    for n in evaluations[0]:
        v = [jnp.asarray(e[n], _f32(e[n].dtype)) for e in evaluations]
        acc = v[0]
        for k, c in enumerate(conditions, start=1):
            base = v[k - 1] if mode == "nested" else v[0]
            acc = acc + _scale(scales[c], n) * (v[k] - base)
        out[n] = acc
    return out


def combine_cfg(stacked_v: Streams, plan: Sequence[Mapping[str, bool]], scales: Mapping[str, Any]) -> dict[str, Array]:
    """Unstacks ONE batched forward pass and applies :func:`guided_velocity`.

    ``stacked_v``: ``{stream: [P·B, S, C]}`` pattern-major over the P patterns of ``plan`` (as laid
    out by :func:`repeat_for_cfg` / :func:`cfg_keep_flags`); the condition order and mode are read
    from ``plan``; ``scales`` must name exactly the plan's conditions.
    Returns ``{stream: [B, S, C]}``.
    """
    conditions, mode = _plan_mode(plan)
    if set(scales) != set(conditions):
        raise ValueError(f"scales name {sorted(scales)}, plan conditions are {conditions}")
    p = len(plan)
    evals = [{} for _ in range(p)]
    for n, a in stacked_v.items():
        if a.shape[0] % p:
            raise ValueError(f"stream {n!r}: batch {a.shape[0]} is not a multiple of {p} patterns")
        parts = a.reshape((p, a.shape[0] // p) + a.shape[1:])
        for i in range(p):
            evals[i][n] = parts[i]
    return guided_velocity(evals, {c: scales[c] for c in conditions}, mode)


def guidance_scale(scale, progress, schedule: str = "constant", *, sigma=None, interval=None):
    """Guidance scale at sampling ``progress`` ∈ [0, 1] (0 at the first step, σ = 1; 1 at the last).

    ``constant``: ``scale``. ``cosine`` (Mirage-style CFG annealing): ``1 + (scale − 1)·(1 +
    cos(π·progress))/2``, i.e. the full ``scale`` at progress 0 annealed to 1.0 (no guidance) at
    progress 1. ``scale`` may be a number or a pytree of numbers (e.g. a ``scales`` dict for
    :func:`guided_velocity`); ``progress`` may be traced (see :func:`step_progress`).

    ``interval = (lo, hi)`` (``sample.guidance_interval``) guides only the steps whose σ lies in ``(lo, hi]``
    and gives 1.0 (no guidance) elsewhere, per stream: ``sigma`` is the step's σ ``{stream: scalar}`` (streams
    may have their own shift) and ``scale`` the ``{cond: s | {stream: s}}`` dict of :func:`guided_velocity`,
    returned with per-stream scales. ``None`` or ``(0, >= 1)``: every step is guided.
    """
    if schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"unknown guidance schedule {schedule!r}; use 'constant' or 'cosine'")
    if schedule == "cosine":
        p = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
        w = 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        scale = jax.tree.map(lambda s: 1.0 + (s - 1.0) * w, scale)
    if interval is None or is_full_interval(interval):
        return scale
    if sigma is None or not isinstance(scale, Mapping):
        raise ValueError("a guidance interval needs the step's sigma per stream and a {condition: scale} dict")
    lo, hi = (float(b) for b in interval)
    on = {n: (jnp.asarray(s, jnp.float32) > lo) & (jnp.asarray(s, jnp.float32) <= hi) for n, s in sigma.items()}
    gate = lambda s, n: jnp.where(on[n], jnp.asarray(s, jnp.float32), 1.0)  # noqa: E731
    out = {}
    for c, s in scale.items():
        per = dict(s) if isinstance(s, Mapping) else {n: s for n in on}
        if set(per) - set(on):
            raise ValueError(f"guidance {c!r} names streams {sorted(set(per) - set(on))} without a sigma (have {sorted(on)})")
        out[c] = {n: gate(v, n) for n, v in per.items()}
    return out


def step_progress(step_index, num_steps: int):
    """Progress ``step_index / (num_steps − 1)`` ∈ [0, 1] of a sampler step (0 for one step)."""
    return jnp.asarray(step_index, jnp.float32) / max(num_steps - 1, 1)


# ----------------------------------------------------------------------------------------------
# A sampler's resolved guidance setting
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Guidance:
    """A resolved guidance setting.

    ``scales``: ordered ``{condition: s}`` or ``{condition: {stream: s}}`` (order = nested order;
    ``{}`` = no guidance: one conditional evaluation per step); ``mode``: ``nested`` |
    ``independent``; ``schedule``: ``constant`` | ``cosine`` (scale annealed to 1 at the last step);
    ``interval``: ``(lo, hi)``, the steps whose σ lies in ``(lo, hi]`` are guided (:func:`guidance_scale`).
    """

    scales: Mapping[str, Any]
    mode: str = "nested"
    schedule: str = "constant"
    interval: tuple[float, float] = (0.0, 1.0)

    def scale_at(self, scales, step_index, num_steps: int, sigma):
        """The scales of step ``step_index`` of ``num_steps`` (traced index allowed) whose σ per stream is
        ``sigma`` ``{stream: scalar}``: the schedule's value, gated by the interval."""
        return guidance_scale(scales, step_progress(step_index, num_steps), self.schedule, sigma=sigma, interval=self.interval)

    @property
    def conditions(self) -> list[str]:
        return list(self.scales)

    def plan(self) -> list[dict[str, bool]]:
        """The ``P`` keep patterns of one step (:func:`cfg_batch_plan`)."""
        return cfg_batch_plan(self.conditions, self.mode)

    def structure(self) -> tuple:
        """What changes the traced program (scale *values* do not)."""
        shape = tuple((c, tuple(s) if isinstance(s, Mapping) else None) for c, s in self.scales.items())
        if not shape:  # unguided: mode, schedule and interval do not enter the program
            return (), "nested", "constant"
        interval = None if is_full_interval(self.interval) else tuple(float(b) for b in self.interval)
        return shape, self.mode, self.schedule, interval

    def scale_arrays(self):
        """The scales as a float32 pytree (jit arguments)."""
        return jax.tree.map(lambda s: jnp.asarray(s, jnp.float32), dict(self.scales))


def resolve_guidance(
    guidance=None,
    mode: str | None = None,
    schedule: str | None = None,
    *,
    defaults: SampleSpec,
    conditions: Sequence[str],
    generated: Sequence[str],
    present: Mapping[str, Any] | None = None,
    interval=None,
) -> Guidance:
    """Validates and normalises a guidance setting into a :class:`Guidance`.

    Args:
      guidance: ``{cond: s}`` / ``{cond: {stream: s}}`` in nested order (None: ``defaults.guidance``;
        ``{}``: unguided), normalised by :func:`mmdit.config_spec.normalize_guidance` (per-stream
        dicts completed with 1.0, Python floats).
      mode, schedule: CFG mode (``nested`` | ``independent``) and scale schedule (``constant`` |
        ``cosine``); None (or empty): ``defaults.guidance_mode`` / ``defaults.guidance_schedule``.
      defaults: the validated ``config.sample`` (:func:`mmdit.config_spec.sample_spec`).
      conditions: names a guidance entry may use: the model's conditions and condition streams
        (``ModelSpec.keep_names``, what the step's ``cond_keep`` covers).
      generated: the model's generated stream names (keys of per-stream scale dicts).
      present: optional ``{cond: bool[B]}`` of the task; a condition absent from every sample (all
        False) is dropped, since its guidance term is identically zero.
      interval: ``(lo, hi)``: guide only the steps whose σ lies in ``(lo, hi]`` (None:
        ``defaults.guidance_interval``).

    Raises ValueError naming the field (``sample.guidance*``) on an unknown mode, schedule,
    condition or stream, an interval that is not ``0 <= lo < hi``, or ``independent`` CFG over two or
    more conditions with a limited interval (:func:`mmdit.config_spec.check_guidance_mode_interval`).
    """
    scales = normalize_guidance(defaults.guidance if guidance is None else guidance, conditions, generated)
    mode = mode or defaults.guidance_mode
    schedule = schedule or defaults.guidance_schedule
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"guidance mode {mode!r}: use 'nested' or 'independent' (sample.guidance_mode)")
    if schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"guidance schedule {schedule!r}: use 'constant' or 'cosine' (sample.guidance_schedule)")
    interval = check_guidance_interval(defaults.guidance_interval if interval is None else interval)
    if present is not None:
        scales = {c: s for c, s in scales.items() if c not in present or np.any(np.asarray(present[c]))}
    check_guidance_mode_interval(mode, scales, interval)
    return Guidance(scales, mode, schedule, interval)
