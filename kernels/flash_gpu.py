"""Block-sparse flash attention for GPUs (Pallas, Triton lowering), forward and backward.

Layouts: ``q: [B, Sq, H, Dh]``, ``k, v: [B, Sk, H, Dh]`` (bf16, f16 or f32; f32 accumulation).
The mask is a predicate over per-token metadata (see :mod:`mmdit_kernels.metadata`) plus a block map
(see :mod:`mmdit_kernels.block_map`). Each program owns one (q-tile, batch, head) and walks the
tile's visit list: FULL key tiles first with no mask arithmetic at all, then PARTIAL key tiles with
the predicate evaluated on the metadata tiles loaded in-kernel; EMPTY tiles are never visited.

Backward is FlashAttention-2's split: ``delta = rowsum(dO * O)`` in XLA, a dq kernel over key tiles
(per q-tile visit lists) and a dk/dv kernel over query tiles (visit lists of the transposed map),
both recomputing probabilities from the forward's saved log-sum-exp. Each backward kernel keeps its
output tile at the forward size and walks the other side in smaller tiles (``block_k_bwd`` keys for
dq, ``block_q_bwd`` queries for dk/dv; default 32, the Triton tutorial's shape), with the forward
map refined to them. Tile sizes, warps and stages are untuned defaults (no GPU was available when
they were chosen); all are arguments.

Numerics: scores are scaled by ``scale * log2(e)`` and exponentiated with ``exp2``; the saved
log-sum-exp is in base 2 (``lse2``) and is ``+inf`` for rows with no attended key, which makes
their output and every gradient through them exactly 0 (no NaN). Lengths that are not tile
multiples are padded here (padded keys are masked by position) and sliced back; head dims that are
not powers of two are zero-padded (any ``Dh <= 256``). Element offsets are 32-bit: a batch whose
operands exceed ``2**31`` elements runs in batch slices (one batch element must fit).

Entry points: :func:`flash_attention_gpu` (differentiable, ``custom_vjp``) and, for ring attention,
:func:`flash_attention_gpu_fwd_lse` / :func:`flash_attention_gpu_bwd`: one key block's ``(out, lse)``
(natural log, ``-inf`` for rows with no attended key) and its gradient share given the merged
``out``/``lse`` (converted to and from the kernels' base-2, ``+inf``-for-empty convention).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmdit_kernels import block_map as bm
from mmdit_kernels import metadata as md
from mmdit_kernels.vma import out_struct

LOG2E = math.log2(math.e)
MAX_HEAD_DIM = 256
MAX_ELEMENTS = 2**31 - 1  # Pallas' Triton lowering computes element offsets in int32


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static parameters of one attention call (the custom_vjp's non-differentiable argument)."""

    mask_fn: Callable | None
    q_flags: tuple[bool, ...]
    k_flags: tuple[bool, ...]
    bm_q: tuple[int, ...]  # batch size of each q metadata field (1 = shared)
    bm_k: tuple[int, ...]
    scale: float
    seq_q: int  # true (unpadded) lengths
    seq_k: int
    block_q: int  # forward tiles; also the dq kernel's q tile and the dk/dv kernel's k tile
    block_k: int
    block_q_bwd: int  # q tile walked by the dk/dv kernel
    block_k_bwd: int  # k tile walked by the dq kernel
    interpret: bool
    num_warps: int | None
    num_stages: int
    num_stages_bwd: int


def _precision(dtype):
    # f32 inputs: IEEE dots (Triton would otherwise use TF32); 16-bit inputs: the native MMA.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _bsel(n: int):
    """Index-map helper: a batch index for an operand whose batch is ``n`` (1 = broadcast)."""
    return (lambda b: b) if n > 1 else (lambda b: 0)


