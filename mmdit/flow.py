"""Rectified-flow matching over dicts of token streams: schedules, noising, loss, samplers, CFG.

Convention (Wan's, DESIGN.md §3, so converted Wan weights work unchanged):

* σ ∈ [0, 1] is the noise level: σ = 0 is data, σ = 1 is pure Gaussian noise;
* ``x_σ = (1 − σ)·x_data + σ·ε`` with ``ε ~ N(0, I)``;
* the network predicts the velocity ``v = ε − x_data`` (so ``dx_σ/dσ = v`` and the denoised
  estimate is ``x_data ≈ x_σ − σ·v``); its timestep input is ``1000·σ`` (:func:`timestep_input`);
* sampling integrates the ODE from σ = 1 to σ = 0;
* the shifted schedule is ``σ' = s·σ / (1 + (s − 1)·σ)`` (:func:`shift_sigma`); s > 1 spends more
  of the schedule at high noise;
* training draws σ logit-normal (or uniform), then shifts it.

Data model. A *streams* value is a ``dict[str, Array[B, S_stream, C_stream]]`` of patchified tokens;
per-token σ is ``dict[str, float32[B, S_stream]]``; known / valid masks are
``dict[str, bool[B, S_stream]]``. Every token carries its own σ: *known* tokens (reference frame,
the given modality, inpainting context, already generated chunks) have σ = 0, are fed clean and
are excluded from the loss. Tasks are therefore just masks over tokens (``mmdit/tasks.py``).

Every function is pure and jit-friendly: Python loops run only over dict keys or static counts.
Random keys are split over streams in *sorted* name order, so results do not depend on dict
insertion order.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
Streams = Mapping[str, Array]

TIMESTEP_SCALE = 1000.0  # the network's timestep input is TIMESTEP_SCALE·σ (Wan).

__all__ = [
    "TIMESTEP_SCALE", "timestep_input", "shift_sigma", "sample_sigma", "sample_token_sigmas",
    "interpolate", "velocity_target", "noisy_inputs", "flow_loss", "sampling_sigmas",
    "euler_sample", "heun_sample", "guided_velocity", "cfg_batch_plan", "cfg_keep_flags",
    "repeat_for_cfg", "combine_cfg", "guidance_scale", "step_progress", "drop_conditions",
]


def _f32(dtype) -> jnp.dtype:
    """The dtype used for flow arithmetic: ``dtype`` promoted to at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def _mask(masks: Mapping[str, Array] | None, name: str, shape, default: bool) -> Array:
    """``masks[name]`` as a bool ``[B, S]`` array, or a constant mask when absent."""
    if masks is None or name not in masks:
        return jnp.full(shape, default, dtype=bool)
    m = jnp.asarray(masks[name], dtype=bool)
    if m.shape != tuple(shape):
        raise ValueError(f"mask for stream {name!r} has shape {m.shape}, expected {tuple(shape)}")
    return m


# ----------------------------------------------------------------------------------------------
# Schedules and σ sampling
# ----------------------------------------------------------------------------------------------


def timestep_input(sigma):
    """The network's timestep input ``1000·σ`` for σ (an array or any pytree of arrays)."""
    return jax.tree.map(lambda s: TIMESTEP_SCALE * jnp.asarray(s, jnp.float32), sigma)


