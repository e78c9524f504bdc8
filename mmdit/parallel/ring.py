"""Ring attention: each device keeps its query block while key/value blocks travel round the ring.

Per device (``P`` = size of the sequence axis, ``sq = Sq/P``, ``sk = Sk/P``)::

    forward:  for t in 0..P-1:  block (q_i, k_(i-t)) → scores [b, h, sq, sk] under
              mask.predicate(q meta_i, k meta_(i-t)) (f32), merged by online softmax
              (running max m, sum l, output o); then k, v, k-meta move one step (ppermute)
    backward: a second ring pass recomputes each block's probabilities from the saved q-side
              log-sum-exp, accumulates dq locally, and sends dk/dv accumulators round with k/v,
              so after P hops they are home on the devices that own those keys.

Forward and backward are tied with ``jax.custom_vjp`` (differentiating through the online softmax
would store every block; and the LSE of ``jax.nn.dot_product_attention`` carries no gradient,
docs/design.md, pitfalls). Blocks whose mask is empty (``chunk_causal``, ``local``) skip their matmuls. Rows with
no attended key output 0 and get zero gradients (their LSE is +inf, so recomputed probabilities are
0). No head-count constraint; sequences not divisible by ``P`` are padded with invalid tokens
(:mod:`mmdit.parallel.sequence_split`). ``opts.impl`` is not used: the block step is the dense f32
reference (a kernel returning (out, lse) per block would replace the block step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmdit.attention.masks import MaskSpec, TokenMeta, dense_mask
from mmdit.attention.registry import AttentionOptions
from mmdit.parallel import sequence_split as ss

_F32 = jnp.float32


def _varying(x, vma):
    """Marks a constant-initialised scan carry as varying over the manual axes (docs/design.md, pitfalls)."""
    return jax.lax.pcast(x, tuple(sorted(vma)), to="varying") if vma else x


def _vma(*trees) -> set:
    """Manual mesh axes any leaf of ``trees`` varies over (empty outside ``shard_map``)."""
    out = set()
    for x in jax.tree.leaves(trees):
        aval = jax.typeof(x)
        mat = getattr(aval, "manual_axis_type", None)  # jax 0.10: ManualAxisType(varying=...)
        out |= set(mat.varying if mat is not None else getattr(aval, "vma", ()) or ())
    return out


def _make_ring(pred, scale: float, axis: str, p: int):
    """The per-device ring attention ``(q, k, v, q_meta, k_meta) -> out`` with its custom VJP.

    Local shapes: q ``[b, sq, h, d]``, k/v ``[b, sk, h, d]``, metadata fields ``[1|b, sq|sk]``.
    """
    perm = [(i, (i + 1) % p) for i in range(p)]
    shift = lambda tree: jax.tree.map(lambda x: jax.lax.ppermute(x, axis, perm), tree)

    def _block_mask(qm, km):
        return dense_mask(pred, TokenMeta(*qm), TokenMeta(*km))[:, None]  # [1|b, 1, sq, sk]

    def _block_scores(q, k):
        return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=_F32) * scale  # [b,h,sq,sk]

    def forward(q, k, v, qm, km):
        b, sq, h, d = q.shape
        vma = _vma(q, k, v, qm, km)
        o = _varying(jnp.zeros((b, h, sq, d), _F32), vma)
        m = _varying(jnp.full((b, h, sq), -jnp.inf, _F32), vma)
        l = _varying(jnp.zeros((b, h, sq), _F32), vma)

        def step(state, kv):
            k, v, km = kv

            msk = _block_mask(qm, km)

            def compute(state):
                o, m, l = state
                s = jnp.where(msk, _block_scores(q, k), -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                pr = jnp.where(msk, jnp.exp(s - m_safe[..., None]), 0.0)
                alpha = jnp.exp(m - m_safe)  # 0 while m is still -inf
                l = alpha * l + pr.sum(axis=-1)
                pv = jnp.einsum("bhqk,bkhd->bhqd", pr.astype(v.dtype), v, preferred_element_type=_F32)
                return alpha[..., None] * o + pv, m_new, l

            return jax.lax.cond(msk.any(), compute, lambda st: st, state)

        def ring_step(carry, _):
            state, kv = carry
            return (step(state, kv), shift(kv)), None

        (state, kv), _ = jax.lax.scan(ring_step, ((o, m, l), (k, v, km)), None, length=p - 1)
        o, m, l = step(state, kv)
        empty = l == 0
        out = (o / jnp.where(empty, 1.0, l)[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)
        lse = jnp.where(empty, jnp.inf, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(empty, 1.0, l)))
        return out, lse

    def backward(q, k, v, qm, km, out, lse, do):
        vma = _vma(q, k, v, qm, km, do)
        do32 = do.astype(_F32)
        delta = jnp.einsum("bqhd,bqhd->bhq", do32, out.astype(_F32))
        dq = _varying(jnp.zeros(q.shape, _F32), vma)
        dk = _varying(jnp.zeros(k.shape, _F32), vma)
        dv = _varying(jnp.zeros(v.shape, _F32), vma)

        def step(dq, kv, acc):
            k, v, km = kv

            msk = _block_mask(qm, km)

            def compute(args):
                dq, (dk, dv) = args
                pr = jnp.where(msk, jnp.exp(_block_scores(q, k) - lse[..., None]), 0.0)  # [b, h, sq, sk]
                dv = dv + jnp.einsum("bhqk,bqhd->bkhd", pr, do32)
                dp = jnp.einsum("bqhd,bkhd->bhqk", do32, v, preferred_element_type=_F32)
                ds = pr * (dp - delta[..., None]) * scale
                dq = dq + jnp.einsum("bhqk,bkhd->bqhd", ds, k, preferred_element_type=_F32)
                dk = dk + jnp.einsum("bhqk,bqhd->bkhd", ds, q, preferred_element_type=_F32)
                return dq, (dk, dv)

            return jax.lax.cond(msk.any(), compute, lambda a: a, (dq, acc))

        def ring_step(carry, _):
            dq, kv, acc = carry
            dq, acc = step(dq, kv, acc)
            return (dq, shift(kv), shift(acc)), None

        (dq, kv, acc), _ = jax.lax.scan(ring_step, (dq, (k, v, km), (dk, dv)), None, length=p - 1)
        dq, acc = step(dq, kv, acc)
        dk, dv = shift(acc)  # the last hop brings each accumulator home
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    @jax.custom_vjp
    def ring(q, k, v, qm, km):
        return forward(q, k, v, qm, km)[0]

    def ring_fwd(q, k, v, qm, km):
        out, lse = forward(q, k, v, qm, km)
        return out, (q, k, v, qm, km, out, lse)

    def ring_bwd(res, do):
        q, k, v, qm, km, out, lse = res
        dq, dk, dv = backward(q, k, v, qm, km, out, lse, do)
        zeros = lambda tree: jax.tree.map(_zero_cotangent, tree)
        return dq, dk, dv, zeros(qm), zeros(km)

    ring.defvjp(ring_fwd, ring_bwd)
    return ring


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return None


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: MaskSpec,
    opts: AttentionOptions,
    *,
    mesh,
    axis: str = "sequence",
    batch_axes=None,
    head_axes=None,
) -> jax.Array:
    """Sequence-parallel ring attention over ``axis``.

    Args:
      q: ``[B, Sq, H, Dh]``; k, v: ``[B, Sk, H, Dh]`` (global arrays, sequence-sharded over
        ``axis`` or resharded on entry).
      mask: :class:`MaskSpec` over the whole sequences; only ``mask.predicate`` and the metadata
        are used (each device evaluates the predicate on its q block × the visiting k block).
      opts: only ``opts.scale`` is read (default ``Dh ** -0.5``).
      mesh / batch_axes / head_axes: as in :func:`~mmdit.parallel.ulysses.ulysses_attention`
        (heads need not divide the sequence axis).

    Returns ``[B, Sq, H, Dh]`` in ``q.dtype``. Differentiable (custom VJP, second ring pass).
    """
    ss.check_shapes(q, k, v, mask)
    p = ss.axis_size(mesh, axis)
    b, sq, h, dh = q.shape
    scale = float(opts.scale) if opts.scale is not None else dh**-0.5
    head_axes = ss.resolve_axes(mesh, h, head_axes, ss.DEFAULT_HEAD_AXES, exclude=axis, what="attention heads")
    batch_axes = ss.resolve_axes(mesh, b, batch_axes, ss.DEFAULT_BATCH_AXES, exclude=axis, what="batch")

    qp, q_meta = ss.pad_sequence(q, mask.q, p)
    kp, k_meta = ss.pad_sequence(k, mask.k, p)
    vp, _ = ss.pad_sequence(v, mask.k, p)
    ring = _make_ring(mask.predicate, scale, axis, p)
    spec = ss.qkv_spec(batch_axes, axis, head_axes)
    out = jax.shard_map(
        lambda ql, kl, vl, qm, km: ring(ql, kl, vl, tuple(qm), tuple(km)),
        mesh=mesh,
        in_specs=(spec, spec, spec, ss.meta_spec(q_meta, b, batch_axes, axis), ss.meta_spec(k_meta, b, batch_axes, axis)),
        out_specs=spec,
    )(qp, kp, vp, q_meta, k_meta)
    return out[:, :sq]
