"""Rectified-flow matching over dicts of token streams: σ schedules, noising, the masked loss, condition dropout.

Convention (Wan's, docs/design.md):

* σ ∈ [0, 1] is the noise level: σ = 0 is data, σ = 1 is pure Gaussian noise;
* ``x_σ = (1 − σ)·x_data + σ·ε`` with ``ε ~ N(0, I)``;
* the network predicts the velocity ``v = ε − x_data`` (so ``dx_σ/dσ = v`` and the denoised
  estimate is ``x_data ≈ x_σ − σ·v``); its timestep input is ``1000·σ`` (:func:`timestep_input`);
* sampling integrates the ODE from σ = 1 to σ = 0 (the integrators are in ``mmdit/sample/ode.py``,
  classifier-free guidance in ``mmdit/sample/guidance.py``; both build on this module, never the reverse);
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

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
Streams = Mapping[str, Array]

TIMESTEP_SCALE = 1000.0  # the network's timestep input is TIMESTEP_SCALE·σ (Wan).

__all__ = [
    "TIMESTEP_SCALE",
    "timestep_input",
    "shift_sigma",
    "sample_sigma",
    "sample_token_sigmas",
    "CHUNK_NOISE_MODES",
    "ChunkNoise",
    "chunk_token_sigmas",
    "interpolate",
    "velocity_target",
    "noisy_inputs",
    "flow_loss",
    "drop_conditions",
    "silence_dropout",
]


def _f32(dtype) -> jnp.dtype:
    """The dtype used for flow arithmetic: ``dtype`` promoted to at least float32 (also used by
    ``mmdit/sample/ode.py`` and ``mmdit/sample/guidance.py``)."""
    return jnp.promote_types(dtype, jnp.float32)


def _supervised(known, valid, name: str, shape) -> Array:
    """bool ``[B, S]``: the tokens a loss scores, unknown (``known`` False) and valid."""
    return (~_mask(known, name, shape, False)) & _mask(valid, name, shape, True)


def _sample_means(values: Array, w: Array) -> tuple[Array, Array]:
    """``(l [B], has [B])``: the ``w``-weighted mean of ``values [B, S]`` per sample (exactly 0, NaN-free and
    without gradient where ``w`` is all 0) and float 1/0 flags of the samples with any weight."""
    count = jnp.sum(w, axis=1)
    l_b = jnp.sum(jnp.where(w > 0, w * values, 0.0), axis=1) / jnp.maximum(count, 1.0)
    return l_b, (count > 0).astype(jnp.float32)


def _mask(masks: Mapping[str, Array] | None, name: str, shape, default: bool) -> Array:
    """``masks[name]`` as a bool ``[B, S]`` array, or a constant mask when absent (also used by
    ``mmdit/sample/ode.py``)."""
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


def sample_sigma(rng, shape, *, dist: str = "logit_normal", mean: float = 0.0, std: float = 1.0, shift: float = 1.0) -> Array:
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


def _batch_size(known: Mapping[str, Array]) -> int:
    """The batch size ``B`` every ``[B, S]`` mask of ``known`` shares."""
    batch = {int(jnp.shape(known[n])[0]) for n in known}
    if len(batch) != 1:
        shapes = {n: tuple(jnp.shape(known[n])) for n in sorted(known)}
        raise ValueError(f"known masks disagree on the batch size: {shapes}")
    return batch.pop()


def _stream_draws(rng, names, shape, independent_streams, dist_kw) -> dict[str, Array]:
    """``{stream: σ[shape]}`` (``shape[0]`` = B): one draw shared by every stream, except for the
    fraction ``independent_streams`` of the samples, whose streams each draw their own (see
    :func:`sample_token_sigmas`). Keys: ``(shared, pick, *streams) = split(rng, 2 + len(names))``."""
    p = float(independent_streams)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"flow.independent_streams={independent_streams!r}: use a bool or a fraction in [0, 1]")
    draw = lambda key: sample_sigma(key, shape, **dist_kw)  # noqa: E731
    k_shared, k_pick, *k_streams = jax.random.split(rng, 2 + len(names))
    shared = draw(k_shared)
    if p == 0.0:
        return {n: shared for n in names}
    b = shape[0]
    pick = jax.random.bernoulli(k_pick, p, (b,)) if p < 1.0 else jnp.ones((b,), bool)
    pick = pick.reshape((b,) + (1,) * (len(shape) - 1))
    return {n: jnp.where(pick, draw(k), shared) for n, k in zip(names, k_streams)}


def sample_token_sigmas(
    rng,
    known: Mapping[str, Array],
    *,
    independent_streams: bool | float = False,
    dist: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
) -> dict[str, Array]:
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
    b = _batch_size(known)
    per_stream = _stream_draws(rng, names, (b,), independent_streams, dict(dist=dist, mean=mean, std=std, shift=shift))
    out = {}
    for n in names:
        k = jnp.asarray(known[n], bool)
        out[n] = jnp.where(k, 0.0, jnp.broadcast_to(per_stream[n][:, None], k.shape))
    return out


CHUNK_NOISE_MODES = ("shared", "independent", "clean_context")


class ChunkNoise(NamedTuple):
    """Per-token training noise of a clip cut into causal chunks (:func:`chunk_token_sigmas`)."""

    sigma: dict[str, Array]  # generated stream -> float32 [B, S]; exactly 0 on known tokens
    known: dict[str, Array]  # generated stream -> bool [B, S]: the task's known tokens ∪ clean context chunks
    valid: dict[str, Array]  # every stream of the ``valid`` argument -> bool [B, S]; False on excluded chunks
    target: Array  # int32 [B]: the target chunk of "clean_context"; -1 in the other modes


def chunk_token_sigmas(
    rng,
    known: Mapping[str, Array],
    chunks: Mapping[str, Array],
    num_chunks: int,
    *,
    mode: str = "shared",
    valid: Mapping[str, Array] | None = None,
    independent_streams: bool | float = False,
    dist: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
) -> ChunkNoise:
    """Per-token training σ for causal-chunk training (``flow.chunk_noise``).

    A chunk is a span of aligned time cut across all streams (``mmdit/model/chunks.py``); ``chunks``
    gives every token's chunk index. The modes:

    * ``"shared"``: one σ per sample over all of its chunks (TalkingMachines: a chunk attends its
      context at its own noise level) -- exactly :func:`sample_token_sigmas`, same draws.
    * ``"independent"``: an independent σ per (sample, chunk) (diffusion forcing / CausVid), equal
      for every stream's tokens of one chunk unless ``independent_streams`` splits the streams too
      (then per (sample, chunk, stream) for that fraction of the samples).
    * ``"clean_context"`` (teacher forcing): per sample a target chunk ``c`` is drawn uniformly from
      ``[0, num_chunks)``; chunks ``< c`` are clean context (σ = 0 and known, so their tokens are the
      data and they are not scored); chunk ``c`` draws one σ (per stream with
      ``independent_streams``); chunks ``> c`` are excluded: ``valid`` False in every stream (never
      attended, never scored, whatever the mask) and σ = 1 (pure noise, no trace of the data). Only
      chunk ``c``'s generated tokens are scored. This is the single-target form of the clean + noisy
      doubled sequence of Self-Forcing / CausVid teacher forcing: one noisy chunk per sample, its
      clean past in place instead of a second copy of the clip.

    Tokens the task gives (``known`` True: a2v's audio, ti2av's first frame) stay known with σ = 0 in
    every mode.

    Args:
      rng: PRNG key.
      known: ``dict[stream, bool[B, S_s]]`` of the generated streams (the task's known tokens).
      chunks: ``dict[stream, int[S_s]]`` chunk index per token, for every stream of ``known`` and ``valid``.
      num_chunks: chunks per clip (static); chunk indices lie in ``[0, num_chunks)``.
      mode: one of :data:`CHUNK_NOISE_MODES`.
      valid: ``dict[stream, bool[B or 1, S_s]]`` (may include condition streams); None: every token
        of the ``known`` streams valid.
      independent_streams, dist, mean, std, shift: as in :func:`sample_token_sigmas`.

    Returns:
      :class:`ChunkNoise` (``valid`` broadcast to ``[B, S_s]``).
    """
    if mode not in CHUNK_NOISE_MODES:
        raise ValueError(f"flow.chunk_noise={mode!r}: choose one of {list(CHUNK_NOISE_MODES)}")
    names = sorted(known)
    if not names:
        raise ValueError("chunk_token_sigmas needs the known masks of at least one generated stream")
    b = _batch_size(known)
    valid = {n: jnp.ones(jnp.shape(known[n]), bool) for n in names} if valid is None else dict(valid)
    valid = {n: jnp.broadcast_to(jnp.asarray(v, bool), (b, jnp.shape(v)[1])) for n, v in valid.items()}
    ids = {}
    for n in sorted(set(names) | set(valid)):
        if n not in chunks:
            raise ValueError(f"chunk_token_sigmas: no chunk indices for stream {n!r} (chunks has {sorted(chunks)})")
        ids[n] = jnp.asarray(chunks[n], jnp.int32)
        size = jnp.shape(known[n] if n in known else valid[n])[1]
        if ids[n].shape != (size,):
            raise ValueError(f"chunk indices of stream {n!r} have shape {ids[n].shape}, expected ({size},)")
    known = {n: jnp.asarray(known[n], bool) for n in names}
    dist_kw = dict(dist=dist, mean=mean, std=std, shift=shift)
    no_target = jnp.full((b,), -1, jnp.int32)
    if mode == "shared":
        sigma = sample_token_sigmas(rng, known, independent_streams=independent_streams, **dist_kw)
        return ChunkNoise(sigma, known, valid, no_target)
    if mode == "independent":
        per_chunk = _stream_draws(rng, names, (b, int(num_chunks)), independent_streams, dist_kw)  # [B, N]
        sigma = {n: jnp.where(known[n], 0.0, jnp.take(per_chunk[n], ids[n], axis=1)) for n in names}
        return ChunkNoise(sigma, known, valid, no_target)
    k_target, k_sigma = jax.random.split(rng)
    target = jax.random.randint(k_target, (b,), 0, int(num_chunks), jnp.int32)
    per_sample = _stream_draws(k_sigma, names, (b,), independent_streams, dist_kw)
    c = target[:, None]
    sigma, context = {}, {}
    for n in names:
        context[n] = known[n] | (ids[n][None] < c)
        noisy = jnp.where(ids[n][None] == c, per_sample[n][:, None], 1.0)
        sigma[n] = jnp.where(context[n], 0.0, noisy)
    valid = {n: v & (ids[n][None] <= c) for n, v in valid.items()}
    return ChunkNoise(sigma, context, valid, target)


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
    noise = {n: jax.random.normal(keys[n], jnp.shape(streams[n])).astype(streams[n].dtype) for n in names}
    clean = {n: streams[n] for n in names}
    sig = {n: sigma[n] for n in names}
    return interpolate(clean, noise, sig), noise, velocity_target(clean, noise)


def flow_loss(
    pred: Streams,
    target: Streams,
    known: Mapping[str, Array] | None,
    *,
    stream_weights: Mapping[str, float] | None = None,
    valid: Mapping[str, Array] | None = None,
    sample_weights: Array | None = None,
    token_weights: Mapping[str, Array] | None = None,
):
    """Masked flow-matching MSE over streams.

    Per stream s and sample b: the squared error is averaged over channels, then over the
    *supervised* tokens -- unknown (``known`` False) and valid (``valid`` True) -- of that sample:
    ``l[b, s] = Σ_t w·mse / max(Σ_t w, 1)``, ``w`` = supervised (0/1) times ``token_weights[s][t]``. A stream with no supervised token in a sample
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
      token_weights: optional ``dict[stream, float[S]]`` relative weights of a stream's tokens (> 0; the
        per-sample mean is renormalised by their sum over the supervised tokens); a missing stream: all 1.

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
        w = _supervised(known, valid, n, mse.shape).astype(jnp.float32)
        if token_weights is not None and n in token_weights:
            w = w * jnp.asarray(token_weights[n], jnp.float32)[None]
        l_bs, has = _sample_means(mse, w)  # [B]; exactly 0 for a sample with no supervised token in this stream
        metrics[f"loss/{n}"] = jnp.sum(l_bs * has) / jnp.maximum(jnp.sum(has), 1.0)
        sw = 1.0 if stream_weights is None else stream_weights.get(n, 1.0)
        per_sample = per_sample + sw * l_bs
        active = jnp.maximum(active, has)
    if sample_weights is not None:
        per_sample = per_sample * jnp.asarray(sample_weights, jnp.float32)
    total = jnp.sum(per_sample) / jnp.maximum(jnp.sum(active), 1.0)
    metrics["loss/total"] = total
    return total, metrics