def _tile_mask(cfg: _Config, qf, kf, k_start, bq: int, bk: int):
    """``bool [bq, bk]`` for a PARTIAL tile: the predicate and key position < seq_k (or None)."""
    mask = None
    if cfg.mask_fn is not None:
        mask = jnp.broadcast_to(jnp.asarray(cfg.mask_fn(qf, kf)).astype(bool), (bq, bk))
    if cfg.seq_k % bk:
        valid = jnp.broadcast_to((k_start + jnp.arange(bk, dtype=jnp.int32))[None, :] < cfg.seq_k, (bq, bk))
        mask = valid if mask is None else mask & valid
    return mask


def _q_fields(refs, flags, rows=None):
    vals = tuple((r[...] if rows is None else r[rows])[:, None] for r in refs)
    return md.decode(vals, flags)


def _k_fields(refs, flags, cols=None):
    vals = tuple((r[...] if cols is None else r[cols])[None, :] for r in refs)
    return md.decode(vals, flags)


def _visit(cnt_ref, body, init):
    """Runs ``body(j, carry, masked)`` over the FULL then the PARTIAL entries of a visit list."""
    n_full, n_any = cnt_ref[0], cnt_ref[1]
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), init)
    return lax.fori_loop(n_full, n_any, functools.partial(body, masked=True), carry)


# ----------------------------------------------------------------------------------------------
# Kernels.


