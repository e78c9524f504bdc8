"""The student's few-step, chunk-by-chunk sampling during distillation (over the full token sequence).

A chunk-causal student (``model.chunk_frames`` set, ``chunk_causal`` in ``model.mask``) generates
chunk ``c`` (tokens with ``floor(aligned_time / chunk_frames) == c``, as
``MMDiT.token_meta`` numbers them) with every earlier chunk *known* (clean, σ = 0) and every later
chunk *invalid* (absent: never attended), exactly what a streaming sampler with a KV cache sees;
here the earlier chunks are simply re-run in the same forward pass instead of read from a cache
(``chunks × steps`` full-sequence passes). Training runs a streamable student on the cache instead
(:mod:`mmdit.distill.cached_rollout`, the geometry ``mmdit stream`` serves); this full-sequence
version is its reference (with ``absolute`` positions and a ``clean`` cache they are equal) and
the rollout of a student that cannot stream.

Within a chunk the student follows the fixed ``denoising_step_list`` σ_0 = 1 > σ_1 > ... > σ_{K-1}:
predict the clean chunk ``x0 = x − σ_k·v`` and re-noise it with *fresh* noise to σ_{k+1}
(``x = (1 − σ_{k+1})·x0 + σ_{k+1}·ε``); the chunk's output is ``x0`` of the *exit step*.

* ``rollout="self"`` (Self-Forcing): the context of chunk ``c`` is the student's own output for
  the earlier chunks (gradient stopped, like a KV cache computed without gradient), and the exit
  step is drawn at random per training step; only the exit step's prediction carries gradient.
* ``rollout="teacher_forced"`` (CausVid): the context is the ground-truth chunks of the batch.

Tokens the task marks known (A2V: the given audio) keep their given values and are never generated.
A model without ``chunk_frames`` is one chunk: this is then plain few-step sampling. The noise is
:func:`chunk_noise` per chunk, so both rollouts draw the same numbers; the re-noising is
:func:`mmdit.sample.ode.renoised` and the draw :func:`mmdit.sample.ode.chunk_noise`, what the samplers'
``sample.solver="renoise"`` runs, so training and serving share one rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmdit import flow
from mmdit.distill.losses import clean_prediction
from mmdit.model import chunks as chunks_lib
from mmdit.sample.ode import chunk_noise, renoised  # chunk_noise: also this module's (tests import it here)


def chunk_ids(spec) -> dict[str, np.ndarray]:
    """``{stream: int32 [S]}`` causal chunk of every token (0 everywhere without ``chunk_frames``)."""
    out = {}
    for a in spec.streams:
        t = np.asarray(spec.times[a.name], np.float64)
        if spec.chunk_frames is None:
            out[a.name] = np.zeros(t.shape, np.int32)
        else:
            out[a.name] = np.floor(t / float(spec.chunk_frames) + 1e-4).astype(np.int32)
    return out


def num_chunks(spec) -> int:
    ids = chunk_ids(spec)
    return int(max(ids[n].max() for n in spec.generated)) + 1


def _placed(noise, c, tokens_per_chunk: int, total: int):
    """``noise [B, T, C]`` of chunk ``c`` at its tokens ``[c·T, (c+1)·T)`` of a ``[B, total, C]`` zero array
    (a chunk's tokens are contiguous: token order is time-major)."""
    full = jnp.zeros((noise.shape[0], total) + noise.shape[2:], noise.dtype)
    return jax.lax.dynamic_update_slice_in_dim(full, noise, c * tokens_per_chunk, 1)


def chunk_pass(model, params, c: int, x_current, context, sigma: float, masks, raw, cond_keep):
    """One student evaluation for chunk ``c``: returns the clean prediction ``{s: float32 [B, S, C]}``
    (meaningful on chunk ``c``'s generated tokens only).

    Args:
      x_current: ``{generated s: [B, S, C]}`` the noisy values of chunk ``c`` (other tokens ignored).
      context: ``{s: [B, S, C]}`` for every stream: clean values used for known tokens and earlier
        chunks (later chunks are ignored: invalid).
      sigma: σ of chunk ``c``'s generated tokens (a Python float or traced scalar).
      masks: ``tasks.TaskMasks`` of the batch (``known`` / ``valid`` for every stream).
      raw, cond_keep: raw conditions and ``{condition: bool [B]}`` keep flags.
    """
    ids = chunk_ids(model.spec)
    tokens, sig, known, valid = {}, {}, dict(masks.known), dict(masks.valid)
    for a in model.spec.streams:
        n = a.name
        if n not in model.spec.generated:
            tokens[n] = context[n]
            continue
        cid = jnp.asarray(ids[n])[None]
        cur = (cid == c) & ~masks.known[n]
        tokens[n] = jnp.where(cur[..., None], x_current[n], context[n])
        sig[n] = jnp.where(cur, jnp.asarray(sigma, jnp.float32), 0.0)
        known[n] = masks.known[n] | (cid < c)
        valid[n] = masks.valid[n] & (cid <= c)
    v = model.velocity(params, tokens, sig, raw, cond_keep=cond_keep, known=known, valid=valid)
    return clean_prediction({n: tokens[n] for n in v}, v, sig)


def student_rollout(model, params, rng, clean, masks, raw, cond_keep, step_list, *, exit_step, teacher_forced: bool):
    """The student's sample ``{generated s: float32 [B, S, C]}`` (module docstring).

    Args:
      model: the student ``DiffusionModel``; params: its (unboxed) params.
      rng: key for the starting and re-noising noise (chunk ``c`` draws from ``fold_in(rng, c)``).
      clean: ``{s: [B, S, C]}`` ground-truth tokens of every stream (known tokens' values; the
        context of ``teacher_forced``).
      masks, raw, cond_keep: as in :func:`chunk_pass`.
      step_list: the σ's (Python floats, descending from 1).
      exit_step: int32 scalar in ``[0, len(step_list))`` (traced or static): the step whose
        prediction is the chunk's output and the only one carrying gradient.
      teacher_forced: context = ``clean`` (CausVid) instead of the student's own earlier chunks.

    Returns:
      The sample: generated tokens from the exit steps, known tokens equal to ``clean``.

    The chunks run in a ``fori_loop`` (compile time does not grow with the chunk count); the
    ``len(step_list)`` steps of a chunk are unrolled.
    """
    spec = model.spec
    gen = sorted(spec.generated)
    ids = chunk_ids(spec)
    per_chunk = chunks_lib.chunk_tokens(spec)
    K = len(step_list)
    out = {n: jnp.where(masks.known[n][..., None], clean[n].astype(jnp.float32), 0.0) for n in gen}
    B = out[gen[0]].shape[0]

    def noise(c, draw):
        return {
            n: _placed(chunk_noise(rng, c, draw, i, (B, per_chunk[n], out[n].shape[2])), c, per_chunk[n], out[n].shape[1])
            for i, n in enumerate(gen)
        }

    def one_chunk(c, out):
        context = dict(clean) if teacher_forced else {**clean, **jax.tree.map(jax.lax.stop_gradient, out)}
        x = noise(c, 0)
        chosen = {n: jnp.zeros_like(out[n]) for n in gen}
        for k, sigma in enumerate(step_list):
            x0 = chunk_pass(model, params, c, x, context, sigma, masks, raw, cond_keep)
            is_exit = jnp.asarray(exit_step) == k
            chosen = {n: jnp.where(is_exit, x0[n], chosen[n]) for n in gen}
            if k + 1 < K:
                nxt, fresh = step_list[k + 1], noise(c, 1 + k)
                x = {n: renoised(jax.lax.stop_gradient(x0[n]), nxt, fresh[n]) for n in gen}
        return {n: jnp.where(_current(ids, n, c, masks)[..., None], chosen[n], out[n]) for n in gen}

    return jax.lax.fori_loop(0, num_chunks(spec), one_chunk, out)


def _current(ids, name, c, masks):
    """``bool [B, S]``: the generated (not known) tokens of chunk ``c`` in stream ``name``."""
    return (jnp.asarray(ids[name])[None] == c) & ~masks.known[name]


def predict_chunks(model, params, x_noisy, context, sigma, masks, raw, cond_keep):
    """Clean predictions of every chunk from noisy values ``x_noisy`` at one σ, each chunk seeing
    the clean ``context`` of the earlier chunks (teacher forcing; the regression loss):
    ``{generated s: float32 [B, S, C]}`` (known tokens: the context's values)."""
    spec = model.spec
    ids = chunk_ids(spec)
    gen = sorted(spec.generated)

    def one_chunk(c, out):
        x0 = chunk_pass(model, params, c, x_noisy, context, sigma, masks, raw, cond_keep)
        return {n: jnp.where(_current(ids, n, c, masks)[..., None], x0[n], out[n]) for n in gen}

    return jax.lax.fori_loop(0, num_chunks(spec), one_chunk, {n: context[n].astype(jnp.float32) for n in gen})


def renoise(rng, x, masks, sigma_per_sample):
    """``(x_σ, σ tokens, noise)``: ``x`` noised at one σ per sample ``[B]`` (known tokens: σ = 0,
    unchanged)."""
    sig = {n: jnp.where(masks.known[n], 0.0, sigma_per_sample[:, None]) for n in x}
    x_sigma, noise, _ = flow.noisy_inputs(rng, dict(x), sig)
    return x_sigma, sig, noise