def shift_sigma(sigma, shift):
    """Shifted noise level ``σ' = s·σ / (1 + (s − 1)·σ)``.

    ``s = 1`` is the identity; for any ``s > 0`` the map is strictly increasing on [0, 1] and fixes
    0 and 1; ``s > 1`` moves mass towards σ = 1 (noisier). Works elementwise on arrays.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sample_sigma(rng, shape, *, dist: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
                 shift: float = 1.0) -> Array:
    """Draws training noise levels σ of ``shape`` (float32, in [0, 1]).

    ``dist="logit_normal"``: ``σ = sigmoid(mean + std·n)``, ``n ~ N(0, 1)`` (SD3 / Wan training; the
    median is ``sigmoid(mean)``); ``dist="uniform"``: ``σ ~ U[0, 1)``. The draw is then shifted by
    :func:`shift_sigma` with ``shift``.
    """
    if dist == "logit_normal":
        sigma = jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape, jnp.float32))
    elif dist == "uniform":
        sigma = jax.random.uniform(rng, shape, jnp.float32)
    else:
        raise ValueError(f"unknown sigma distribution {dist!r}; use 'logit_normal' or 'uniform'")
    return shift_sigma(sigma, shift)


def sample_token_sigmas(rng, known: Mapping[str, Array], *, independent_streams: bool | float = False,
                        dist: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
                        shift: float = 1.0) -> dict[str, Array]:
    """Per-token training σ: one σ per sample, broadcast over the sample's tokens; known → 0.

    Args:
      rng: PRNG key.
      known: ``dict[stream, bool[B, S_stream]]``; True marks a known (clean) token. Its keys name
        the streams; every stream must have the same batch size ``B``.
      independent_streams: False / 0 (default, the standard): one σ per sample shared by all of the
        sample's streams. True / 1: an independent σ per (sample, stream) -- the "decoupled noise"
        variant of JAM-Flow / UniTalking. A float p in (0, 1): that fraction of the samples draws
        independent σ's and the rest share one, so joint sampling (shared σ) stays in distribution
        while each stream also learns to read a partner that is cleaner or noisier than itself.
      dist, mean, std, shift: as in :func:`sample_sigma`.

    Returns:
      ``dict[stream, float32[B, S_stream]]``: σ of every token, exactly 0 on known tokens.
    """
    names = sorted(known)
    if not names:
        return {}
    batch = {int(jnp.shape(known[n])[0]) for n in names}
    if len(batch) != 1:
        shapes = {n: tuple(jnp.shape(known[n])) for n in names}
        raise ValueError(f"known masks disagree on the batch size: {shapes}")
    (b,) = batch
    p = float(independent_streams)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"flow.independent_streams={independent_streams!r}: use a bool or a fraction in [0, 1]")
    draw = lambda key: sample_sigma(key, (b,), dist=dist, mean=mean, std=std, shift=shift)
    k_shared, k_pick, *k_streams = jax.random.split(rng, 2 + len(names))
    shared = draw(k_shared)
    if p == 0.0:
        per_stream = {n: shared for n in names}
    else:
        pick = jax.random.bernoulli(k_pick, p, (b,)) if p < 1.0 else jnp.ones((b,), bool)
        per_stream = {n: jnp.where(pick, draw(k), shared) for n, k in zip(names, k_streams)}
    out = {}
    for n in names:
        k = jnp.asarray(known[n], bool)
        out[n] = jnp.where(k, 0.0, jnp.broadcast_to(per_stream[n][:, None], k.shape))
    return out


# ----------------------------------------------------------------------------------------------
# Noising and loss
# ----------------------------------------------------------------------------------------------


def _interp(x, noise, sigma):
    dt = _f32(x.dtype)
    s = jnp.asarray(sigma, dt)[..., None]
    return ((1.0 - s) * x.astype(dt) + s * noise.astype(dt)).astype(x.dtype)


def interpolate(x, noise, sigma_tokens):
    """``x_σ = (1 − σ)·x + σ·ε`` per token, σ broadcast over channels.

    Works on single arrays (``x, noise: [B, S, C]``, ``sigma_tokens: [B, S]``) or on matching dicts
    of streams. Computed in float32 (at least) and returned in ``x``'s dtype. A token with σ = 0
    comes back exactly equal to ``x`` (for finite noise).
    """
    return jax.tree.map(_interp, x, noise, sigma_tokens)


def velocity_target(x, noise):
    """The flow-matching regression target ``v = ε − x`` (arrays or matching dicts of streams)."""
    return jax.tree.map(lambda a, e: e - a, x, noise)


def noisy_inputs(rng, streams: Streams, sigma: Mapping[str, Array]):
    """Noises clean streams at per-token σ.

    Args:
      rng: PRNG key (split over streams in sorted name order).
      streams: clean ``dict[stream, [B, S, C]]``.
      sigma: ``dict[stream, [B, S]]`` (e.g. from :func:`sample_token_sigmas`; known tokens σ = 0).

    Returns:
      ``(x_sigma, noise, target)``, three dicts shaped like ``streams``: the network input
      (``x_sigma == x`` exactly where σ = 0), the Gaussian noise (``x``'s dtype) and ``ε − x``.
    """
    names = sorted(streams)
    keys = dict(zip(names, jax.random.split(rng, max(len(names), 1))))
    noise = {n: jax.random.normal(keys[n], jnp.shape(streams[n])).astype(streams[n].dtype)
             for n in names}
    clean = {n: streams[n] for n in names}
    sig = {n: sigma[n] for n in names}
    return interpolate(clean, noise, sig), noise, velocity_target(clean, noise)


def flow_loss(pred: Streams, target: Streams, known: Mapping[str, Array] | None, *,
              stream_weights: Mapping[str, float] | None = None,
              valid: Mapping[str, Array] | None = None,
              sample_weights: Array | None = None):
    """Masked flow-matching MSE over streams.

    Per stream s and sample b: the squared error is averaged over channels, then over the
    *supervised* tokens -- unknown (``known`` False) and valid (``valid`` True) -- of that sample:
    ``l[b, s] = Σ_t w·mse / max(Σ_t w, 1)``. A stream with no supervised token in a sample
    contributes exactly 0 for that sample (no NaN, no gradient). The total is the mean over
    *active* samples (those with at least one supervised token in any stream; normally all B) of
    ``sample_weights[b] · Σ_s stream_weights[s] · l[b, s]``.

    Args:
      pred, target: ``dict[stream, [B, S, C]]`` (any float dtype; computed in float32).
      known: ``dict[stream, bool[B, S]]`` or None; a missing stream means nothing known.
      stream_weights: ``dict[stream, float]``; a missing stream weighs 1.
      valid: ``dict[stream, bool[B, S]]`` or None; False marks padding / absent tokens; a missing
        stream means all valid.
      sample_weights: optional ``[B]`` per-sample weights (e.g. task weights), absolute scales
        (the total is not renormalised by their sum).

    Returns:
      ``(total, metrics)``: scalar float32 loss and a dict with ``loss/total`` and, per stream,
      ``loss/<stream>``: the unweighted per-sample loss averaged over the samples in which that
      stream has supervised tokens (a diagnostic; 0 when none).
    """
    names = sorted(pred)
    if not names:
        raise ValueError("flow_loss needs at least one stream")
    if set(target) != set(pred):
        raise ValueError(f"pred streams {sorted(pred)} != target streams {sorted(target)}")
    metrics, per_sample, active = {}, 0.0, 0.0
    for n in names:
        p, t = pred[n], target[n]
        if p.shape != t.shape:
            raise ValueError(f"stream {n!r}: pred shape {p.shape} != target shape {t.shape}")
        mse = jnp.mean(jnp.square(p.astype(jnp.float32) - t.astype(jnp.float32)), axis=-1)
        w = (~_mask(known, n, mse.shape, False)) & _mask(valid, n, mse.shape, True)
        w = w.astype(jnp.float32)
        count = jnp.sum(w, axis=1)  # [B]
        # [B]; exactly 0 (and NaN-free) for a sample with no supervised token in this stream.
        l_bs = jnp.sum(jnp.where(w > 0, mse, 0.0), axis=1) / jnp.maximum(count, 1.0)
        has = (count > 0).astype(jnp.float32)
        metrics[f"loss/{n}"] = jnp.sum(l_bs * has) / jnp.maximum(jnp.sum(has), 1.0)
        sw = 1.0 if stream_weights is None else stream_weights.get(n, 1.0)
        per_sample = per_sample + sw * l_bs
        active = jnp.maximum(active, has)
    if sample_weights is not None:
        per_sample = per_sample * jnp.asarray(sample_weights, jnp.float32)
    total = jnp.sum(per_sample) / jnp.maximum(jnp.sum(active), 1.0)
    metrics["loss/total"] = total
    return total, metrics


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------


def sampling_sigmas(num_steps: int, shift: float = 1.0) -> Array:
    """The inference schedule: ``float32[num_steps + 1]`` from 1 down to 0, uniform in σ and then
    shifted by :func:`shift_sigma` (Wan uses shift 5 for 720p T2V, 3 for 480p)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_sigma(jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32), shift)


