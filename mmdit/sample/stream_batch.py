"""Stream batch: the denoising steps of consecutive chunks as row groups of one forward.

StreamDiffusion's "Stream Batch" applied to the chunk-causal streaming sampler
(:class:`mmdit.sample.streaming.StreamingSampler`, ``sample.stream_batch``). With the ``per_step`` cache, chunk c
at step i reads only the sink's and chunk c - 1's keys/values *of step i*. So chunk c's step i waits for chunk
c - 1's step i, not for chunk c - 1 to finish, and with ``S = steps`` one forward can run

    group 0: chunk c at step 0,   group 1: chunk c - 1 at step 1,   ...,   group S - 1: chunk c - S + 1 at step S - 1

as ``S`` row groups of one batch (``[S·B]`` rows, group-major; ``P·S·B`` with ``P`` guidance patterns,
pattern-major as :func:`mmdit.sample.guidance.repeat_for_cfg`). Each call finishes one chunk with one forward
instead of ``S``. Where a forward costs little more at ``S`` rows than at one (batch 1 on a CPU, small batches on
an accelerator: launch-bound) the stream's throughput rises towards ``S``x. The price is latency: a chunk leaves
``S - 1`` calls after it entered (an a2v chunk comes out once the audio ``S - 1`` chunks later has arrived).

**Exact.** Group j reads step j's cache (the per-step cache ``[S, L, P·B, 2T, H, Dh]`` folded into rows,
:func:`fold_cache`: once when the batched calls begin, and back by :func:`unfold_cache` when the stream ends or
is closed, so no call copies the cache), which holds what the sequential sampler's chunk c - j reads at its step j; it draws the same
noise (``fold_in(rng, c)``; the ``renoise`` solver's ``ode.chunk_noise(rng, c - j, 1 + j, ·)``) and writes its
keys/values into step j's previous-chunk slot after the forward. Outputs agree with the sequential
:meth:`StreamingSampler.step` to the float rounding of batched matmuls (``tests/test_stream_batch.py``).

**Geometry.** With ``bounded`` positions every chunk from chunk 2 on sees the window chunk 2 saw (sink, previous,
current at fixed times; the module docstring of :mod:`mmdit.sample.streaming`), so every group runs as chunk 2.
Chunks 0 and 1 (their windows differ) go through the sequential step first. Filling and draining the pipeline run
the same executable with inactive groups: computed on placeholders, neither written to the cache nor output.
"""

from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from mmdit.sample import guidance as guidance_lib
from mmdit.sample import ode
from mmdit.sample.stream_cache import cache_context, window_offsets

FIRST_BATCHED_CHUNK = 2  # chunks 0 and 1 see other windows than every later chunk (bounded positions)


def fold_steps(a, patterns: int, batch: int, groups: int):
    """A per-step cache entry ``[S, L, P·B, ...]`` -> ``[L, P·S·B, ...]``: row ``(p, j, b)`` holds step ``j``'s
    entry of row ``(p, b)`` (group j reads step j)."""
    s, layers = a.shape[:2]
    rest = tuple(a.shape[3:])
    a = jnp.moveaxis(a.reshape((s, layers, patterns, batch) + rest), 0, 2)
    return a.reshape((layers, patterns * groups * batch) + rest)


def unfold_steps(a, patterns: int, batch: int, groups: int):
    """The inverse of :func:`fold_steps` for per-row values ``[L, P·S·B, ...]`` -> ``[S, L, P·B, ...]``."""
    layers = a.shape[0]
    rest = tuple(a.shape[2:])
    a = jnp.moveaxis(a.reshape((layers, patterns, groups, batch) + rest), 2, 0)
    return a.reshape((groups, layers, patterns * batch) + rest)


def spread_groups(a, axis: int, patterns: int, batch: int, groups: int):
    """Rows ``P·B`` on ``axis`` -> ``P·S·B`` (pattern-major, then group): the same value for every group."""
    shape = tuple(a.shape)
    a = jnp.expand_dims(a.reshape(shape[:axis] + (patterns, batch) + shape[axis + 1 :]), axis + 1)
    a = jnp.broadcast_to(a, shape[:axis] + (patterns, groups, batch) + shape[axis + 1 :])
    return a.reshape(shape[:axis] + (patterns * groups * batch,) + shape[axis + 1 :])


def fold_cache(cache: dict, patterns: int, batch: int, groups: int) -> dict:
    """The streaming cache (``per_step``) in the batched calls' row layout: ``k``/``v`` ``[L, P·S·B, 2T, H, Dh]``
    (:func:`fold_steps`), ``known`` ``[P·S·B, 2T]`` and the conditions' ``cross`` keys/values ``[L, P·S·B, ...]``
    the same for every group (:func:`spread_groups`)."""
    return {
        "k": {n: fold_steps(a, patterns, batch, groups) for n, a in cache["k"].items()},
        "v": {n: fold_steps(a, patterns, batch, groups) for n, a in cache["v"].items()},
        "known": {n: spread_groups(a, 0, patterns, batch, groups) for n, a in cache["known"].items()},
        "cross": jax.tree.map(lambda a: spread_groups(a, 1, patterns, batch, groups), cache.get("cross")),
    }


