"""ODE integrators for rectified-flow sampling over dicts of token streams: schedules, Euler, Heun.

Convention (:mod:`mmdit.flow`, Wan's): σ ∈ [0, 1] is the noise level (0 data, 1 pure noise), the
network predicts the velocity ``v = ε − x_data`` so ``dx_σ/dσ = v``, and sampling integrates that
ODE from σ = 1 down to σ = 0 over a decreasing schedule ``float32[num_steps + 1]``
(:func:`sampling_sigmas`, shifted by :func:`mmdit.flow.shift_sigma`).

Data model as in :mod:`mmdit.flow`: a *streams* value is ``dict[str, Array[B, S_stream, C_stream]]``
of patchified tokens, per-token σ ``dict[str, float32[B, S_stream]]``, known masks
``dict[str, bool[B, S_stream]]``. Known tokens are held at their clean values and given σ = 0 at
every step. The integrators are pure and jit-friendly (one ``jax.lax.fori_loop``); guidance is
applied inside the caller's ``velocity_fn`` (see :mod:`mmdit.sample.guidance`).

Solvers (``sample.solver``, :func:`solver_update`): ``euler`` integrates the ODE; ``renoise`` is the
few-step rule a distilled student is trained with (Self-Forcing / DMD's backward simulation): predict
``x0 = x − σ_k·v`` and re-noise it with *fresh* noise, ``x = (1 − σ_{k+1})·x0 + σ_{k+1}·ε``
(:func:`renoised`), so the last step (σ = 0) returns ``x0``. With one step both are ``x − σ·v``. The
fresh noise is :func:`chunk_noise`, the draw the distillation rollouts use (:mod:`mmdit.distill`),
so a student samples with the very rule and numbers it was trained on.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from mmdit.config_spec import SAMPLE_SOLVERS
from mmdit.flow import Array, Streams, _f32, _mask, shift_sigma

__all__ = [
    "SAMPLE_SOLVERS",
    "sampling_sigmas",
    "chunk_noise",
    "renoised",
    "solver_update",
    "euler_sample",
    "renoise_sample",
    "heun_sample",
]


def sampling_sigmas(num_steps: int, shift: float = 1.0) -> Array:
    """The inference schedule: ``float32[num_steps + 1]`` from 1 down to 0, uniform in σ and then
    shifted by :func:`mmdit.flow.shift_sigma` (Wan uses shift 5 for 720p T2V, 3 for 480p)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_sigma(jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32), shift)