def _stream_schedules(sigmas, names) -> dict[str, Array]:
    """``[N + 1]`` (shared) or ``{stream: [N + 1]}`` (per stream, same N) -> ``{stream: [N + 1]}``."""
    if isinstance(sigmas, Mapping):
        missing = [n for n in names if n not in sigmas]
        if missing:
            raise ValueError(f"per-stream sigmas lack stream(s) {missing}; give a schedule for each of {names}")
        out = {n: jnp.asarray(sigmas[n], jnp.float32) for n in names}
    else:
        out = {n: jnp.asarray(sigmas, jnp.float32) for n in names}
    lengths = {n: tuple(v.shape) for n, v in out.items()}
    if any(len(v) != 1 or v[0] < 2 for v in lengths.values()) or len(set(lengths.values())) != 1:
        raise ValueError(f"sigmas must be [num_steps + 1] with num_steps >= 1 (the same for every stream), got {lengths}")
    return out


def _ode_sample(velocity_fn, noise, sigmas, known, known_values, callback, heun: bool):
    names = sorted(noise)
    if known is not None and known_values is None:
        raise ValueError("known tokens need known_values (their clean values)")
    if known is None and known_values is not None:
        raise ValueError("known_values given without a known mask")
    sigmas = _stream_schedules(sigmas, names)
    num_steps = sigmas[names[0]].shape[0] - 1
    masks = {n: _mask(known, n, noise[n].shape[:2], False) for n in names}
    out_dtype = {n: noise[n].dtype for n in names}
    # Only streams that appear in `known` need their clean values held.
    held = [n for n in names if known is not None and n in known]
    clean = {n: jnp.asarray(known_values[n], _f32(noise[n].dtype)) for n in held}

    def hold(x):
        return {n: jnp.where(masks[n][..., None], clean[n], x[n]) if n in clean else x[n]
                for n in names}

    def tokens(s):
        return {n: jnp.where(masks[n], 0.0, s[n]) for n in names}

    def velocity(x, s, i):
        v = velocity_fn(x, tokens(s), i)
        return {n: jnp.asarray(v[n], x[n].dtype) for n in names}

    def step(i, x):
        s = {n: sigmas[n][i] for n in names}
        s_next = {n: sigmas[n][i + 1] for n in names}
        v = velocity(x, s, i)
        x_euler = {n: x[n] + (s_next[n] - s[n]) * v[n] for n in names}
        x_next = x_euler
        if heun:
            def correct():
                v2 = velocity(hold(x_euler), s_next, i + 1)
                return {n: x[n] + (s_next[n] - s[n]) * 0.5 * (v[n] + v2[n]) for n in names}
            last = jnp.max(jnp.stack([s_next[n] for n in names])) > 0
            x_next = jax.lax.cond(last, correct, lambda: x_euler)
        x_next = hold(x_next)
        if callback is not None:
            callback(i, x_next, hold({n: x[n] - s[n] * v[n] for n in names}))
        return x_next

    x0 = hold({n: jnp.asarray(noise[n], _f32(noise[n].dtype)) for n in names})
    x = jax.lax.fori_loop(0, num_steps, step, x0)
    return {n: x[n].astype(out_dtype[n]) for n in names}


