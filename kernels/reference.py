"""Dense pure-JAX attention under a metadata mask predicate: the numerical reference for the kernels.

Memory is ``O(B * H * Sq * Sk)``: for tests and small shapes only.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def dense_mask(mask_fn: Callable | None, q_meta: Sequence[jax.Array], k_meta: Sequence[jax.Array], sq: int, sk: int) -> jax.Array:
    """``bool [Bm, Sq, Sk]``: ``mask_fn`` on q fields ``[Bm, Sq, 1]`` and k fields ``[Bm, 1, Sk]``
    (``Bm`` is 1 or the batch; all-True ``[1, Sq, Sk]`` when ``mask_fn`` is None)."""
    if mask_fn is None:
        return jnp.ones((1, sq, sk), bool)
    qf = tuple(jnp.asarray(f)[..., :, None] for f in q_meta)
    kf = tuple(jnp.asarray(f)[..., None, :] for f in k_meta)
    m = jnp.asarray(mask_fn(qf, kf)).astype(bool)
    m = m.reshape((1,) * (3 - m.ndim) + m.shape) if m.ndim < 3 else m
    return jnp.broadcast_to(m, (m.shape[0], sq, sk))


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask_fn: Callable | None = None,
    q_meta: Sequence[jax.Array] = (),
    k_meta: Sequence[jax.Array] = (),
    scale: float | None = None,
) -> jax.Array:
    """Softmax attention ``[B, Sq, H, Dh]`` under ``mask_fn``.

    ``q: [B, Sq, H, Dh]``, ``k, v: [B, Sk, H, Dh]``; ``q_meta``/``k_meta`` are tuples of ``[B, S]``
    (or ``[1, S]``) metadata fields; ``mask_fn(q_fields, k_fields) -> bool`` gets them as
    ``[.., Sq, 1]`` / ``[.., 1, Sk]`` and must fold in key validity; ``None`` attends everything.
    Scores and softmax in f32 (``scale`` defaults to ``Dh ** -0.5``); rows with no attended key
    output 0. Returns ``q``'s dtype.
    """
    b, sq, h, dh = q.shape
    sk = k.shape[1]
    scale = dh**-0.5 if scale is None else scale
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    m = dense_mask(mask_fn, q_meta, k_meta, sq, sk)[:, None]  # [Bm, 1, Sq, Sk]
    s = jnp.where(m, s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.where(m, jnp.exp(s - mx), 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32))
    return out.astype(q.dtype)
