"""Block-sparse flash attention for TPUs (Pallas, Mosaic lowering), forward and backward.

Same contract as the GPU kernel (:mod:`mmdit_kernels.flash_gpu`): ``q: [B, Sq, H, Dh]``,
``k, v: [B, Sk, H, Dh]`` (bf16 or f32; matmuls accumulate in f32), a mask predicate over per-token
metadata (:mod:`mmdit_kernels.metadata`) and a block map (:mod:`mmdit_kernels.block_map`) that may be
*traced* -- computed per sample inside ``jit`` -- because its visit lists reach the kernels as
**scalar-prefetch** operands (``pltpu.PrefetchScalarGridSpec``), read by the ``index_map``s.

Grid ``(batch, heads, q_blocks, kv_visits)`` for the forward and the dq kernel, ``(batch, heads,
kv_blocks, q_visits)`` for the dk/dv kernel; the last axis is sequential ("arbitrary") and walks the
row's visit list (:func:`mmdit_kernels.block_map.compact`): FULL tiles first, with no mask arithmetic
at all, then PARTIAL tiles, where the predicate is evaluated on the metadata tiles. Its extent is the
number of key (query) blocks; a row with fewer visits repeats its last block index (so the pipeline
fetches nothing new) and skips the compute with ``pl.when``: EMPTY tiles cost neither DMA nor FLOPs,
only a grid step (the extent must be static while the maps are traced; a kernel that loops over the
traced visit count with manual K/V DMA would drop those idle steps too). Online softmax with f32 ``m``/``l``/accumulator scratch in VMEM; backward is
FlashAttention-2's split (``delta = rowsum(dO * O)`` in XLA, a dq kernel over key tiles and a dk/dv
kernel over query tiles), both recomputing probabilities from the saved log-sum-exp.

TPU layout rules (a block's last two dims must be multiples of ``(8, 128)`` or whole):

* tiles are multiples of 128 on both sequence axes; sequences are padded to a tile multiple (padded
  keys are masked by position on PARTIAL tiles, :func:`~mmdit_kernels.block_map.clip_to_lengths`
  makes the straddling tile PARTIAL) and head dims are zero-padded to a multiple of 128;
* ``q, k, v`` are transposed to ``[B, H, S, Dh]`` so a tile is ``(block, Dh)``;
* metadata fields travel as 32-bit values (:func:`mmdit_kernels.metadata.encode`) in two layouts,
  the idea Splash uses for its segment ids: the side whose tokens run along sublanes (rows of the
  score tile) as ``[Bm, S, 128]`` (each token's value repeated over the 128 lanes, tiled in-kernel
  to the tile width) and the side along lanes as ``[Bm, 8, S]`` (repeated over 8 sublanes, one row
  read, broadcast over the tile's rows). Every field reaches ``mask_fn`` as a whole tile, booleans
  restored only then. The forward and dq kernels compute ``s = q k^T`` (``[bq, bk]``); the dk/dv
  kernel computes ``s^T = k q^T`` (``[bk, bq]``) so every matmul is NN or NT, and evaluates the
  predicate on transposed tiles: ``mask_fn`` must be elementwise, which every mmdit rule is;
* ``m``/``l`` scratch and the forward's log-sum-exp output are ``[bq, 128]`` (lane-replicated).

Numerics: scores in f32 (f32 inputs at ``Precision.HIGHEST``), natural-log log-sum-exp, ``-inf``
for masked scores; a row with no attended key outputs 0 and its log-sum-exp is ``-inf`` (the
backward turns that into ``+inf`` so ``exp(s - lse)`` is 0, never NaN, and its gradients are 0).

Entry points: :func:`flash_attention_tpu` (differentiable, ``custom_vjp``) and, for ring attention,
:func:`flash_attention_tpu_fwd_lse` / :func:`flash_attention_tpu_bwd` (one key block's ``(out,
lse)`` and its gradient share given the merged ``out``/``lse``). ``interpret=True`` runs the kernels
in the Pallas TPU interpreter with out-of-bounds reads raising and uninitialised memory set to NaN
(``pltpu.InterpretParams``), on any backend.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mmdit_kernels import block_map as bm
from mmdit_kernels import metadata as md
from mmdit_kernels.vma import out_struct

LANES, SUBLANES = 128, 8
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


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
    block_q: int
    block_k: int
    interpret: bool


def _interpret(cfg: _Config):
    # The TPU interpreter: out-of-bounds reads raise, uninitialised VMEM/outputs read as NaN.
    return pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan") if cfg.interpret else False


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _sel(n: int):
    """Batch index for an operand whose batch is ``n`` (1 = broadcast over the batch)."""
    return (lambda b: b) if n > 1 else (lambda b: 0)


# ----------------------------------------------------------------------------------------------
# Visit lists (scalar prefetch): flat int32 ``idx [Bl * R * C]`` and ``cnt [Bl * R * 2]`` (flat, so
# SMEM holds them without 2-D padding). Row ``r`` of batch ``b`` visits ``idx[(b*R + r)*C + j]`` for
# ``j < cnt[2*(b*R + r) + 1]``, FULL tiles for ``j < cnt[2*(b*R + r)]``. SMEM is small (1 MiB on
# v4 and later): lists larger than SMEM_LIST_BYTES are split into groups of grid rows, one
# pallas_call per group (``offset`` = the group's first row).

SMEM_LIST_BYTES = 256 * 1024


@dataclasses.dataclass(frozen=True)
class _Lists:
    batch: int  # Bl: 1 (shared map) or B
    rows: int  # R (of this call)
    cols: int  # C
    offset: int = 0  # global index of this call's first row

    def row(self, b, r):
        return _sel(self.batch)(b) * self.rows + r

    def counts(self, cnt_ref, b, r):
        row = self.row(b, r)
        return cnt_ref[2 * row], cnt_ref[2 * row + 1]

    def block(self, idx_ref, cnt_ref, b, r, j):
        """The block visited at step ``j``; past the end of the list, the last one visited (block
        index unchanged -> no new DMA)."""
        row = self.row(b, r)
        last = jnp.maximum(cnt_ref[2 * row + 1] - 1, 0)
        return idx_ref[row * self.cols + jnp.minimum(j, last)]


def _visit_lists(bmap):
    """``(_Lists, (idx [Bl, R, C], cnt [Bl, R, 2]))`` of a map (:func:`~mmdit_kernels.block_map.compact`)."""
    lists = _Lists(batch=int(bmap.shape[0]), rows=int(bmap.shape[1]), cols=int(bmap.shape[2]))
    return lists, bm.compact(bmap)


def _row_groups(lists: _Lists, arrays):
    """``[(_Lists, (flat idx, flat cnt))]``: the grid rows in groups whose lists fit SMEM_LIST_BYTES."""
    idx, cnt = arrays
    step = max(1, min(lists.rows, SMEM_LIST_BYTES // (4 * lists.batch * (lists.cols + 2))))
    groups = []
    for r0 in range(0, lists.rows, step):
        r1 = min(lists.rows, r0 + step)
        sub = dataclasses.replace(lists, rows=r1 - r0, offset=r0)
        groups.append((sub, (idx[:, r0:r1].reshape(-1), cnt[:, r0:r1].reshape(-1))))
    return groups


# ----------------------------------------------------------------------------------------------
# Metadata layouts.


def _sublane_major(fields, length):
    """``[Bm, S]`` -> ``[Bm, S, 128]``: the side whose tokens run along the tile's rows."""
    return tuple(jnp.broadcast_to(f[:, :, None], (f.shape[0], length, LANES)) for f in fields)