def temporal_difference_loss(
    pred: Streams,
    target: Streams,
    known: Mapping[str, Array] | None,
    frame_tokens: Mapping[str, int],
    *,
    valid: Mapping[str, Array] | None = None,
    stream_weights: Mapping[str, float] | None = None,
):
    """Squared error of frame-to-frame *changes*: for each stream ``s`` in ``frame_tokens`` (tokens per
    temporal position, frame-major), ``e = pred - target`` and ``d_t = e[t+1] - e[t]`` between same-place
    tokens of consecutive temporal positions ``t >= 1`` (the first position, a residual codec's key frame,
    is coded unlike the rest). Per sample the mean over channels and over the pairs whose both tokens are
    supervised (unknown and valid); then the mean over samples with such a pair, summed over streams
    weighted by ``stream_weights`` (:func:`flow_loss`'s; a missing stream weighs 1).

    Errors that are independent from frame to frame cost ``2x`` their per-frame loss here; errors that
    move together (a steady offset) cost nothing: the term asks for temporally coherent mistakes, which a
    viewer sees as steady frames rather than flicker. With x-prediction, a velocity error is the x0 error
    over σ, so the term weighs like :func:`flow_loss`.

    Returns ``(total, {"loss/<s>_tdiff": ...})``; streams without two supervised positions add 0."""
    total, metrics = jnp.float32(0.0), {}
    for n in sorted(frame_tokens):
        k = int(frame_tokens[n])
        e = pred[n].astype(jnp.float32) - target[n].astype(jnp.float32)  # [B, S, C]
        if e.shape[1] < 3 * k:
            continue
        sup = _supervised(known, valid, n, e.shape[:2])
        d = jnp.mean(jnp.square(e[:, 2 * k :] - e[:, k:-k]), axis=-1)  # pairs (t, t+1), t >= 1: [B, S - 2k]
        l_b, has = _sample_means(d, (sup[:, 2 * k :] & sup[:, k:-k]).astype(jnp.float32))
        metrics[f"loss/{n}_tdiff"] = jnp.sum(l_b * has) / jnp.maximum(jnp.sum(has), 1.0)
        sw = 1.0 if stream_weights is None else stream_weights.get(n, 1.0)
        total = total + sw * metrics[f"loss/{n}_tdiff"]
    return total, metrics


# ----------------------------------------------------------------------------------------------
# Condition dropout
# ----------------------------------------------------------------------------------------------


def silence_dropout(rng, speaking, rate: float):
    """Silence mode at train time without labels: each clip goes silent (every frame 0) with probability
    ``rate``, so the silence embedding (``model.conditions.<c>.silence_embedding``) learns to stand in for
    hidden audio; with ``silence_labels`` the records' labels teach the listening behaviour itself.
    ``speaking`` int ``[B, F]`` -> int32 ``[B, F]`` (labelled silent frames stay silent)."""
    speaking = jnp.asarray(speaking, jnp.int32)
    silent = jax.random.uniform(rng, speaking.shape[:1]) < rate
    return jnp.where(silent[:, None], 0, speaking)


def drop_conditions(
    rng, batch_size: int, probs: Mapping[str, float], *, present: Mapping[str, Array] | None = None, drop_all_prob: float = 0.0
) -> dict[str, Array]:
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
