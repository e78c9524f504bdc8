"""Registers the Pallas attention kernels (``mmdit_kernels``) as ``pallas`` and ``splash``.

* ``pallas`` -- our block-sparse flash attention: the Triton kernel on GPU (any mask, traced
  metadata fine), Splash on TPU (static metadata only), the GPU kernel in the Pallas interpreter
  on CPU when ``opts.interpret`` is set.
* ``splash`` -- JAX's Splash attention on TPU (or its interpreter with ``opts.interpret``), with
  the mask evaluated on the host from concrete metadata.

Both take the mask as ``mask.kernel_mask_fn()`` over the :class:`TokenMeta` fields (booleans are
carried as int32 inside the kernels and restored before the predicate runs, so predicates written
with ``~`` on bools stay correct) and, on GPU, the block map ``mask.block_map(block_q, block_k)``
(``pallas`` is registered with ``needs_block_map`` so the model computes it once per forward).
Anything a kernel cannot do raises :class:`UnsupportedAttention` (``model.attention.fallback``
then picks another implementation).
"""

from __future__ import annotations

import jax

from mmdit.attention.masks import MaskSpec
from mmdit.attention.registry import AttentionOptions, UnsupportedAttention, register

MAX_HEAD_DIM = 256


def _check_shapes(q, k, name: str) -> None:
    if q.shape[-1] > MAX_HEAD_DIM:
        raise UnsupportedAttention(f"{name}: head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported")
    if q.shape[2] != k.shape[2]:
        raise UnsupportedAttention(f"{name}: grouped/multi-query heads ({q.shape[2]} vs {k.shape[2]}) are not supported")


def pallas_attention(q, k, v, mask: MaskSpec, opts: AttentionOptions):
    """``q: [B, Sq, H, Dh]``, ``k, v: [B, Sk, H, Dh]`` -> ``[B, Sq, H, Dh]`` via ``mmdit_kernels``."""
    import mmdit_kernels as mk

    _check_shapes(q, k, "pallas")
    for name, val in (("block_q", opts.block_q), ("block_k", opts.block_k)):
        if val < 16 or val & (val - 1):
            raise UnsupportedAttention(f"pallas: model.attention.{name}={val} must be a power of two >= 16")
    try:
        backend = mk.resolve_backend("auto", opts.interpret)
    except ValueError as e:
        raise UnsupportedAttention(f"pallas: {e}") from None
    if backend == "tpu":
        return _splash(q, k, v, mask, opts)
    # A FULL tile costs no mask arithmetic, so a `full` rule over all-valid tokens runs mask-free;
    # the predicate is still needed for padding and attention groups.
    return mk.flash_attention(
        q,
        k,
        v,
        mask_fn=mask.kernel_mask_fn(),
        q_meta=tuple(mask.q),
        k_meta=tuple(mask.k),
        block_map=mask.block_map(opts.block_q, opts.block_k),
        scale=opts.scale,
        block_q=opts.block_q,
        block_k=opts.block_k,
        backend="gpu",
        interpret=opts.interpret,
    )


def _splash(q, k, v, mask: MaskSpec, opts: AttentionOptions):
    from mmdit_kernels.flash_tpu import TracedMetadataError, flash_attention_tpu

    try:
        return flash_attention_tpu(
            q,
            k,
            v,
            mask_fn=mask.kernel_mask_fn(),
            q_meta=tuple(mask.q),
            k_meta=tuple(mask.k),
            scale=opts.scale,
            block_q=opts.block_q,
            block_k=opts.block_k,
            interpret=opts.interpret,
        )
    except TracedMetadataError as e:
        raise UnsupportedAttention(f"splash: {e}") from None


def splash_attention(q, k, v, mask: MaskSpec, opts: AttentionOptions):
    """JAX's Splash attention (TPU; CPU only through its interpreter with ``opts.interpret``)."""
    _check_shapes(q, k, "splash")
    if jax.default_backend() != "tpu" and not opts.interpret:
        raise UnsupportedAttention(
            f"splash runs on TPU only (backend is {jax.default_backend()!r}); set "
            "model.attention.interpret=True to run it in the Pallas interpreter"
        )
    return _splash(q, k, v, mask, opts)


register("pallas", pallas_attention, needs_block_map=True)
register("splash", splash_attention)
