"""Tasks are masks over tokens: which tokens are known (clean, σ = 0, no loss), which streams are
present (valid), and which conditions the sample carries.

Roles: the *visual* stream is the time reference (video, or JAM-Flow's motion); the *audio* stream
is the generated sequence stream named by ``model.roles.audio`` (default ``"audio"``).

=============  ======================================================  ======================
task           known / valid                                           conditions present
=============  ======================================================  ======================
t2av           nothing known                                           all but ``ref_audio``
ti2av          the visual stream's first latent frame known            all but ``ref_audio``, and
                                                                       the visual stream's
                                                                       ``first_frame`` condition
tr2av          nothing known                                           all (incl. ``ref_audio``)
tv2a           the visual stream fully known (needs ``no_peek``)       all but ``ref_audio``
a2v            the audio stream fully known (needs ``no_peek``)        all but ``ref_audio``
a2v_features   generated streams other than visual absent; the         all but ``ref_audio``
               in-sequence condition stream drives (Mirage)
tts            the visual stream absent (audio-only pretraining)       all but ``ref_audio``
inpaint        per generated stream one random span of 0-30% of its    all but ``ref_audio``
               temporal tokens known (JAM-Flow / F5 infilling);
               sampling may choose the regenerated spans instead
               (:func:`region_known`, ``Sampler.sample(regions=)``)
=============  ======================================================  ======================

A *derived* condition (``model.conditions.<c>.derived``, :mod:`mmdit.model.derived_conditions`) is
present only in the task that gives its source clean: ``first_frame`` (the visual stream's first
latent frame tiled) in ``ti2av``; every other task leaves it out (zeros).

With ``model.joint_guidance`` every task also has ``present["joint"]`` True (cross-stream attention is
always available; condition dropout and guidance switch it per sample).

Every output is a jnp array with a leading batch axis; :func:`sample_tasks` draws a task per sample
from ``config.tasks`` weights and selects per sample, so it runs inside ``jit``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmdit.model.derived_conditions import first_frame_conditions
from mmdit.model.spec import JOINT_KEEP, ModelSpec

INPAINT_MAX_FRACTION = 0.3


@dataclasses.dataclass(frozen=True)
class TaskMasks:
    """``known[s]``/``valid[s]``: bool ``[B, S_s]``; ``present[c]``: bool ``[B]``; ``task``: int32 ``[B]``."""

    known: dict
    valid: dict
    present: dict
    task: jax.Array


@dataclasses.dataclass(frozen=True)
class Roles:
    visual: str
    audio: str | None


def roles(spec: ModelSpec, model_cfg=None) -> Roles:
    cfg_roles = (model_cfg.get("roles", None) if model_cfg is not None else None) or {}
    grids = [a.name for a in spec.streams if a.geometry.kind == "grid"]
    ref = model_cfg.get("time_reference", None) if model_cfg is not None else None
    visual = cfg_roles.get("visual", None) or ref or (grids[0] if grids else spec.generated[0])
    audio = cfg_roles.get("audio", None) or ("audio" if "audio" in spec.generated else None)
    return Roles(visual, audio)


def _ones(spec, batch, value):
    return {a.name: jnp.full((batch, a.geometry.num_tokens), value, bool) for a in spec.streams}


def _first_frame(spec, name, batch):
    a = spec.stream(name)
    frame = jnp.arange(a.geometry.num_tokens) < a.geometry.tokens_per_frame
    return jnp.broadcast_to(frame, (batch, a.geometry.num_tokens))


def _base(spec, batch, with_ref=False):
    known, valid = _ones(spec, batch, False), _ones(spec, batch, True)
    for a in spec.streams:
        if a.geometry.condition:
            known[a.name] = jnp.ones_like(known[a.name])
    # A derived condition carries information only when the task gives its source tokens clean: absent here,
    # turned on by the task that gives them (ti2av: first_frame).
    present = {c.name: jnp.full((batch,), c.derived is None and (c.name != "ref_audio" or with_ref)) for c in spec.conditions}
    for a in spec.streams:
        if a.geometry.condition:
            present[a.name] = jnp.ones((batch,), bool)
    if spec.joint_guidance:  # cross-stream attention is always available: dropout / guidance decide
        present[JOINT_KEEP] = jnp.ones((batch,), bool)
    return known, valid, present


def t2av(rng, spec, r: Roles, batch):
    return _base(spec, batch)


def ti2av(rng, spec, r, batch):
    known, valid, present = _base(spec, batch)
    known[r.visual] = _first_frame(spec, r.visual, batch)
    for name, source in first_frame_conditions(spec).items():  # the given frame, tiled (identity reference)
        if source == r.visual:
            present[name] = jnp.ones((batch,), bool)
    return known, valid, present


def tr2av(rng, spec, r, batch):
    return _base(spec, batch, with_ref=True)


def tv2a(rng, spec, r, batch):
    known, valid, present = _base(spec, batch)
    known[r.visual] = jnp.ones_like(known[r.visual])
    return known, valid, present


def a2v(rng, spec, r, batch):
    known, valid, present = _base(spec, batch)
    known[r.audio] = jnp.ones_like(known[r.audio])
    return known, valid, present


def a2v_features(rng, spec, r, batch):
    known, valid, present = _base(spec, batch)
    for name in spec.generated:
        if name != r.visual:
            valid[name] = jnp.zeros_like(valid[name])
    return known, valid, present


def tts(rng, spec, r, batch):
    known, valid, present = _base(spec, batch)
    valid[r.visual] = jnp.zeros_like(valid[r.visual])
    return known, valid, present


def inpaint(rng, spec, r, batch):
    known, valid, present = _base(spec, batch)
    for name, key in zip(spec.generated, jax.random.split(rng, len(spec.generated))):
        a = spec.stream(name)
        frames = a.geometry.token_frames()
        k1, k2 = jax.random.split(key)
        length = jnp.floor(jax.random.uniform(k1, (batch,)) * INPAINT_MAX_FRACTION * frames)
        start = jnp.floor(jax.random.uniform(k2, (batch,)) * (frames - length + 1))
        idx = jnp.arange(frames)[None]
        span = (idx >= start[:, None]) & (idx < (start + length)[:, None])
        known[name] = a.geometry.frame_values_to_tokens(span)
    return known, valid, present


def stream_seconds(spec: ModelSpec, name: str) -> float:
    """The clip length of stream ``name`` in seconds (latent length / latent rate)."""
    g = spec.stream(name).geometry
    return g.shape[0] / g.rate


def region_known(
    spec: ModelSpec, regions: Mapping[str, Sequence[tuple[float, float]]], batch: int, *, label: str = "regions"
) -> dict:
    """JAM-Flow inpainting of chosen regions: ``{generated stream: [(start_s, end_s), ...]}`` -> known
    masks ``{stream: bool [B, S_s]}`` for every generated stream. A stream's temporal tokens whose time
    interval ``[j*p/r, (j+1)*p/r)`` (patch ``p``, latent rate ``r``) overlaps a span are regenerated
    (unknown); every other token -- and every token of a stream not named -- is known, held at its clean
    value. Raises ValueError naming ``label`` (the API argument or CLI flag) for an unknown or condition
    stream, an empty or reversed span, or a span outside the clip."""
    known = {}
    for name in regions:
        if name not in spec.generated:
            raise ValueError(
                f"{label}: stream {name!r} is not a generated stream of this model ({list(spec.generated)}); name one of them"
            )
    for name in spec.generated:
        g = spec.stream(name).geometry
        seconds = stream_seconds(spec, name)
        step = g.patch[0] / g.rate  # seconds per temporal token
        start = np.arange(g.token_frames()) * step
        regenerate = np.zeros(g.token_frames(), bool)
        for span in regions.get(name, ()):
            try:
                t0, t1 = (float(x) for x in span)
            except (TypeError, ValueError):
                raise ValueError(f"{label}: {name} span {span!r} must be (start_s, end_s) numbers") from None
            if not (0.0 <= t0 < t1 <= seconds + 1e-6):
                raise ValueError(
                    f"{label}: {name} span {t0:g}-{t1:g} s must satisfy 0 <= start < end <= {seconds:.3f} s "
                    f"(the {name} stream's clip length)"
                )
            regenerate |= (start < t1) & (start + step > t0)
        frame_known = jnp.asarray(np.broadcast_to(~regenerate, (batch, g.token_frames())))
        known[name] = g.frame_values_to_tokens(frame_known)
    return known


def with_regions(masks: "TaskMasks", spec: ModelSpec, regions, *, label: str = "regions") -> "TaskMasks":
    """``masks`` (the ``inpaint`` task's) with the generated streams' known masks from :func:`region_known`."""
    batch = int(np.shape(masks.task)[0])
    known = {**masks.known, **region_known(spec, regions, batch, label=label)}
    return TaskMasks(known, masks.valid, masks.present, masks.task)


@dataclasses.dataclass(frozen=True)
class TaskDef:
    fn: Callable
    needs: tuple[str, ...] = ()  # roles/conditions the model must have
    needs_no_peek: bool = False


TASKS: dict[str, TaskDef] = {
    "t2av": TaskDef(t2av),
    "ti2av": TaskDef(ti2av),
    "tr2av": TaskDef(tr2av, needs=("cond:ref_audio",)),
    "tv2a": TaskDef(tv2a, needs=("role:audio",), needs_no_peek=True),
    "a2v": TaskDef(a2v, needs=("role:audio",), needs_no_peek=True),
    "a2v_features": TaskDef(a2v_features, needs=("condition_stream",)),
    "tts": TaskDef(tts, needs=("role:audio",)),
    "inpaint": TaskDef(inpaint),
}


def validate_tasks(weights: Mapping[str, float], spec: ModelSpec, model_cfg=None) -> tuple[list[str], np.ndarray]:
    """Checks ``config.tasks`` against the model; returns (names, normalised weights)."""
    if not weights:
        raise ValueError("config.tasks is empty: give at least one task weight, e.g. tasks = {'t2av': 1.0}")
    r = roles(spec, model_cfg)
    names = list(weights)
    for name in names:
        if name not in TASKS:
            raise ValueError(f"config.tasks names unknown task {name!r}; known tasks: {sorted(TASKS)}")
        if weights[name] < 0:
            raise ValueError(f"config.tasks.{name}={weights[name]}: weights must be >= 0")
        t = TASKS[name]
        for need in t.needs:
            kind, _, what = need.partition(":")
            ok = {
                "cond": lambda: what in [c.name for c in spec.conditions],
                "role": lambda: r.audio is not None and r.audio in spec.names,
                "condition_stream": lambda: any(a.geometry.condition for a in spec.streams),
            }[kind]()
            if not ok:
                raise ValueError(
                    f"config.tasks.{name} needs {need.replace('cond:', 'condition ').replace('role:', 'a stream in role ')} "
                    f"which this model lacks (streams {list(spec.names)}, conditions "
                    f"{[c.name for c in spec.conditions]}); remove the task or add it to config.model"
                )
        if t.needs_no_peek and not spec.rule.uses_known():
            raise ValueError(
                f"config.tasks.{name} gives a known modality, which must not attend to the noisy one: "
                f"set config.model.mask to include no_peek, e.g. '{spec.rule} & no_peek'"
            )
    if r.visual not in spec.names:
        raise ValueError(f"model.roles.visual={r.visual!r} is not a stream ({list(spec.names)})")
    for cond, source in first_frame_conditions(spec).items():
        if source != r.visual:
            raise ValueError(
                f"model.conditions.{cond} (derived='first_frame') is concatenated to stream {source!r}, but ti2av gives "
                f"the first frame of the visual stream {r.visual!r} (model.roles.visual); set model.streams.{r.visual}.concat "
                f"= ({cond!r},) instead, or model.roles.visual={source!r}"
            )
    w = np.asarray([weights[n] for n in names], np.float64)
    if w.sum() <= 0:
        raise ValueError("config.tasks weights sum to 0")
    return names, w / w.sum()


def task_masks(name: str, rng, spec: ModelSpec, batch: int, model_cfg=None) -> TaskMasks:
    """One task for the whole batch."""
    known, valid, present = TASKS[name].fn(rng, spec, roles(spec, model_cfg), batch)
    return TaskMasks(known, valid, present, jnp.zeros((batch,), jnp.int32))


def sample_tasks(rng, spec: ModelSpec, batch: int, weights: Mapping[str, float], model_cfg=None) -> TaskMasks:
    """Draws a task per sample (``config.tasks`` weights) and returns the per-sample masks."""
    names, probs = validate_tasks(weights, spec, model_cfg)
    r = roles(spec, model_cfg)
    k_task, *k_each = jax.random.split(rng, len(names) + 1)
    task = jax.random.choice(k_task, len(names), (batch,), p=jnp.asarray(probs, jnp.float32)).astype(jnp.int32)
    outs = [TASKS[n].fn(k, spec, r, batch) for n, k in zip(names, k_each)]

    def select(i_field):
        def pick(*leaves):
            out = leaves[0]
            for t, leaf in enumerate(leaves[1:], start=1):
                sel = (task == t).reshape((batch,) + (1,) * (leaf.ndim - 1))
                out = jnp.where(sel, leaf, out)
            return out

        return jax.tree_util.tree_map(pick, *[o[i_field] for o in outs])

    return TaskMasks(select(0), select(1), select(2), task)