def euler_sample(velocity_fn: Callable[[dict, dict, Array], Mapping[str, Array]], noise: Streams,
                 sigmas: Array, *, known: Mapping[str, Array] | None = None,
                 known_values: Streams | None = None, callback: Callable | None = None):
    """Integrates ``dx/dσ = v`` from ``sigmas[0]`` (normally 1) to ``sigmas[-1]`` (normally 0).

    Step i: ``x ← x + (σ_{i+1} − σ_i)·velocity_fn(x, σ_tokens, i)``. Known tokens are held at their
    clean ``known_values`` and are given σ = 0 at every step; unknown tokens carry σ_i. Runs in a
    ``jax.lax.fori_loop`` (jit-friendly; compile time independent of the step count).

    Args:
      velocity_fn: ``(x: dict[stream, float32[B, S, C]], sigma_tokens: dict[stream, float32[B, S]],
        step_index: int32 scalar, traced) -> dict[stream, [B, S, C]]`` -- the (guided) model
        velocity ``ε − x_data``; the step index is the schedule point it is evaluated at.
      noise: ``dict[stream, [B, S, C]]`` initial state at σ = sigmas[0] (pure noise for σ = 1).
      sigmas: ``[num_steps + 1]`` decreasing schedule, e.g. :func:`sampling_sigmas`, or one such
        schedule per stream ``{stream: [num_steps + 1]}`` (e.g. audio denoised ahead of video with
        a smaller shift, so the video reads an already-formed speech rhythm).
      known: optional ``dict[stream, bool[B, S]]`` (missing streams: nothing known).
      known_values: clean values ``dict[stream, [B, S, C]]`` for the streams in ``known`` (only
        the known positions are read).
      callback: optional ``callback(step_index, x_next, x0_hat)`` called inside the traced loop
        after each step (use ``jax.debug.callback`` in it for side effects); ``x0_hat = x − σ·v``
        is the step's denoised estimate. Its return value is ignored.

    Returns:
      The final ``dict[stream, [B, S, C]]`` in ``noise``'s dtypes (the state is carried in float32).
    """
    return _ode_sample(velocity_fn, noise, sigmas, known, known_values, callback, heun=False)