def _lane_major(fields, length):
    """``[Bm, S]`` -> ``[Bm, 8, S]``: the side whose tokens run along the tile's columns."""
    return tuple(jnp.broadcast_to(f[:, None, :], (f.shape[0], SUBLANES, length)) for f in fields)


def _rows_of(refs, flags, width):
    """Sublane-major field tiles ``[b, 128]`` -> ``[b, width]`` values (lane-tiled)."""
    return md.decode(tuple(jnp.tile(r[...], (1, width // LANES)) for r in refs), flags)


def _cols_of(refs, flags, shape):
    """Lane-major field tiles ``[8, b]`` -> values broadcast over the tile's rows to ``shape``
    (before restoring booleans, so every boolean op in the predicate is on full tiles)."""
    return md.decode(tuple(jnp.broadcast_to(r[:1, :], shape) for r in refs), flags)


def _predicate(cfg: _Config, qf, kf, shape):
    if cfg.mask_fn is None:
        return None
    return jnp.broadcast_to(jnp.asarray(cfg.mask_fn(qf, kf)).astype(jnp.bool_), shape)


def _and(a, b):
    return b if a is None else (a if b is None else a & b)


# ----------------------------------------------------------------------------------------------
# Kernels.


def _fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, *refs, cfg: _Config, lists: _Lists):
    nqf, nkf = len(cfg.q_flags), len(cfg.k_flags)
    qm_refs, km_refs = refs[:nqf], refs[nqf : nqf + nkf]
    o_ref, lse_ref, m_scr, l_scr, acc_scr = refs[nqf + nkf :]
    bq, bk = cfg.block_q, cfg.block_k
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    n_full, n_any = lists.counts(cnt_ref, b, i)
    d = acc_scr.shape[-1]

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def step(masked: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = lax.dot_general(q, k, NT, precision=_precision(q.dtype), preferred_element_type=jnp.float32) * cfg.scale
        if masked:
            qf, kf = _rows_of(qm_refs, cfg.q_flags, bk), _cols_of(km_refs, cfg.k_flags, (bq, bk))
            mask = _predicate(cfg, qf, kf, (bq, bk))
            if cfg.seq_k % bk:
                start = lists.block(idx_ref, cnt_ref, b, i, j) * bk
                mask = _and(mask, start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1) < cfg.seq_k)
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
        m_prev, l_prev = m_scr[...], l_scr[...]  # [bq, 128], equal across lanes
        m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
        # A row with nothing attended so far keeps m = -inf: subtract 0 there to avoid inf - inf.
        m_use = jnp.where(m_next == -jnp.inf, 0.0, m_next) if masked else m_next
        alpha = jnp.exp(m_prev - m_use)
        p = jnp.exp(s - jnp.tile(m_use, (1, bk // LANES)))
        l_scr[...] = alpha * l_prev + lax.broadcast_in_dim(p.sum(axis=-1), l_prev.shape, (0,))
        m_scr[...] = m_next
        pv = lax.dot_general(p.astype(v.dtype), v, NN, precision=_precision(v.dtype), preferred_element_type=jnp.float32)
        acc_scr[...] = jnp.tile(alpha, (1, d // LANES)) * acc_scr[...] + pv

    pl.when(j < n_full)(functools.partial(step, False))
    pl.when((j >= n_full) & (j < n_any))(functools.partial(step, True))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_scr[...]
        empty = l == 0.0
        safe = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_scr[...] * jnp.tile(1.0 / safe, (1, d // LANES))).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_scr[...] + jnp.log(safe))


def _dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config, lists: _Lists):
    nqf, nkf = len(cfg.q_flags), len(cfg.k_flags)
    qm_refs, km_refs = refs[:nqf], refs[nqf : nqf + nkf]
    dq_ref, dq_scr = refs[nqf + nkf :]
    bq, bk = cfg.block_q, cfg.block_k
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    n_full, n_any = lists.counts(cnt_ref, b, i)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def step(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        prec = _precision(q.dtype)
        s = lax.dot_general(q, k, NT, precision=prec, preferred_element_type=jnp.float32) * cfg.scale
        if masked:
            qf, kf = _rows_of(qm_refs, cfg.q_flags, bk), _cols_of(km_refs, cfg.k_flags, (bq, bk))
            mask = _predicate(cfg, qf, kf, (bq, bk))
            if cfg.seq_k % bk:
                start = lists.block(idx_ref, cnt_ref, b, i, j) * bk
                mask = _and(mask, start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1) < cfg.seq_k)
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
        lse = jnp.expand_dims(lse_ref[0], -1)  # [bq, 1]; +inf on rows with no key -> p = 0
        delta = jnp.expand_dims(delta_ref[0], -1)
        p = jnp.exp(s - lse)
        dp = lax.dot_general(do, v, NT, precision=prec, preferred_element_type=jnp.float32)
        ds = p * (dp - delta)
        dq_scr[...] += lax.dot_general(ds.astype(k.dtype), k, NN, precision=prec, preferred_element_type=jnp.float32)

    pl.when(j < n_full)(functools.partial(step, False))
    pl.when((j >= n_full) & (j < n_any))(functools.partial(step, True))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config, lists: _Lists):
    nqf, nkf = len(cfg.q_flags), len(cfg.k_flags)
    qm_refs, km_refs = refs[:nqf], refs[nqf : nqf + nkf]
    dk_ref, dv_ref, dk_scr, dv_scr = refs[nqf + nkf :]
    bq, bk = cfg.block_q, cfg.block_k
    b, kb, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    n_full, n_any = lists.counts(cnt_ref, b, kb)

    @pl.when(j == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def step(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        prec = _precision(q.dtype)
        st = lax.dot_general(k, q, NT, precision=prec, preferred_element_type=jnp.float32) * cfg.scale  # [bk, bq]
        if masked:
            # Transposed tile: q fields along lanes, k fields along sublanes, both [bk, bq].
            qf, kf = _cols_of(qm_refs, cfg.q_flags, (bk, bq)), _rows_of(km_refs, cfg.k_flags, bq)
            mask = _predicate(cfg, qf, kf, (bk, bq))
            if cfg.seq_k % bk:
                k_start = (kb + lists.offset) * bk
                mask = _and(mask, k_start + lax.broadcasted_iota(jnp.int32, (bk, bq), 0) < cfg.seq_k)
            if mask is not None:
                st = jnp.where(mask, st, -jnp.inf)
        lse, delta = lse_ref[:1, :], delta_ref[:1, :]  # [1, bq]
        pt = jnp.exp(st - lse)
        dv_scr[...] += lax.dot_general(pt.astype(do.dtype), do, NN, precision=prec, preferred_element_type=jnp.float32)
        dpt = lax.dot_general(v, do, NT, precision=prec, preferred_element_type=jnp.float32)
        dst = pt * (dpt - delta)
        dk_scr[...] += lax.dot_general(dst.astype(q.dtype), q, NN, precision=prec, preferred_element_type=jnp.float32)

    pl.when(j < n_full)(functools.partial(step, False))
    pl.when((j >= n_full) & (j < n_any))(functools.partial(step, True))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers. Operands are padded: q/k/v ``[B, H, S_pad, D_pad]``, metadata ``[Bm, S_pad]``.


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _q_side_specs(cfg: _Config, lists: _Lists, d: int):
    """BlockSpecs of a grid over q tiles (forward, dq): own q-side tiles at row ``i + offset``, key
    tiles at the visited block. Returns (q tile, kv tile, out tile, row vector, metadata specs)."""
    bq, bk, off = cfg.block_q, cfg.block_k, lists.offset
    kv_block = lambda b_, i, j, ir, cr: lists.block(ir, cr, b_, i, j)
    q_tile = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j, *_: (b_, h_, i + off, 0))
    out_tile = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j, *_: (b_, h_, i, 0))
    kv_tile = pl.BlockSpec((None, None, bk, d), lambda b_, h_, i, j, ir, cr: (b_, h_, kv_block(b_, i, j, ir, cr), 0))
    row = pl.BlockSpec((None, None, 1, bq), lambda b_, h_, i, j, *_: (b_, h_, 0, i + off))
    meta = [pl.BlockSpec((None, bq, LANES), lambda b_, h_, i, j, *_, s=_sel(n): (s(b_), i + off, 0)) for n in cfg.bm_q]
    meta += [
        pl.BlockSpec((None, SUBLANES, bk), lambda b_, h_, i, j, ir, cr, s=_sel(n): (s(b_), 0, kv_block(b_, i, j, ir, cr)))
        for n in cfg.bm_k
    ]
    return q_tile, kv_tile, out_tile, row, meta


def _forward(cfg: _Config, q, k, v, q_meta, k_meta, fwd_lists):
    """``(o [B, H, Sq_pad, D_pad], lse f32 [B, H, Sq_pad])`` (natural log, -inf: no attended key)."""
    b, h, sqp, d = q.shape
    skp = k.shape[2]
    bq = cfg.block_q
    meta = (*_sublane_major(q_meta, sqp), *_lane_major(k_meta, skp))
    outs = []
    for lists, (idx, cnt) in _row_groups(*fwd_lists):
        q_tile, kv_tile, out_tile, _, meta_specs = _q_side_specs(cfg, lists, d)
        operands = (idx, cnt, q, k, v, *meta)
        rows = lists.rows * bq
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, h, lists.rows, lists.cols),
            in_specs=[q_tile, kv_tile, kv_tile] + meta_specs,
            out_specs=[out_tile, pl.BlockSpec((None, None, bq, LANES), lambda b_, h_, i, j, *_: (b_, h_, i, 0))],
            scratch_shapes=[
                pltpu.VMEM((bq, LANES), jnp.float32),
                pltpu.VMEM((bq, LANES), jnp.float32),
                pltpu.VMEM((bq, d), jnp.float32),
            ],
        )
        outs.append(
            pl.pallas_call(
                functools.partial(_fwd_kernel, cfg=cfg, lists=lists),
                grid_spec=grid_spec,
                out_shape=[
                    out_struct((b, h, rows, d), q.dtype, operands),
                    out_struct((b, h, rows, LANES), jnp.float32, operands),
                ],
                compiler_params=_params(),
                interpret=_interpret(cfg),
                name="mmdit_flash_tpu_fwd",
            )(*operands)
        )
    o = jnp.concatenate([o for o, _ in outs], axis=2) if len(outs) > 1 else outs[0][0]
    lse = jnp.concatenate([lse for _, lse in outs], axis=2) if len(outs) > 1 else outs[0][1]
    return o, lse[..., 0]


def _backward(cfg: _Config, q, k, v, q_meta, k_meta, fwd_lists, dkv_lists, o, lse, do):
    """``(dq, dk, dv)`` given the (global) output ``o`` and natural-log ``lse [B, H, Sq_pad]``."""
    b, h, sqp, d = q.shape
    skp = k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # rows with no key: p = exp(s - inf) = 0
    delta = jnp.einsum("bhqd,bhqd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))

    # dq: grid over q tiles, walking each row's key visits (the forward lists).
    meta = (*_sublane_major(q_meta, sqp), *_lane_major(k_meta, skp))
    dqs = []
    for lists, (idx, cnt) in _row_groups(*fwd_lists):
        q_tile, kv_tile, out_tile, row, meta_specs = _q_side_specs(cfg, lists, d)
        operands = (idx, cnt, q, k, v, do, lse[:, :, None], delta[:, :, None], *meta)
        dqs.append(
            pl.pallas_call(
                functools.partial(_dq_kernel, cfg=cfg, lists=lists),
                grid_spec=pltpu.PrefetchScalarGridSpec(
                    num_scalar_prefetch=2,
                    grid=(b, h, lists.rows, lists.cols),
                    in_specs=[q_tile, kv_tile, kv_tile, q_tile, row, row] + meta_specs,
                    out_specs=out_tile,
                    scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
                ),
                out_shape=out_struct((b, h, lists.rows * bq, d), q.dtype, operands),
                compiler_params=_params(),
                interpret=_interpret(cfg),
                name="mmdit_flash_tpu_bwd_dq",
            )(*operands)
        )

    # dk, dv: grid over key tiles, walking each column's query visits (the transposed map's lists).
    rows8 = lambda x: jnp.broadcast_to(x[:, :, None, :], (b, h, SUBLANES, sqp))
    meta = (*_lane_major(q_meta, sqp), *_sublane_major(k_meta, skp))
    dks, dvs = [], []
    for lists, (idx, cnt) in _row_groups(*dkv_lists):
        off = lists.offset
        q_block = lambda b_, kb, j, ir, cr, lists=lists: lists.block(ir, cr, b_, kb, j)
        k_tile = pl.BlockSpec((None, None, bk, d), lambda b_, h_, kb, j, *_, off=off: (b_, h_, kb + off, 0))
        out_tile = pl.BlockSpec((None, None, bk, d), lambda b_, h_, kb, j, *_: (b_, h_, kb, 0))
        q_tile = pl.BlockSpec((None, None, bq, d), lambda b_, h_, kb, j, ir, cr, f=q_block: (b_, h_, f(b_, kb, j, ir, cr), 0))
        row = pl.BlockSpec((None, None, SUBLANES, bq), lambda b_, h_, kb, j, ir, cr, f=q_block: (b_, h_, 0, f(b_, kb, j, ir, cr)))
        meta_specs = [
            pl.BlockSpec(
                (None, SUBLANES, bq), lambda b_, h_, kb, j, ir, cr, s=_sel(n), f=q_block: (s(b_), 0, f(b_, kb, j, ir, cr))
            )
            for n in cfg.bm_q
        ]
        meta_specs += [
            pl.BlockSpec((None, bk, LANES), lambda b_, h_, kb, j, *_, s=_sel(n), off=off: (s(b_), kb + off, 0)) for n in cfg.bm_k
        ]
        operands = (idx, cnt, q, k, v, do, rows8(lse), rows8(delta), *meta)
        shape = (b, h, lists.rows * bk, d)
        dk, dv = pl.pallas_call(
            functools.partial(_dkv_kernel, cfg=cfg, lists=lists),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2,
                grid=(b, h, lists.rows, lists.cols),
                in_specs=[q_tile, k_tile, k_tile, q_tile, row, row] + meta_specs,
                out_specs=[out_tile, out_tile],
                scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
            ),
            out_shape=[out_struct(shape, k.dtype, operands), out_struct(shape, v.dtype, operands)],
            compiler_params=_params(),
            interpret=_interpret(cfg),
            name="mmdit_flash_tpu_bwd_dkv",
        )(*operands)
        dks.append(dk)
        dvs.append(dv)
    cat = lambda xs: jnp.concatenate(xs, axis=2) if len(xs) > 1 else xs[0]
    return cat(dqs), cat(dks), cat(dvs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6, 7))
def _flash(cfg, q, k, v, q_meta, k_meta, fwd_lists, dkv_lists, fwd_idx, dkv_idx):
    return _forward(cfg, q, k, v, q_meta, k_meta, (fwd_lists, fwd_idx))[0]


def _flash_fwd(cfg, q, k, v, q_meta, k_meta, fwd_lists, dkv_lists, fwd_idx, dkv_idx):
    o, lse = _forward(cfg, q, k, v, q_meta, k_meta, (fwd_lists, fwd_idx))
    return o, (q, k, v, q_meta, k_meta, fwd_idx, dkv_idx, o, lse)


def _flash_bwd(cfg, fwd_lists, dkv_lists, res, do):
    q, k, v, q_meta, k_meta, fwd_idx, dkv_idx, o, lse = res
    dq, dk, dv = _backward(cfg, q, k, v, q_meta, k_meta, (fwd_lists, fwd_idx), (dkv_lists, dkv_idx), o, lse, do)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# Public entry points.


@dataclasses.dataclass(frozen=True)
class _Prepared:
    cfg: _Config
    q: jax.Array  # [B, H, Sq_pad, D_pad]
    k: jax.Array
    v: jax.Array
    q_meta: tuple  # encoded [Bm, Sq_pad]
    k_meta: tuple
    fwd_lists: tuple  # (_Lists, (idx, cnt))
    dkv_lists: tuple
    dims: tuple  # (Sq, Sk, Dh, Sq_pad, Sk_pad, D_pad)


def _heads_major(x, length, d):
    """``[B, S, H, Dh]`` -> ``[B, H, length, d]`` zero-padded."""
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, d - x.shape[3]))).transpose(0, 2, 1, 3)


def _prepare(q, k, v, mask_fn, q_meta, k_meta, block_map, scale, block_q, block_k, interpret) -> _Prepared:
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, Sq, H, Dh] and k, v [B, Sk, H, Dh]; got {q.shape}, {k.shape}, {v.shape}")
    b, sq, h, d = q.shape
    sk = k.shape[1]
    if k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch, heads or head dim")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        if val < LANES or val % LANES:
            raise ValueError(f"{name}={val}: the TPU kernel's tiles must be multiples of {LANES} (the lane width)")
    scale = d**-0.5 if scale is None else float(scale)
    q_meta = md.check(q_meta, b, sq, "q_meta")
    k_meta = md.check(k_meta, b, sk, "k_meta")
    nq, nk = bm.cdiv(sq, block_q), bm.cdiv(sk, block_k)
    sqp, skp, dp = nq * block_q, nk * block_k, bm.cdiv(d, LANES) * LANES
    if block_map is None:
        block_map = bm.block_map_from_mask_fn(mask_fn, q_meta, k_meta, sq, sk, block_q, block_k)
    elif block_map.ndim != 3 or block_map.shape[1:] != (nq, nk) or block_map.shape[0] not in (1, b):
        raise ValueError(
            f"block_map has shape {block_map.shape}; expected [{b} or 1, {nq}, {nk}] for "
            f"Sq={sq}, Sk={sk}, block_q={block_q}, block_k={block_k}"
        )
    fwd_map = bm.clip_to_lengths(block_map, sq, sk, block_q, block_k)
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
        interpret=bool(interpret),
    )
    return _Prepared(
        cfg=cfg,
        q=_heads_major(q, sqp, dp),
        k=_heads_major(k, skp, dp),
        v=_heads_major(v, skp, dp),
        q_meta=md.pad(md.encode(q_meta), sqp),
        k_meta=md.pad(md.encode(k_meta), skp),
        fwd_lists=_visit_lists(fwd_map),
        dkv_lists=_visit_lists(jnp.swapaxes(fwd_map, -1, -2)),
        dims=(sq, sk, d, sqp, skp, dp),
    )