def _fwd_kernel(kidx_ref, kcnt_ref, q_ref, k_ref, v_ref, *refs, cfg: _Config):
    nq_f, nk_f = len(cfg.q_flags), len(cfg.k_flags)
    qm_refs, km_refs = refs[:nq_f], refs[nq_f : nq_f + nk_f]
    o_ref, lse_ref = refs[nq_f + nk_f :]
    bq, bk = cfg.block_q, cfg.block_k
    prec = _precision(q_ref.dtype)
    q = q_ref[...]
    qf = _q_fields(qm_refs, cfg.q_flags)
    c = cfg.scale * LOG2E

    def body(j, carry, masked):
        acc, m_prev, l_prev = carry
        start = pl.multiple_of(kidx_ref[j] * bk, bk)
        cols = pl.ds(start, bk)
        s = pl.dot(q, k_ref[cols, :], trans_b=True, precision=prec) * c  # [bq, bk] f32
        mask = _tile_mask(cfg, qf, _k_fields(km_refs, cfg.k_flags, cols), start, bq, bk) if masked else None
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        m_next = jnp.maximum(m_prev, s.max(axis=-1))
        # A row with nothing attended so far keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_use = jnp.where(m_next == -jnp.inf, 0.0, m_next) if mask is not None else m_next
        alpha = jnp.exp2(m_prev - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l_next = alpha * l_prev + p.sum(axis=-1)
        v = v_ref[cols, :]
        acc = alpha[:, None] * acc + pl.dot(p.astype(v.dtype), v, precision=prec)
        return acc, m_next, l_next

    init = (
        jnp.zeros((bq, q.shape[-1]), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, l = _visit(kcnt_ref, body, init)
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _dq_kernel(kidx_ref, kcnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config):
    nq_f, nk_f = len(cfg.q_flags), len(cfg.k_flags)
    qm_refs, km_refs = refs[:nq_f], refs[nq_f : nq_f + nk_f]
    (dq_ref,) = refs[nq_f + nk_f :]
    bq, bk = cfg.block_q, cfg.block_k_bwd
    prec = _precision(q_ref.dtype)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    qf = _q_fields(qm_refs, cfg.q_flags)
    c = cfg.scale * LOG2E

    def body(j, dq, masked):
        start = pl.multiple_of(kidx_ref[j] * bk, bk)
        cols = pl.ds(start, bk)
        k, v = k_ref[cols, :], v_ref[cols, :]
        s = pl.dot(q, k, trans_b=True, precision=prec) * c
        mask = _tile_mask(cfg, qf, _k_fields(km_refs, cfg.k_flags, cols), start, bq, bk) if masked else None
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        p = jnp.exp2(s - lse[:, None])  # lse = +inf on empty rows -> p = 0
        dp = pl.dot(do, v, trans_b=True, precision=prec)
        ds = p * (dp - delta[:, None])
        return dq + pl.dot(ds.astype(k.dtype), k, precision=prec)

    dq = _visit(kcnt_ref, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(qidx_ref, qcnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config):
    nq_f, nk_f = len(cfg.q_flags), len(cfg.k_flags)
    qm_refs, km_refs = refs[:nq_f], refs[nq_f : nq_f + nk_f]
    dk_ref, dv_ref = refs[nq_f + nk_f :]
    bq, bk = cfg.block_q_bwd, cfg.block_k
    prec = _precision(q_ref.dtype)
    k, v = k_ref[...], v_ref[...]
    kf = _k_fields(km_refs, cfg.k_flags)
    k_start = pl.program_id(0) * bk
    c = cfg.scale * LOG2E

    def body(j, carry, masked):
        dk, dv = carry
        start = pl.multiple_of(qidx_ref[j] * bq, bq)
        rows = pl.ds(start, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        lse, delta = lse_ref[rows], delta_ref[rows]
        s = pl.dot(q, k, trans_b=True, precision=prec) * c  # [bq, bk]
        mask = _tile_mask(cfg, _q_fields(qm_refs, cfg.q_flags, rows), kf, k_start, bq, bk) if masked else None
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        p = jnp.exp2(s - lse[:, None])
        dv = dv + pl.dot(p.astype(do.dtype), do, trans_a=True, precision=prec)
        dp = pl.dot(do, v, trans_b=True, precision=prec)
        ds = p * (dp - delta[:, None])
        dk = dk + pl.dot(ds.astype(q.dtype), q, trans_a=True, precision=prec)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = _visit(qcnt_ref, body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers (all operands already padded to tile multiples).


def _compiler_params(cfg: _Config, warps: int, stages: int):
    return plgpu.CompilerParams(num_warps=cfg.num_warps or warps, num_stages=stages)


def _meta_specs(cfg: _Config, q_tile, k_tile, grid_is_q: bool):
    """BlockSpecs of the metadata fields for a (tile, b, h) grid.

    ``grid_is_q``: the grid walks q tiles (q fields tiled, k fields whole) or k tiles (the reverse).
    ``q_tile``/``k_tile`` are the tile lengths, or the whole padded length for whole fields.
    """
    specs = []
    for n in cfg.bm_q:
        sel = _bsel(n)
        if grid_is_q:
            specs.append(pl.BlockSpec((None, q_tile), lambda i, b, h, sel=sel: (sel(b), i)))
        else:
            specs.append(pl.BlockSpec((None, q_tile), lambda i, b, h, sel=sel: (sel(b), 0)))
    for n in cfg.bm_k:
        sel = _bsel(n)
        if grid_is_q:
            specs.append(pl.BlockSpec((None, k_tile), lambda i, b, h, sel=sel: (sel(b), 0)))
        else:
            specs.append(pl.BlockSpec((None, k_tile), lambda i, b, h, sel=sel: (sel(b), i)))
    return specs


def _list_specs(idx, cnt):
    sel = _bsel(idx.shape[0])
    return [
        pl.BlockSpec((None, None, idx.shape[-1]), lambda i, b, h: (sel(b), i, 0)),
        pl.BlockSpec((None, None, 2), lambda i, b, h: (sel(b), i, 0)),
    ]


def _forward(cfg: _Config, q, k, v, q_meta, k_meta, fwd_lists):
    b, sqp, h, d = q.shape
    skp = k.shape[1]
    bq = cfg.block_q
    idx, cnt = fwd_lists
    tile = pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0))
    whole = pl.BlockSpec((None, skp, None, d), lambda i, b_, h_: (b_, 0, h_, 0))
    operands = (idx, cnt, q, k, v, *q_meta, *k_meta)
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(sqp // bq, b, h),
        in_specs=_list_specs(idx, cnt) + [tile, whole, whole] + _meta_specs(cfg, bq, skp, True),
        out_specs=[tile, pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i))],
        out_shape=[out_struct(q.shape, q.dtype, operands), out_struct((b, h, sqp), jnp.float32, operands)],
        compiler_params=_compiler_params(cfg, 4 if d <= 64 else 8, cfg.num_stages),
        interpret=cfg.interpret,
        name="mmdit_flash_fwd",
    )(*operands)
    return o, lse


def _backward(cfg: _Config, res, do):
    q, k, v, q_meta, k_meta, _, dq_lists, dkv_lists, o, lse = res
    b, sqp, h, d = q.shape
    skp = k.shape[1]
    delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
    params = _compiler_params(cfg, 4 if d <= 64 else 8, cfg.num_stages_bwd)
    q_whole = pl.BlockSpec((None, sqp, None, d), lambda i, b_, h_: (b_, 0, h_, 0))
    k_whole = pl.BlockSpec((None, skp, None, d), lambda i, b_, h_: (b_, 0, h_, 0))
    row_whole = pl.BlockSpec((None, None, sqp), lambda i, b_, h_: (b_, h_, 0))

    # dq: one program per (q tile of block_q, b, h), walking key tiles of block_k_bwd.
    bq = cfg.block_q
    qt = pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0))
    row_tile = pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i))
    idx, cnt = dq_lists
    operands = (idx, cnt, q, k, v, do, lse, delta, *q_meta, *k_meta)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(sqp // bq, b, h),
        in_specs=_list_specs(idx, cnt) + [qt, k_whole, k_whole, qt, row_tile, row_tile] + _meta_specs(cfg, bq, skp, True),
        out_specs=qt,
        out_shape=out_struct(q.shape, q.dtype, operands),
        compiler_params=params,
        interpret=cfg.interpret,
        name="mmdit_flash_bwd_dq",
    )(*operands)

    # dk, dv: one program per (key tile of block_k, b, h), walking query tiles of block_q_bwd.
    bk = cfg.block_k
    kt = pl.BlockSpec((None, bk, None, d), lambda i, b_, h_: (b_, i, h_, 0))
    idx, cnt = dkv_lists
    operands = (idx, cnt, q, k, v, do, lse, delta, *q_meta, *k_meta)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(skp // bk, b, h),
        in_specs=_list_specs(idx, cnt) + [q_whole, kt, kt, q_whole, row_whole, row_whole] + _meta_specs(cfg, sqp, bk, False),
        out_specs=[kt, kt],
        out_shape=[out_struct(k.shape, k.dtype, operands), out_struct(v.shape, v.dtype, operands)],
        compiler_params=params,
        interpret=cfg.interpret,
        name="mmdit_flash_bwd_dkv",
    )(*operands)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, q_meta, k_meta, fwd_lists, dq_lists, dkv_lists):
    return _forward(cfg, q, k, v, q_meta, k_meta, fwd_lists)[0]


