"""Ring attention: each device keeps its query block while key/value blocks travel round the ring.

Per device (``P`` = size of the sequence axis, ``sq = Sq/P``, ``sk = Sk/P``)::

    forward:  for t in 0..P-1:  (out_t, lse_t) = fwd_lse(q_i, k_(i-t), v_(i-t), mask on their metadata)
              merged by log-sum-exp (o = o·e^(lse-lse') + out_t·e^(lse_t-lse'), lse' = logaddexp);
              then k, v, k-meta move one step (ppermute)
    backward: a second ring pass hands each block the GLOBAL merged (out, lse) and the output
              cotangent: bwd(q_i, k_(i-t), v_(i-t), mask, out, lse, dout) -> (dq, dk, dv) of that block;
              dq accumulates locally, dk/dv accumulators travel round with k/v, so after P hops they
              are home on the devices that own those keys.

The block step is the registry's blockwise pair (:func:`mmdit.attention.registry.blockwise`) of
``opts.impl`` -- the Pallas kernel (GPU or TPU) when ``model.attention.impl`` names it -- else of
``opts.fallback``, else the dense f32 ``xla`` pair. Forward and backward are tied with
``jax.custom_vjp`` (differentiating through the merge would store every block; and the LSE of
``jax.nn.dot_product_attention`` carries no gradient, docs/design.md, pitfalls). Blocks whose mask
is empty (``chunk_causal``, ``local``) skip the kernel call (``lax.cond``). Rows with no attended key
have ``lse = -inf``, output 0 and get zero gradients. No head-count constraint; sequences not
divisible by ``P`` are padded with invalid tokens (:mod:`mmdit.parallel.sequence_split`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mmdit.attention import registry as attention_registry
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


def block_pair(opts: AttentionOptions):
    """The registry's ``(fwd_lse_fn, bwd_fn)`` for ``opts.impl``, else for ``opts.fallback``, else ``xla``'s
    (:func:`mmdit.attention.registry.blockwise`), with the options to call it with."""
    for name in (opts.impl, opts.fallback, "xla"):
        if name is not None and (pair := attention_registry.blockwise(name)) is not None:
            return pair, dataclasses.replace(opts, impl=name)
    raise AssertionError("the xla blockwise pair is always registered")


def _merge(o, lse, ob, lb):
    """Log-sum-exp merge of two partial attentions: ``o, ob [b, sq, h, d]`` f32, ``lse, lb [b, h, sq]``
    (``-inf``: no key yet)."""
    new = jnp.logaddexp(lse, lb)
    safe = jnp.where(jnp.isfinite(new), new, 0.0)
    w = lambda x: jnp.where(jnp.isfinite(x), jnp.exp(x - safe), 0.0).transpose(0, 2, 1)[..., None]  # [b, sq, h, 1]
    return o * w(lse) + ob.astype(_F32) * w(lb), new


def _make_ring(mask: MaskSpec, opts: AttentionOptions, axis: str, p: int):
    """The per-device ring attention ``(q, k, v, q_meta, k_meta) -> out`` with its custom VJP.

    Local shapes: q ``[b, sq, h, d]``, k/v ``[b, sk, h, d]``, metadata fields ``[1|b, sq|sk]``.
    Each ring step runs the registry's blockwise pair (:func:`block_pair`) on (q block, visiting k block).
    """
    perm = [(i, (i + 1) % p) for i in range(p)]
    shift = lambda tree: jax.tree.map(lambda x: jax.lax.ppermute(x, axis, perm), tree)
    (fwd_lse, bwd_block), opts = block_pair(opts)

    def block_mask(qm, km) -> MaskSpec:
        return MaskSpec(mask.rule, mask.predicate, TokenMeta(*qm), TokenMeta(*km), num_groups=mask.num_groups)

    def anything(qm, km):
        """Whether any (query, key) pair of the block is attended (else the block is skipped)."""
        return dense_mask(mask.predicate, TokenMeta(*qm), TokenMeta(*km)).any()

    def forward(q, k, v, qm, km):
        b, sq, h, d = q.shape
        vma = _vma(q, k, v, qm, km)
        o = _varying(jnp.zeros((b, sq, h, d), _F32), vma)
        lse = _varying(jnp.full((b, h, sq), -jnp.inf, _F32), vma)

        def step(state, kv):
            k, v, km = kv

            def compute(state):
                ob, lb = fwd_lse(q, k, v, block_mask(qm, km), opts)
                return _merge(*state, ob, lb)

            return jax.lax.cond(anything(qm, km), compute, lambda st: st, state)

        def ring_step(carry, _):
            state, kv = carry
            return (step(state, kv), shift(kv)), None

        (state, kv), _ = jax.lax.scan(ring_step, ((o, lse), (k, v, km)), None, length=p - 1)
        o, lse = step(state, kv)
        return o.astype(q.dtype), lse

    def backward(q, k, v, qm, km, out, lse, do):
        vma = _vma(q, k, v, qm, km, do)
        dq = _varying(jnp.zeros(q.shape, _F32), vma)
        dk = _varying(jnp.zeros(k.shape, _F32), vma)
        dv = _varying(jnp.zeros(v.shape, _F32), vma)

        def step(dq, kv, acc):
            k, v, km = kv

            def compute(args):
                dq, (dk, dv) = args
                dqb, dkb, dvb = bwd_block(q, k, v, block_mask(qm, km), opts, out, lse, do)
                return dq + dqb.astype(_F32), (dk + dkb.astype(_F32), dv + dvb.astype(_F32))

            return jax.lax.cond(anything(qm, km), compute, lambda a: a, (dq, acc))

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
    check_vma: bool | None = None,
) -> jax.Array:
    """Sequence-parallel ring attention over ``axis``.

    Args:
      q: ``[B, Sq, H, Dh]``; k, v: ``[B, Sk, H, Dh]`` (global arrays, sequence-sharded over
        ``axis`` or resharded on entry).
      mask: :class:`MaskSpec` over the whole sequences; its rule, predicate, ``num_groups`` and metadata
        are used (each device masks its q block × the visiting k block).
      opts: ``opts.impl`` (then ``opts.fallback``, then ``xla``) picks the blockwise pair run per ring
        step; ``opts.scale`` defaults to ``Dh ** -0.5``; kernel options (blocks, interpret) pass through.
      mesh / batch_axes / head_axes: as in :func:`~mmdit.parallel.ulysses.ulysses_attention`
        (heads need not divide the sequence axis).
      check_vma: ``shard_map``'s varying-manual-axes check. Default: on, except for a Pallas kernel
        in interpret mode (``opts.interpret``): the interpreter evaluates the kernel body with the
        sequence-varying metadata tiles next to unvarying constants (``tile != 0``), which the check
        rejects (jax 0.10.2); compiled kernels declare their outputs' axes and run checked.

    Returns ``[B, Sq, H, Dh]`` in ``q.dtype``. Differentiable (custom VJP, second ring pass).
    """
    ss.check_shapes(q, k, v, mask)
    p = ss.axis_size(mesh, axis)
    b, sq, h, dh = q.shape
    opts = dataclasses.replace(opts, scale=float(opts.scale) if opts.scale is not None else dh**-0.5)
    head_axes = ss.resolve_axes(mesh, h, head_axes, ss.DEFAULT_HEAD_AXES, exclude=axis, what="attention heads")
    batch_axes = ss.resolve_axes(mesh, b, batch_axes, ss.DEFAULT_BATCH_AXES, exclude=axis, what="batch")

    qp, q_meta = ss.pad_sequence(q, mask.q, p)
    kp, k_meta = ss.pad_sequence(k, mask.k, p)
    vp, _ = ss.pad_sequence(v, mask.k, p)
    ring = _make_ring(mask, opts, axis, p)
    if check_vma is None:
        check_vma = not (opts.interpret and block_pair(opts)[1].impl != "xla")
    spec = ss.qkv_spec(batch_axes, axis, head_axes)
    out = jax.shard_map(
        lambda ql, kl, vl, qm, km: ring(ql, kl, vl, tuple(qm), tuple(km)),
        mesh=mesh,
        in_specs=(spec, spec, spec, ss.meta_spec(q_meta, b, batch_axes, axis), ss.meta_spec(k_meta, b, batch_axes, axis)),
        out_specs=spec,
        check_vma=check_vma,
    )(qp, kp, vp, q_meta, k_meta)
    return out[:, :sq]