def _tokens_major(x, length, d):
    """``[B, H, S_pad, D_pad]`` -> ``[B, length, H, d]``."""
    return x[:, :, :length, :d].transpose(0, 2, 1, 3)


def flash_attention_tpu(
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
) -> jax.Array:
    """Block-sparse attention ``[B, Sq, H, Dh]`` on TPU (differentiable in ``q``, ``k``, ``v``).

    ``mask_fn(q_fields, k_fields) -> bool`` is evaluated in-kernel on PARTIAL tiles on fields taken
    from ``q_meta``/``k_meta`` (tuples of ``[B | 1, S]`` arrays, may be traced); it must fold in key
    validity and be elementwise. ``block_map`` (``int8 [B | 1, ceil(Sq/block_q), ceil(Sk/block_k)]``,
    EMPTY/PARTIAL/FULL; may be traced) defaults to one computed from ``mask_fn``; a FULL tile promises
    ``mask_fn`` holds on every (valid query, valid key) pair in it. ``block_q``/``block_k``: multiples
    of 128. Rows with no attended key output 0 and get zero gradients.
    """
    p = _prepare(q, k, v, mask_fn, q_meta, k_meta, block_map, scale, block_q, block_k, interpret)
    sq, _, d = p.dims[:3]
    (fl, fi), (dl, di) = p.fwd_lists, p.dkv_lists
    out = _flash(p.cfg, p.q, p.k, p.v, p.q_meta, p.k_meta, fl, dl, fi, di)
    return _tokens_major(out, sq, d)