def _flash_fwd(cfg, q, k, v, q_meta, k_meta, fwd_lists, dq_lists, dkv_lists):
    o, lse = _forward(cfg, q, k, v, q_meta, k_meta, fwd_lists)
    return o, (q, k, v, q_meta, k_meta, fwd_lists, dq_lists, dkv_lists, o, lse)


def _flash_bwd(cfg, res, do):
    dq, dk, dv = _backward(cfg, res, do)
    return dq, dk, dv, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# Public entry points: flash_attention_gpu (differentiable) and the blockwise pair for ring
# attention, flash_attention_gpu_fwd_lse / flash_attention_gpu_bwd.


def _check_block(name: str, value: int) -> None:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name}={value}: tile sizes must be powers of two >= 16 (Triton)")


@dataclasses.dataclass(frozen=True)
class _Prepared:
    cfg: _Config
    q: jax.Array  # [B, Sq_pad, H, D_pad]
    k: jax.Array
    v: jax.Array
    q_meta: tuple  # encoded [Bm, Sq_pad]
    k_meta: tuple
    fwd_lists: tuple
    dq_lists: tuple
    dkv_lists: tuple
    dims: tuple  # (Sq, Sk, Dh, Sq_pad, Sk_pad, D_pad)


def _batch_step(q, k, block_q, block_k) -> int | None:
    """Batch elements per kernel call when the operands exceed 32-bit offsets (None: one call)."""
    b, sq, h, d = q.shape
    sqp, skp = bm.cdiv(sq, block_q) * block_q, bm.cdiv(k.shape[1], block_k) * block_k
    per_batch = max(sqp, skp) * h * max(16, pl.next_power_of_2(d))
    if per_batch > MAX_ELEMENTS:
        raise ValueError(
            f"one batch element of q/k/v holds {per_batch} elements (padded); the Triton kernels "
            f"address operands with 32-bit offsets (< {MAX_ELEMENTS}): shard the heads or sequence"
        )
    return MAX_ELEMENTS // per_batch if b * per_batch > MAX_ELEMENTS else None