def unfold_cache(folded: dict, cross, patterns: int, batch: int, groups: int) -> dict:
    """The inverse of :func:`fold_cache` (``cross``: the unfolded conditions' keys/values, unchanged by the calls;
    ``known`` from group 0's rows: every group writes the same flags)."""
    first = lambda a: a.reshape((patterns, groups, batch) + a.shape[1:])[:, 0].reshape((patterns * batch,) + a.shape[1:])  # noqa: E731
    return {
        "k": {n: unfold_steps(a, patterns, batch, groups) for n, a in folded["k"].items()},
        "v": {n: unfold_steps(a, patterns, batch, groups) for n, a in folded["v"].items()},
        "known": {n: first(a) for n, a in folded["known"].items()},
        "cross": cross,
    }


def batched_chunk_fn(ss, batch: int, steps: int, g: guidance_lib.Guidance, solver: str):
    """The stream-batch call as one function of arrays; ``ss``: the :class:`StreamingSampler`.

    ``run(dit_params, cache, c, active, rng, x_groups, held_groups, given, given_flags, inputs, conds, cmasks,
    sigmas) -> (latents, cache, x_groups, held_groups)``: ``cache`` in :func:`fold_cache`'s layout; ``c`` int32, the chunk entering at step 0 (group j holds
    chunk c - j); ``active`` bool ``[S]``; ``x_groups`` / ``held_groups`` ``{s: [S, B, T_s, C_s]}``: group j's
    tokens before its step and its held (given) tokens (slot 0 is filled here from the drawn noise and
    ``given``); returns the finished chunk's latents ``{s: [B, *chunk_latent_shape]}`` (group S - 1's; valid when
    ``active[S - 1]``), the cache with the active groups' keys/values written, and the groups shifted by one step
    for the next call."""
    model, gen, plan, spec, layout = ss.model, ss.generated, g.plan(), ss.spec, ss.layout
    S, P = steps, len(plan)
    order = sorted(gen)  # a stream's index in the re-noising draw (ode.chunk_noise), as the sequential chunk
    rep = lambda tree: guidance_lib.repeat_for_cfg(tree, plan)  # noqa: E731
    flags = guidance_lib.cfg_keep_flags(plan, S * batch)
    tile = lambda tree: jax.tree.map(lambda a: jnp.concatenate([a] * S, 0), tree)  # noqa: E731  [B..] -> [S·B..]
    offsets = window_offsets(FIRST_BATCHED_CHUNK, layout.chunk_frames, "bounded")

    def run(dit_params, cache, c, active, rng, x_groups, held_groups, given, given_flags, inputs, conds, cmasks, sigmas):
        known, present, scales = inputs["known"], inputs["present"], inputs["scales"]
        held0 = {n: jnp.where(given_flags[n], spec.stream(n).geometry.patchify(given[n]), inputs["held"][n]) for n in gen}
        drawn = jax.lax.optimization_barrier(ss._chunk_noise(rng, c, batch))  # as the sequential chunk (bit for bit)
        held = {n: held_groups[n].at[0].set(held0[n]) for n in gen}
        x = {n: x_groups[n].at[0].set(jnp.where(known[n][..., None], held0[n], drawn[n])) for n in gen}
        s_at = [{n: sigmas[n][j] for n in gen} for j in range(S + 1)]
        flat = lambda a: a.reshape((S * batch,) + a.shape[2:])  # noqa: E731  [S, B, ..] -> [S·B, ..]
        sig = {n: jnp.stack([jnp.where(known[n], 0.0, s_at[j][n]) for j in range(S)]) for n in gen}
        keep = {}
        for name in spec.keep_names:
            keep[name] = rep(tile(present[name])) & flags[name] if name in flags else rep(tile(present[name]))
        kvc = cache_context(spec, layout, cache, FIRST_BATCHED_CHUNK, offsets, None, "clean")
        known_rows = {n: tile(known[n]) for n in gen}
        v_rows, kv = model.dit.apply(
            dit_params,
            rep({n: flat(x[n]) for n in gen}),
            rep({n: flat(sig[n]) for n in gen}),
            rep(tile(conds)),
            rep(tile(cmasks)),
            keep,
            rep(known_rows),
            rep({n: jnp.ones_like(known_rows[n]) for n in gen}),
            kv_context=kvc,
            chunk_index=FIRST_BATCHED_CHUNK,
            time_offset=offsets[0],
            return_kv=True,
        )
        x_next = {n: [] for n in gen}
        for j in range(S):
            rows_j = {
                n: v_rows[n].reshape((P, S, batch) + v_rows[n].shape[1:])[:, j].reshape((P * batch,) + v_rows[n].shape[1:])
                for n in gen
            }
            v = guidance_lib.combine_cfg(rows_j, plan, g.scale_at(scales, j, steps, s_at[j]))
            stepped = ode.streams_update(solver, {n: x[n][j] for n in gen}, v, s_at[j], s_at[j + 1], rng, c - j, j, order)
            for n in gen:
                x_next[n].append(jnp.where(known[n][..., None], held[n][j], stepped[n]))
        finished = model.latents({n: x_next[n][S - 1] for n in gen})
        shift = lambda parts, like: jnp.stack([jnp.zeros_like(like)] + list(parts[: S - 1]))  # noqa: E731
        x_out = {n: shift(x_next[n], x[n][0]) for n in gen}
        held_out = {n: shift([held[n][j] for j in range(S)], held[n][0]) for n in gen}
        out = {"k": {}, "v": {}, "known": {}, "cross": cache.get("cross")}
        # row (p, j, b) is written where group j is active
        write = jnp.broadcast_to(active[None, :, None], (P, S, batch)).reshape((1, P * S * batch, 1, 1, 1))
        for n in gen:
            T = layout.tokens[n]
            for f in ("k", "v"):
                buf = cache[f][n]
                out[f][n] = buf.at[:, :, T:].set(jnp.where(write, kv[f][n].astype(buf.dtype), buf[:, :, T:]))
            out["known"][n] = cache["known"][n].at[:, T:].set(rep(known_rows[n]))
        return finished, out, x_out, held_out

    return run