def flash_attention_tpu_fwd_lse(
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
) -> tuple[jax.Array, jax.Array]:
    """``(out [B, Sq, H, Dh] in q.dtype, lse float32 [B, H, Sq])`` for one key block (ring attention).

    ``lse`` is the natural-log log-sum-exp of the row's scaled scores over the attended keys; rows with
    no attended key give ``out = 0`` and ``lse = -inf``. Not differentiable (ring attention wraps it
    in its own ``custom_vjp`` and calls :func:`flash_attention_tpu_bwd`). Arguments as
    :func:`flash_attention_tpu`.
    """
    p = _prepare(q, k, v, mask_fn, q_meta, k_meta, block_map, scale, block_q, block_k, interpret)
    sq, _, d = p.dims[:3]
    o, lse = _forward(p.cfg, p.q, p.k, p.v, p.q_meta, p.k_meta, p.fwd_lists)
    return _tokens_major(o, sq, d), lse[:, :, :sq]


def flash_attention_tpu_bwd(
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
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """This key block's share ``(dq, dk, dv)`` of the attention gradient (ring attention).

    ``out [B, Sq, H, Dh]`` and ``lse float32 [B, H, Sq]`` are the *global* (merged over every key
    block) output and log-sum-exp, ``dout`` the output cotangent: ``delta = rowsum(dout * out)`` and
    probabilities are recomputed as ``exp(s - lse)``, so summing ``dq`` over the key blocks (and taking
    each block's ``dk``/``dv``) gives the full gradient. Rows with ``lse = -inf`` get zero gradients.
    Returns arrays in the dtypes of ``q``, ``k``, ``v``.
    """
    p = _prepare(q, k, v, mask_fn, q_meta, k_meta, block_map, scale, block_q, block_k, interpret)
    sq, sk, d, sqp, _, dp = p.dims
    b, h = q.shape[0], q.shape[2]
    if out.shape != q.shape or dout.shape != q.shape or lse.shape != (b, h, sq):
        raise ValueError(f"out {out.shape} / dout {dout.shape} must match q {q.shape}; lse {lse.shape} must be {(b, h, sq)}")
    lse = jnp.pad(lse.astype(jnp.float32), ((0, 0), (0, 0), (0, sqp - sq)), constant_values=-jnp.inf)
    dq, dk, dv = _backward(
        p.cfg,
        p.q,
        p.k,
        p.v,
        p.q_meta,
        p.k_meta,
        p.fwd_lists,
        p.dkv_lists,
        _heads_major(out.astype(q.dtype), sqp, dp),
        lse,
        _heads_major(dout.astype(q.dtype), sqp, dp),
    )
    return _tokens_major(dq, sq, d), _tokens_major(dk, sk, d), _tokens_major(dv, sk, d)