def _in_batch_slices(fn, step: int, arrays, q_meta, k_meta, block_map, **kwargs):
    """``fn`` on batch slices of ``step`` elements (``arrays`` and per-batch metadata/maps sliced),
    outputs concatenated along the batch."""
    pick = lambda x, i: x if x is None or x.shape[0] == 1 else x[i : i + step]
    outs = [
        fn(
            *(a[i : i + step] for a in arrays),
            q_meta=tuple(pick(jnp.asarray(f), i) for f in q_meta),
            k_meta=tuple(pick(jnp.asarray(f), i) for f in k_meta),
            block_map=pick(block_map, i),
            **kwargs,
        )
        for i in range(0, arrays[0].shape[0], step)
    ]
    if isinstance(outs[0], tuple):
        return tuple(jnp.concatenate(parts) for parts in zip(*outs))
    return jnp.concatenate(outs)


def _prepare(
    q, k, v, mask_fn, q_meta, k_meta, block_map, scale, block_q, block_k, block_q_bwd, block_k_bwd, interpret, **knobs
) -> _Prepared:
    """Validates the arguments, pads the operands to tile multiples and builds the visit lists."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, Sq, H, Dh] and k, v [B, Sk, H, Dh]; got {q.shape}, {k.shape}, {v.shape}")
    b, sq, h, d = q.shape
    sk = k.shape[1]
    if k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch, heads or head dim")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} > {MAX_HEAD_DIM} is not supported by the GPU kernel")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    block_q_bwd = block_q_bwd or min(32, block_q)
    block_k_bwd = block_k_bwd or min(32, block_k)
    for name, val in (("block_q", block_q), ("block_k", block_k), ("block_q_bwd", block_q_bwd), ("block_k_bwd", block_k_bwd)):
        _check_block(name, val)
    if block_q % block_q_bwd or block_k % block_k_bwd:
        raise ValueError("backward tiles must divide the forward tiles")
    scale = d**-0.5 if scale is None else float(scale)
    q_meta = md.check(q_meta, b, sq, "q_meta")
    k_meta = md.check(k_meta, b, sk, "k_meta")
    nq, nk = bm.cdiv(sq, block_q), bm.cdiv(sk, block_k)
    sqp, skp = nq * block_q, nk * block_k
    if block_map is None:
        block_map = bm.block_map_from_mask_fn(mask_fn, q_meta, k_meta, sq, sk, block_q, block_k)
    elif block_map.ndim != 3 or block_map.shape[1:] != (nq, nk) or block_map.shape[0] not in (1, b):
        raise ValueError(
            f"block_map has shape {block_map.shape}; expected [{b} or 1, {nq}, {nk}] for "
            f"Sq={sq}, Sk={sk}, block_q={block_q}, block_k={block_k}"
        )
    fwd_map = bm.clip_to_lengths(block_map, sq, sk, block_q, block_k)
    dq_map = bm.clip_to_lengths(bm.refine(block_map, 1, block_k // block_k_bwd), sq, sk, block_q, block_k_bwd)
    dkv_map = bm.clip_to_lengths(bm.refine(block_map, block_q // block_q_bwd, 1), sq, sk, block_q_bwd, block_k)

    cfg = _Config(
        mask_fn=mask_fn,
        q_flags=md.bool_flags(q_meta),
        k_flags=md.bool_flags(k_meta),
        bm_q=tuple(int(f.shape[0]) for f in q_meta),
        bm_k=tuple(int(f.shape[0]) for f in k_meta),
        scale=scale,
        seq_q=sq,
        seq_k=sk,
        block_q=block_q,
        block_k=block_k,
        block_q_bwd=block_q_bwd,
        block_k_bwd=block_k_bwd,
        interpret=interpret,
        num_warps=knobs.get("num_warps"),
        num_stages=knobs.get("num_stages", 2),
        num_stages_bwd=knobs.get("num_stages_bwd", 3),
    )
    dp = max(16, pl.next_power_of_2(d))
    pad = lambda x, s: jnp.pad(x, ((0, 0), (0, s - x.shape[1]), (0, 0), (0, dp - d)))
    return _Prepared(
        cfg=cfg,
        q=pad(q, sqp),
        k=pad(k, skp),
        v=pad(v, skp),
        q_meta=md.pad(md.encode(q_meta), sqp),
        k_meta=md.pad(md.encode(k_meta), skp),
        fwd_lists=bm.compact(fwd_map),
        dq_lists=bm.compact(dq_map),
        dkv_lists=bm.compact(jnp.swapaxes(dkv_map, -1, -2)),
        dims=(sq, sk, d, sqp, skp, dp),
    )


def flash_attention_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask_fn: Callable | None = None,
    q_meta: Sequence[jax.Array] = (),
    k_meta: Sequence[jax.Array] = (),
    block_map: jax.Array | None = None,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    block_q_bwd: int | None = None,
    block_k_bwd: int | None = None,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int = 2,
    num_stages_bwd: int = 3,
) -> jax.Array:
    """Block-sparse attention ``[B, Sq, H, Dh]`` (differentiable in ``q``, ``k``, ``v``).

    ``mask_fn(q_fields, k_fields) -> bool`` is evaluated in-kernel on PARTIAL tiles with fields
    ``[bq, 1]`` / ``[1, bk]`` taken from ``q_meta``/``k_meta`` (tuples of ``[B | 1, S]`` arrays); it
    must fold in key validity. ``block_map`` (``int8 [B | 1, ceil(Sq/block_q), ceil(Sk/block_k)]``,
    EMPTY/PARTIAL/FULL) defaults to one computed densely from ``mask_fn`` (``O(Sq * Sk)`` work).
    A FULL tile promises ``mask_fn`` holds on every (valid query, valid key) pair in it. Rows with no
    attended key output 0 and get zero gradients. ``interpret=True`` runs the kernels through the
    Pallas interpreter (any backend, slow).
    """
    kwargs = dict(
        mask_fn=mask_fn,
        scale=scale,
        block_q=block_q,
        block_k=block_k,
        block_q_bwd=block_q_bwd,
        block_k_bwd=block_k_bwd,
        interpret=interpret,
        num_warps=num_warps,
        num_stages=num_stages,
        num_stages_bwd=num_stages_bwd,
    )
    step = _batch_step(q, k, block_q, block_k)
    if step is not None:  # run batch slices that fit 32-bit offsets, one call each
        return _in_batch_slices(flash_attention_gpu, step, (q, k, v), q_meta, k_meta, block_map, **kwargs)
    p = _prepare(q, k, v, q_meta=q_meta, k_meta=k_meta, block_map=block_map, **kwargs)
    sq, _, d = p.dims[:3]
    out = _flash(p.cfg, p.q, p.k, p.v, p.q_meta, p.k_meta, p.fwd_lists, p.dq_lists, p.dkv_lists)
    return out[:, :sq, :, :d]


def flash_attention_gpu_fwd_lse(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask_fn: Callable | None = None,
    q_meta: Sequence[jax.Array] = (),
    k_meta: Sequence[jax.Array] = (),
    block_map: jax.Array | None = None,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    interpret: bool = False,
    **knobs,
) -> tuple[jax.Array, jax.Array]:
    """``(out [B, Sq, H, Dh] in q.dtype, lse float32 [B, H, Sq])`` for one key block (ring attention).

    ``lse`` is the natural-log log-sum-exp of the row's scaled scores over its attended keys; rows with
    no attended key give ``out = 0`` and ``lse = -inf``. Not differentiable (ring attention wraps it
    in its own ``custom_vjp`` and calls :func:`flash_attention_gpu_bwd`). Arguments as
    :func:`flash_attention_gpu` (``knobs``: its tile/warp/stage options).
    """
    kwargs = dict(mask_fn=mask_fn, scale=scale, block_q=block_q, block_k=block_k, interpret=interpret, **knobs)
    step = _batch_step(q, k, block_q, block_k)
    if step is not None:
        return _in_batch_slices(flash_attention_gpu_fwd_lse, step, (q, k, v), q_meta, k_meta, block_map, **kwargs)
    p = _prepare(q, k, v, q_meta=q_meta, k_meta=k_meta, block_map=block_map, **_with_bwd_tiles(kwargs))
    sq, _, d = p.dims[:3]
    o, lse2 = _forward(p.cfg, p.q, p.k, p.v, p.q_meta, p.k_meta, p.fwd_lists)
    lse2 = lse2[:, :, :sq]
    lse = jnp.where(lse2 == jnp.inf, -jnp.inf, lse2 / LOG2E)  # base 2 (+inf: no key) -> natural (-inf)
    return o[:, :sq, :, :d], lse


def flash_attention_gpu_bwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    dout: jax.Array,
    *,
    mask_fn: Callable | None = None,
    q_meta: Sequence[jax.Array] = (),
    k_meta: Sequence[jax.Array] = (),
    block_map: jax.Array | None = None,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    interpret: bool = False,
    **knobs,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """This key block's share ``(dq, dk, dv)`` of the attention gradient (ring attention).

    ``out [B, Sq, H, Dh]`` and ``lse float32 [B, H, Sq]`` (natural log) are the *global* output and
    log-sum-exp merged over every key block, ``dout`` the output cotangent: ``delta =
    rowsum(dout * out)`` and probabilities are recomputed as ``exp(s - lse)``, so summing ``dq`` over
    the key blocks (and taking each block's ``dk``/``dv``) gives the full gradient. Rows with
    ``lse = -inf`` get zero gradients. Returns arrays in the dtypes of ``q``, ``k``, ``v``.
    """
    b, sq, h, _ = q.shape
    if out.shape != q.shape or dout.shape != q.shape or lse.shape != (b, h, sq):
        raise ValueError(f"out {out.shape} / dout {dout.shape} must match q {q.shape}; lse {lse.shape} must be {(b, h, sq)}")
    kwargs = dict(mask_fn=mask_fn, scale=scale, block_q=block_q, block_k=block_k, interpret=interpret, **knobs)
    step = _batch_step(q, k, block_q, block_k)
    if step is not None:
        return _in_batch_slices(flash_attention_gpu_bwd, step, (q, k, v, out, lse, dout), q_meta, k_meta, block_map, **kwargs)
    p = _prepare(q, k, v, q_meta=q_meta, k_meta=k_meta, block_map=block_map, **_with_bwd_tiles(kwargs))
    sq, sk, d, sqp, _, dp = p.dims
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse.astype(jnp.float32) * LOG2E)  # natural -> base 2, +inf: no key
    lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, sqp - sq)), constant_values=jnp.inf)
    pad = lambda x: jnp.pad(x.astype(q.dtype), ((0, 0), (0, sqp - sq), (0, 0), (0, dp - d)))
    res = (p.q, p.k, p.v, p.q_meta, p.k_meta, p.fwd_lists, p.dq_lists, p.dkv_lists, pad(out), lse2)
    dq, dk, dv = _backward(p.cfg, res, pad(dout))
    return dq[:, :sq, :, :d], dk[:, :sk, :, :d], dv[:, :sk, :, :d]


def _with_bwd_tiles(kwargs: dict) -> dict:
    """Fills the backward-tile options ``_prepare`` needs when a caller passed none."""
    return {"block_q_bwd": None, "block_k_bwd": None, **kwargs}