def stream(ss, params, state, source: Iterator | None, num_chunks: int | None) -> Iterator[dict]:
    """The batched part of :meth:`StreamingSampler.stream` (module docstring): from ``state.chunk >= 2`` on, one
    batched call per chunk until ``num_chunks`` more chunks came out (None: until ``source`` ends); ``source``: the
    (timed) iterator of per-chunk given latents or None. The caller's ``state`` follows the stream (its ``cache`` is
    written back from the folded one when the stream ends or is closed; closed with chunks in flight it is marked
    ``unfinished``)."""
    if state.chunk < FIRST_BATCHED_CHUNK:
        raise ValueError(f"stream batch starts at chunk {FIRST_BATCHED_CHUNK}; chunk {state.chunk} is streamed one by one")
    S, B = state.steps, state.batch
    zeros = ss._zero_inputs(B)["tokens"]
    x_groups = {n: jnp.zeros((S,) + a.shape, a.dtype) for n, a in zeros.items()}
    held_groups = {n: jnp.zeros((S,) + a.shape, a.dtype) for n, a in zeros.items()}
    # the chunk at step 0 of the next call, the chunks entered so far and the next to come out (exclusive ends)
    front = entered = next_out = start = state.chunk
    ended = False
    dit_params, dit_signature = ss._unboxed_dit(params)
    P, cross = len(state.guidance.plan()), state.cache.get("cross")
    folded = _fold(state.cache, P, B, S)
    try:
        while True:
            given = None
            if not ended and (num_chunks is None or entered - start < num_chunks):
                given = None if source is None else next(source, None)
                if source is None or given is not None:
                    entered += 1
                else:
                    ended = True
            else:
                ended = True
            active = np.array([start <= front - j < entered for j in range(S)])  # chunks of this call in flight
            if not active.any():
                return
            if front < entered:
                given, flags = ss.given_inputs(state, given, front)
            else:  # draining: no chunk enters
                given, flags = ss._zero_inputs(B)["latents"], {n: np.bool_(False) for n in ss.generated}
            args = (
                dit_params,
                folded,
                np.int32(front),
                active,
                state.rng,
                x_groups,
                held_groups,
                given,
                flags,
                state.chunk_inputs[1],
                state.conds,
                state.cond_masks,
                state.sigmas,
            )
            key = ("stream_batch", state.signature, dit_signature)
            make = lambda: batched_chunk_fn(ss, B, S, state.guidance, state.solver)  # noqa: E731
            latents, folded, x_groups, held_groups = ss.compiled(key, make, args, donate_argnums=(1, 5, 6))(*args)
            state.chunk = entered
            front += 1
            if active[S - 1]:
                next_out += 1
                yield latents
    finally:
        state.cache = _unfold(folded, cross, P, B, S)
        state.unfinished = next_out < entered  # closed with chunks in flight


_fold = jax.jit(fold_cache, static_argnums=(1, 2, 3))
_unfold = jax.jit(unfold_cache, static_argnums=(2, 3, 4))