def chunk_noise(rng, chunk, draw, index: int, shape) -> Array:
    """Standard normal noise ``float32 shape`` (one causal chunk of one stream, ``[B, T_s, C]``):
    ``fold_in(fold_in(fold_in(rng, chunk), draw), index)``. ``draw`` 0 is a chunk's starting noise in
    the distillation rollouts, ``1 + k`` the fresh noise of the ``renoise`` solver after step ``k``;
    ``index`` is the stream's position in the sorted generated names. ``chunk``/``draw`` may be traced.
    A whole-clip sampler is chunk 0."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, chunk), draw), index)
    return jax.random.normal(key, shape, jnp.float32)


def renoised(x0: Array, sigma_next, noise: Array) -> Array:
    """``(1 − σ_{k+1})·x0 + σ_{k+1}·ε``: the clean estimate ``x0`` put back on the flow path at
    ``sigma_next`` with fresh noise ``ε`` (same shape as ``x0``)."""
    return (1.0 - sigma_next) * x0 + sigma_next * noise


def solver_update(solver: str, x: Array, v: Array, sigma, sigma_next, noise: Array | None = None) -> Array:
    """One sampler step of one stream from ``x [B, S, C]`` at ``sigma`` to ``sigma_next`` with the
    velocity ``v`` (same shape; σ's are scalars or broadcastable).

    ``euler``: ``x + (σ_{k+1} − σ_k)·v``. ``renoise``: :func:`renoised` of ``x0 = x − σ_k·v`` with the
    fresh ``noise`` (needed when ``sigma_next`` may be > 0; at σ_{k+1} = 0 it is ``x0``)."""
    if solver == "euler":
        return x + (sigma_next - sigma) * v
    if solver == "renoise":
        if noise is None:
            raise ValueError("solver 'renoise' needs the step's fresh noise")
        return renoised(x - sigma * v, sigma_next, noise)
    raise ValueError(f"sample.solver={solver!r}: choose one of {list(SAMPLE_SOLVERS)}")


def streams_update(solver: str, x: dict, v: dict, sigma: dict, sigma_next: dict, rng, chunk, step, names) -> dict:
    """:func:`solver_update` of every stream of ``x`` (``{s: [B, T_s, C]}``, velocities ``v`` cast to its dtype,
    σ's ``{s: scalar}``), where ``renoise`` draws step ``step``'s fresh noise of causal chunk ``chunk`` as
    ``chunk_noise(rng, chunk, 1 + step, names.index(s), ·)``: the one rule of the whole-clip sampler (chunk 0),
    the streaming chunk and the stream batch's row groups (``chunk``, ``step`` may be traced)."""
    out = {}
    for n in x:
        eps = chunk_noise(rng, chunk, 1 + step, names.index(n), x[n].shape).astype(x[n].dtype) if solver == "renoise" else None
        out[n] = solver_update(solver, x[n], v[n].astype(x[n].dtype), sigma[n], sigma_next[n], eps)
    return out


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


def _ode_sample(velocity_fn, noise, sigmas, known, known_values, callback, method: str, rng=None):
    """The shared loop of :func:`euler_sample`, :func:`renoise_sample` and :func:`heun_sample`
    (``method``: ``euler`` | ``renoise`` | ``heun``; ``rng``: the re-noising key of ``renoise``)."""
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
        return {n: jnp.where(masks[n][..., None], clean[n], x[n]) if n in clean else x[n] for n in names}

    def tokens(s):
        return {n: jnp.where(masks[n], 0.0, s[n]) for n in names}

    def velocity(x, s, i):
        v = velocity_fn(x, tokens(s), i)
        return {n: jnp.asarray(v[n], x[n].dtype) for n in names}

    def step(i, x):
        s = {n: sigmas[n][i] for n in names}
        s_next = {n: sigmas[n][i + 1] for n in names}
        v = velocity(x, s, i)
        if method == "renoise":
            x_next = streams_update("renoise", x, v, s, s_next, rng, 0, i, names)
        else:
            x_next = x_euler = {n: solver_update("euler", x[n], v[n], s[n], s_next[n]) for n in names}
        if method == "heun":

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


def euler_sample(
    velocity_fn: Callable[[dict, dict, Array], Mapping[str, Array]],
    noise: Streams,
    sigmas: Array,
    *,
    known: Mapping[str, Array] | None = None,
    known_values: Streams | None = None,
    callback: Callable | None = None,
):
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
    return _ode_sample(velocity_fn, noise, sigmas, known, known_values, callback, "euler")


def renoise_sample(
    velocity_fn,
    noise: Streams,
    sigmas: Array,
    *,
    rng,
    known: Mapping[str, Array] | None = None,
    known_values: Streams | None = None,
    callback: Callable | None = None,
):
    """The ``renoise`` solver (module docstring): step i predicts ``x0 = x − σ_i·v`` and re-noises it to
    σ_{i+1} with :func:`chunk_noise` ``(rng, 0, 1 + i, stream index)``; the last step (σ = 0) returns
    ``x0``. Same arguments as :func:`euler_sample` plus ``rng``, the key of the fresh noise (a whole
    clip is chunk 0). One step gives :func:`euler_sample`'s ``x − σ·v`` (to rounding)."""
    return _ode_sample(velocity_fn, noise, sigmas, known, known_values, callback, "renoise", rng)


def heun_sample(
    velocity_fn,
    noise: Streams,
    sigmas: Array,
    *,
    known: Mapping[str, Array] | None = None,
    known_values: Streams | None = None,
    callback: Callable | None = None,
):
    """Second-order Heun integration (EDM): an Euler predictor to σ_{i+1}, then the trapezoidal
    corrector with a second evaluation at ``(x_pred, σ_{i+1}, i + 1)``; a step that ends at σ = 0
    stays Euler. Twice the evaluations per step of :func:`euler_sample`; same arguments."""
    return _ode_sample(velocity_fn, noise, sigmas, known, known_values, callback, "heun")
