"""Block maps: which (q-block, k-block) tiles a block-sparse attention kernel visits.

A block map is ``int8 [Bb, nq, nk]`` (``Bb`` is 1 or the batch) with one entry per tile of
``block_q`` queries by ``block_k`` keys, ``nq = ceil(Sq / block_q)``, ``nk = ceil(Sk / block_k)``:

* ``EMPTY`` (0): no (valid query, key) pair in the tile is attended -- the kernel skips the tile;
* ``PARTIAL`` (1): some pairs are attended -- the kernel evaluates the mask predicate in the tile;
* ``FULL`` (2): every pair with a valid query is attended -- no mask arithmetic at all.

mmdit computes maps from its mask rules (``mmdit.attention.masks.block_map``); this module holds the
pure-``jnp`` helpers the kernels need around them (all work under ``jit`` with traced maps):

* :func:`block_map_from_dense` / :func:`block_map_from_mask_fn` build maps (tests, and the default
  when a caller passes no map);
* :func:`refine` splits a map to smaller tiles (the backward kernels use smaller tiles);
* :func:`clip_to_lengths` marks tiles holding padding (beyond the true lengths) so padded keys are
  never attended without a mask and padded-only tiles are skipped;
* :func:`compact` turns a map into per-row visit lists (FULL tiles first, then PARTIAL) that the
  kernels loop over, so EMPTY tiles cost nothing, not even a loop iteration.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

EMPTY, PARTIAL, FULL = 0, 1, 2

MaskFn = Callable[[tuple, tuple], jax.Array]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def classify(mask: jax.Array, q_valid: jax.Array | None = None) -> jax.Array:
    """``bool [..., nq, bq, nk, bk]`` tiles -> ``int8 [..., nq, nk]`` EMPTY/PARTIAL/FULL.

    ``q_valid`` (``bool [..., nq, bq]``) marks real query rows: padded rows are "don't care" (they
    neither make a tile non-empty nor stop it from being FULL).
    """
    if q_valid is not None:
        qv = q_valid[..., :, :, None, None]
        any_b = (mask & qv).any(axis=(-3, -1))
        all_b = (mask | ~qv).all(axis=(-3, -1))
    else:
        any_b = mask.any(axis=(-3, -1))
        all_b = mask.all(axis=(-3, -1))
    return jnp.where(all_b & any_b, FULL, jnp.where(any_b, PARTIAL, EMPTY)).astype(jnp.int8)


def block_map_from_dense(mask: jax.Array, block_q: int, block_k: int) -> jax.Array:
    """``bool [B, Sq, Sk]`` -> ``int8 [B, ceil(Sq/bq), ceil(Sk/bk)]``.

    Sequences are padded to block multiples: padded keys are masked (a tile holding them is never
    FULL), padded query rows are "don't care".
    """
    b, sq, sk = mask.shape
    nq, nk = cdiv(sq, block_q), cdiv(sk, block_k)
    m = jnp.pad(mask.astype(bool), ((0, 0), (0, nq * block_q - sq), (0, nk * block_k - sk)))
    q_valid = (jnp.arange(nq * block_q) < sq).reshape(1, nq, block_q)
    return classify(m.reshape(b, nq, block_q, nk, block_k), q_valid)


def block_map_from_mask_fn(
    mask_fn: MaskFn | None,
    q_meta: Sequence[jax.Array],
    k_meta: Sequence[jax.Array],
    seq_q: int,
    seq_k: int,
    block_q: int,
    block_k: int,
) -> jax.Array:
    """Evaluates ``mask_fn`` tile row by tile row (``lax.map``, memory ``O(Bm * bq * Sk)``).

    ``q_meta``/``k_meta`` are tuples of ``[Bm, S]`` fields (``Bm`` 1 or the batch) passed to
    ``mask_fn`` as ``[Bm, bq, 1]`` / ``[Bm, 1, Sk_pad]``; keys at positions ``>= seq_k`` count as
    invalid whatever ``mask_fn`` says. Returns ``int8 [Bm, nq, nk]`` (``Bm = 1`` without metadata).
    """
    nq, nk = cdiv(seq_q, block_q), cdiv(seq_k, block_k)
    sqp, skp = nq * block_q, nk * block_k
    k_valid = (jnp.arange(skp) < seq_k)[None, None, :]
    q_valid = (jnp.arange(sqp) < seq_q).reshape(1, nq, block_q)
    if mask_fn is None:
        mask = jnp.broadcast_to(k_valid, (1, block_q, skp))
        m = jnp.broadcast_to(mask[:, None], (1, nq, block_q, skp))
        return classify(m.reshape(1, nq, block_q, nk, block_k), q_valid)

    qp = tuple(_pad_seq(f, sqp) for f in q_meta)
    kp = tuple(_pad_seq(f, skp)[:, None, :] for f in k_meta)
    bm = _leading_dim(qp + kp)
    rows = tuple(f.reshape(f.shape[0], nq, block_q).swapaxes(0, 1) for f in qp)  # [nq, Bm, bq]

    def one_row(args):
        qv, q_fields = args
        m = mask_fn(tuple(f[..., None] for f in q_fields), kp)
        m = jnp.broadcast_to(m & k_valid, (bm, block_q, skp)).reshape(bm, 1, block_q, nk, block_k)
        return classify(m, jnp.broadcast_to(qv, (bm, 1, block_q)))[:, 0]

    out = jax.lax.map(one_row, (q_valid[0], rows))  # [nq, Bm, nk]
    return out.swapaxes(0, 1)


def _leading_dim(fields: Sequence[jax.Array]) -> int:
    """The broadcast leading dim of ``[1 | B, ...]`` fields: the first one that is not 1 (decidable
    for a symbolic batch under ``jax.export``, where ``max(1, b)`` is not)."""
    for f in fields:
        d = f.shape[0]
        if not (isinstance(d, int) and d == 1):
            return d
    return 1


def _pad_seq(f: jax.Array, length: int) -> jax.Array:
    f = jnp.asarray(f)
    pad = length - f.shape[1]
    return f if pad == 0 else jnp.pad(f, ((0, 0), (0, pad)))


def refine(bmap: jax.Array, rq: int, rk: int) -> jax.Array:
    """Splits every tile into ``rq x rk`` sub-tiles with the same class.

    Exact for EMPTY and FULL (every sub-tile of an empty/full tile is empty/full) and conservative
    for PARTIAL (sub-tiles keep evaluating the predicate).
    """
    if rq > 1:
        bmap = jnp.repeat(bmap, rq, axis=-2)
    if rk > 1:
        bmap = jnp.repeat(bmap, rk, axis=-1)
    return bmap


def clip_to_lengths(bmap: jax.Array, seq_q: int, seq_k: int, block_q: int, block_k: int) -> jax.Array:
    """Accounts for padding beyond the true lengths ``seq_q``/``seq_k`` (static ints).

    Tiles starting at or after ``seq_q`` or ``seq_k`` hold only padding: EMPTY. The tile straddling
    ``seq_k`` holds padded keys, so FULL becomes PARTIAL there (the kernel's PARTIAL path masks keys
    by position).
    """
    nq, nk = bmap.shape[-2:]
    q_start = jnp.arange(nq) * block_q
    k_start = jnp.arange(nk) * block_k
    dead = (q_start[:, None] >= seq_q) | (k_start[None, :] >= seq_k)
    straddle = (k_start < seq_k) & (k_start + block_k > seq_k)
    bmap = jnp.where(straddle[None, :] & (bmap == FULL), PARTIAL, bmap)
    return jnp.where(dead, EMPTY, bmap).astype(jnp.int8)


def compact(bmap: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row visit lists of a map ``[Bb, R, C]``.

    Returns ``idx int32 [Bb, R, C]`` -- for each row the column indices of its FULL tiles, then its
    PARTIAL tiles, then (unused) the EMPTY ones -- and ``counts int32 [Bb, R, 2]`` =
    ``(n_full, n_full + n_partial)``. A kernel handling row ``r`` visits ``idx[r, :counts[r, 0]]``
    without a mask and ``idx[r, counts[r, 0]:counts[r, 1]]`` with one.
    """
    bmap = bmap.astype(jnp.int32)
    rank = jnp.where(bmap == FULL, 0, jnp.where(bmap == PARTIAL, 1, 2))
    idx = jnp.argsort(rank, axis=-1, stable=True).astype(jnp.int32)
    n_full = (bmap == FULL).sum(-1)
    n_any = (bmap != EMPTY).sum(-1)
    return idx, jnp.stack([n_full, n_any], axis=-1).astype(jnp.int32)


def density(bmap: jax.Array) -> jax.Array:
    """Fraction of tiles a kernel visits (non-EMPTY), a float scalar."""
    return (bmap != EMPTY).mean()