def heun_sample(velocity_fn, noise: Streams, sigmas: Array, *,
                known: Mapping[str, Array] | None = None, known_values: Streams | None = None,
                callback: Callable | None = None):
    """Second-order Heun integration (EDM): an Euler predictor to σ_{i+1}, then the trapezoidal
    corrector with a second evaluation at ``(x_pred, σ_{i+1}, i + 1)``; a step that ends at σ = 0
    stays Euler. Twice the evaluations per step of :func:`euler_sample`; same arguments."""
    return _ode_sample(velocity_fn, noise, sigmas, known, known_values, callback, heun=True)


# ----------------------------------------------------------------------------------------------
# Multi-condition classifier-free guidance
# ----------------------------------------------------------------------------------------------

_MODES = ("nested", "independent")


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


def guided_velocity(evaluations: Sequence[Streams], scales: Mapping[str, Any],
                    mode: str = "nested") -> dict[str, Array]:
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
        raise ValueError(f"{len(conditions)} conditions need {len(conditions) + 1} evaluations, "
                         f"got {len(evaluations)}")
    out = {}
    for n in evaluations[0]:
        v = [jnp.asarray(e[n], _f32(e[n].dtype)) for e in evaluations]
        acc = v[0]
        for k, c in enumerate(conditions, start=1):
            base = v[k - 1] if mode == "nested" else v[0]
            acc = acc + _scale(scales[c], n) * (v[k] - base)
        out[n] = acc
    return out


def combine_cfg(stacked_v: Streams, plan: Sequence[Mapping[str, bool]],
                scales: Mapping[str, Any]) -> dict[str, Array]:
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


def guidance_scale(scale, progress, schedule: str = "constant"):
    """Guidance scale at sampling ``progress`` ∈ [0, 1] (0 at the first step, σ = 1; 1 at the last).

    ``constant``: ``scale``. ``cosine`` (Mirage-style CFG annealing): ``1 + (scale − 1)·(1 +
    cos(π·progress))/2``, i.e. the full ``scale`` at progress 0 annealed to 1.0 (no guidance) at
    progress 1. ``scale`` may be a number or a pytree of numbers (e.g. a ``scales`` dict for
    :func:`guided_velocity`); ``progress`` may be traced (see :func:`step_progress`).
    """
    if schedule == "constant":
        return scale
    if schedule != "cosine":
        raise ValueError(f"unknown guidance schedule {schedule!r}; use 'constant' or 'cosine'")
    p = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
    w = 0.5 * (1.0 + jnp.cos(jnp.pi * p))
    return jax.tree.map(lambda s: 1.0 + (s - 1.0) * w, scale)


def step_progress(step_index, num_steps: int):
    """Progress ``step_index / (num_steps − 1)`` ∈ [0, 1] of a sampler step (0 for one step)."""
    return jnp.asarray(step_index, jnp.float32) / max(num_steps - 1, 1)


def drop_conditions(rng, batch_size: int, probs: Mapping[str, float], *,
                    present: Mapping[str, Array] | None = None,
                    drop_all_prob: float = 0.0) -> dict[str, Array]:
    """Training-time condition dropout: keep flags ``{cond: bool[B]}``.

    Each condition in ``probs`` is dropped independently with its probability; with
    ``drop_all_prob`` every condition of a sample is dropped together (to train the fully
    unconditional v_∅ that nested CFG needs at a controlled rate). A condition absent for a sample
    (``present[c][b]`` False) stays dropped. Conditions only in ``present`` are never dropped;
    conditions missing from ``present`` count as present. Keys are drawn per condition in sorted
    name order.
    """
    names = sorted(set(probs) | set(present or {}))
    keys = jax.random.split(rng, len(names) + 1)
    drop_all = jax.random.uniform(keys[0], (batch_size,)) < drop_all_prob
    out = {}
    for key, c in zip(keys[1:], names):
        keep = jax.random.uniform(key, (batch_size,)) >= probs.get(c, 0.0)
        if present is not None and c in present:
            pres = jnp.asarray(present[c], bool)
            if pres.shape != (batch_size,):
                raise ValueError(f"present[{c!r}] has shape {pres.shape}, expected ({batch_size},)")
            keep = keep & pres
        out[c] = keep & ~drop_all
    return out
