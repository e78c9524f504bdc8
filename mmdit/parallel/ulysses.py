"""Ulysses (DeepSpeed) sequence parallelism for joint attention: trade the sequence split for a head
split with two all-to-alls, and run any attention implementation on the whole sequence.

::

    q, k, v  [B, S/P, H, Dh] per device ──all_to_all──▶ [B, S, H/P, Dh]
        attend(q, k, v, mask with the *full* token metadata, opts)   # any impl, any mask rule
    out      [B, S, H/P, Dh] ──all_to_all──▶ [B, S/P, H, Dh]

Because the local kernel sees every token, every mask rule and every registered implementation
works unchanged; the cost is ``H % P == 0`` (heads already sharded over ``tensor`` must split
further: ``H % (P · tensor) == 0``) and two all-to-alls of the activations per attention call. Token
metadata is tiny, so it is passed replicated over the sequence axis. Sequences not divisible by
``P`` are padded with invalid tokens and sliced back (:mod:`mmdit.parallel.sequence_split`).
"""

from __future__ import annotations

import jax

from mmdit.attention import registry as attention_registry
from mmdit.attention.masks import MaskSpec, TokenMeta
from mmdit.attention.registry import AttentionOptions
from mmdit.parallel import sequence_split as ss


def ulysses_attention(
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
    check_vma: bool = True,
) -> jax.Array:
    """Sequence-parallel attention by all-to-all over ``axis``.

    Args:
      q: ``[B, Sq, H, Dh]``; k, v: ``[B, Sk, H, Dh]`` (global arrays; laid out sequence-sharded
        over ``axis``, or resharded on entry).
      mask: the :class:`MaskSpec` over the whole sequences (``mask.q`` ``[1|B, Sq]``,
        ``mask.k`` ``[1|B, Sk]``).
      opts: attention options; ``opts.impl`` runs locally on ``[B/dp, S, H/P, Dh]``.
      mesh: the device mesh; ``axis`` its sequence axis.
      batch_axes / head_axes: mesh axes for the batch / head dims (default: data+fsdp / tensor,
        those that divide).
      check_vma: ``shard_map``'s varying-manual-axes check (turn off only for a kernel that lacks
        vma rules).

    Returns ``[B, Sq, H, Dh]`` in ``q.dtype``, sequence-sharded like the input.
    """
    ss.check_shapes(q, k, v, mask)
    p = ss.axis_size(mesh, axis)
    if p == 1:
        return attention_registry.attend(q, k, v, mask, opts)
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    if h % p:
        raise ValueError(
            f"Ulysses attention splits the heads over mesh.{axis}={p}, but there are {h} heads; "
            f"make model.num_heads a multiple of {p}, change mesh.{axis}, or use the 'ring' "
            f"sequence-parallel strategy"
        )
    head_axes = ss.resolve_axes(
        mesh,
        h,
        head_axes,
        ss.DEFAULT_HEAD_AXES,
        exclude=axis,
        what="Ulysses attention heads (split over head_axes × mesh.sequence)",
        multiple=p,
    )
    batch_axes = ss.resolve_axes(mesh, b, batch_axes, ss.DEFAULT_BATCH_AXES, exclude=axis, what="batch")

    qp, q_meta = ss.pad_sequence(q, mask.q, p)
    kp, k_meta = ss.pad_sequence(k, mask.k, p)
    vp, _ = ss.pad_sequence(v, mask.k, p)
    padded = qp.shape[1] != sq or kp.shape[1] != sk
    base = ss.padded_mask(mask, q_meta, k_meta, padded)

    def local(ql, kl, vl, qm, km):
        # [b, S/P, h, Dh] -> [b, S, h/P, Dh]: split heads across the axis, gather the sequence.
        to_heads = lambda x: jax.lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)
        out = attention_registry.attend(
            to_heads(ql), to_heads(kl), to_heads(vl), ss.padded_mask(base, TokenMeta(*qm), TokenMeta(*km), False), opts
        )
        return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)

    spec = ss.qkv_spec(batch_axes, axis, head_axes)
    out = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, spec, spec, ss.meta_spec(q_meta, b, batch_axes, None), ss.meta_spec(k_meta, b, batch_axes, None)),
        out_specs=spec,
        check_vma=check_vma,
    )(qp, kp, vp, q_meta, k_meta)
    return out[:, :sq] if padded else out
