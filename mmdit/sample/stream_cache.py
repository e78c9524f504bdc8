"""The streaming KV cache's geometry: window positions, cache shapes, reading a chunk's window, writing a chunk.

Shared by :class:`mmdit.sample.streaming.StreamingSampler` (its module docstring describes the cache),
:mod:`mmdit.sample.stream_batch` and the distillation rollout (:mod:`mmdit.distill.cached_rollout`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmdit.attention import masks as masks_lib

WINDOW_CHUNKS = 3  # sink + previous + current


def window_offsets(chunk, chunk_frames: float, positions: str) -> tuple:
    """Aligned-time offsets ``(current, sink, previous)`` of chunk ``chunk``'s window (the streaming module
    docstring); Python floats for an int ``chunk``, float32 scalars for a traced one."""
    if isinstance(chunk, (int, np.integer)):
        w = chunk if positions == "absolute" else min(chunk, WINDOW_CHUNKS - 1)
    else:
        c = jnp.asarray(chunk, jnp.float32)
        w = c if positions == "absolute" else jnp.minimum(c, WINDOW_CHUNKS - 1)
    return w * chunk_frames, 0.0, (w - 1) * chunk_frames


def cache_shapes(spec, layout, rows: int, steps: int, cache_mode: str) -> dict:
    """``{"k"|"v": {s: shape}, "known": {s: shape}}`` of a cache of ``rows`` rows (the streaming module
    docstring: ``[*D, L, rows, 2·T_s, H, Dh]``, ``D = (steps,)`` in ``per_step`` mode) for the one-chunk
    ``spec``."""
    lead = (steps,) if cache_mode == "per_step" else ()
    kv = {s: lead + (spec.num_layers, rows, 2 * layout.tokens[s], spec.heads, spec.head_dim) for s in spec.generated}
    return {"k": kv, "v": dict(kv), "known": {s: (rows, 2 * layout.tokens[s]) for s in spec.generated}}


def cache_context(spec, layout, cache, c, offsets, step_index, cache_mode: str) -> dict:
    """``kv_context`` for the one-chunk ``MMDiT`` (``spec``: :func:`mmdit.sample.streaming.chunk_model`'s;
    ``layout``: its ``ChunkLayout``) reading chunk ``c``'s window from ``cache`` (the streaming module
    docstring; at ``step_index`` in ``per_step`` mode): the cached keys/values, their metadata (sink slot
    valid from chunk 1 on, previous slot from chunk 2 on) and aligned times (``offsets = (current, sink,
    previous)``, :func:`window_offsets`). ``c``, ``offsets`` and ``step_index`` may be traced."""
    sp, lay = spec, layout
    pick = (lambda a: a[step_index]) if cache_mode == "per_step" else (lambda a: a)
    metas, times = [], {}
    for i, a in enumerate(sp.streams):
        n, T = a.name, lay.tokens[a.name]
        t = jnp.asarray(sp.times[n], jnp.float32)
        times[n] = jnp.concatenate([t + offsets[1], t + offsets[2]])
        rows = cache["known"][n].shape[0]
        metas.append(
            masks_lib.TokenMeta(
                stream=jnp.full((1, 2 * T), i, jnp.int32),
                time=times[n][None],
                chunk=jnp.concatenate([jnp.zeros((1, T), jnp.int32), jnp.full((1, T), c - 1, jnp.int32)], 1),
                known=cache["known"][n],
                valid=jnp.broadcast_to(jnp.concatenate([jnp.full((1, T), c >= 1), jnp.full((1, T), c >= 2)], 1), (rows, 2 * T)),
                group=jnp.zeros((1, 2 * T), jnp.int32),
            )
        )
    return {
        "k": {n: pick(cache["k"][n]) for n in spec.generated},
        "v": {n: pick(cache["v"][n]) for n in spec.generated},
        "cross": cache.get("cross"),
        "meta": masks_lib.TokenMeta.concat(metas),
        "time": times,
    }


def write_cache(spec, layout, cache, c, kv, known) -> dict:
    """Writes a finished chunk's ``kv`` (``{"k"|"v": {s: [*D, L, N, T, H, Dh]}}``) into the previous
    slot, and into the sink slot when ``c == 0`` (traced ``c`` allowed); ``known``: ``{s: bool [N, T]}``
    the chunk's known flags as its keys will be read."""
    out = {"k": {}, "v": {}, "known": {}, "cross": cache.get("cross")}
    for n in spec.generated:
        T = layout.tokens[n]
        for f in ("k", "v"):
            buf = cache[f][n]
            new = kv[f][n].astype(buf.dtype)
            axis = buf.ndim - 3
            buf = jax.lax.dynamic_update_slice_in_dim(buf, new, T, axis)
            sink = jax.lax.dynamic_slice_in_dim(buf, 0, T, axis)
            buf = jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(c == 0, new, sink), 0, axis)
            out[f][n] = buf
        kb = jax.lax.dynamic_update_slice_in_dim(cache["known"][n], known[n], T, 1)
        out["known"][n] = jax.lax.dynamic_update_slice_in_dim(kb, jnp.where(c == 0, known[n], kb[:, :T]), 0, 1)
    return out
