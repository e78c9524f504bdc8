"""Registers the Pallas attention kernels (``mmdit_kernels``): ``pallas``, ``pallas_gpu``,
``pallas_tpu`` and ``splash``.

* ``pallas_gpu`` -- our block-sparse flash attention in Triton (:mod:`mmdit_kernels.flash_gpu`);
* ``pallas_tpu`` -- the same contract in Mosaic (:mod:`mmdit_kernels.flash_tpu`): visit lists as
  scalar-prefetch operands, tiles multiples of 128 (``model.attention.block_q``/``block_k``);
* ``pallas`` -- picks by backend: GPU -> ``pallas_gpu``, TPU -> ``pallas_tpu``, CPU -> ``pallas_gpu``
  in the Pallas interpreter (requires ``opts.interpret``).
  On CPU, ``pallas_gpu``/``pallas_tpu`` run their own kernel in its interpreter when
  ``opts.interpret`` is set, so tests exercise both kernels through the model.
* ``splash`` -- JAX's Splash attention on TPU (or its interpreter with ``opts.interpret``), with
  the mask evaluated on the host from concrete metadata: static masks only; traced metadata (the
  model's, inside ``jit``) raises :class:`UnsupportedAttention` naming the rule.

The ``pallas*`` entries take any mask rule, with metadata and block maps traced per sample: the mask
goes in as ``mask.kernel_mask_fn()`` over the :class:`TokenMeta` fields (booleans travel as int32
inside the kernels and are restored before the predicate runs, so predicates written with ``~`` on
bools stay correct) plus the block map ``mask.block_map(block_q, block_k)`` (registered with
``needs_block_map``, so the model computes it once per forward). Each also registers a blockwise pair
for ring attention: ``fwd_lse(q, k, v, mask, opts) -> (out, lse [B, H, Sq])`` and ``bwd(q, k, v,
mask, opts, out, lse, dout) -> (dq, dk, dv)`` (``mmdit.attention.registry``). Anything a kernel cannot
do raises :class:`UnsupportedAttention` (``model.attention.fallback`` then picks another
implementation).
"""

from __future__ import annotations


from mmdit.attention.masks import MaskSpec
from mmdit.attention.registry import AttentionOptions, UnsupportedAttention, platform, register

MAX_HEAD_DIM = 256
TPU_TILE = 128  # the TPU kernel's tiles are multiples of the lane width


def _check_shapes(q, k, name: str) -> None:
    if q.shape[-1] > MAX_HEAD_DIM:
        raise UnsupportedAttention(f"{name}: head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported")
    if q.shape[2] != k.shape[2]:
        raise UnsupportedAttention(f"{name}: grouped/multi-query heads ({q.shape[2]} vs {k.shape[2]}) are not supported")


def _kernel(name: str, kind: str, q, k, opts: AttentionOptions):
    """The ``mmdit_kernels`` module for ``kind`` (``"gpu"`` | ``"tpu"``), after checking it can run
    here with these shapes and tiles."""
    _check_shapes(q, k, name)
    here = platform()
    native = {"gpu": ("gpu", "cuda", "rocm"), "tpu": ("tpu",)}[kind]
    if here not in native and not opts.interpret:
        raise UnsupportedAttention(
            f"{name}: the {kind.upper()} kernel does not run on the {here!r} backend; set "
            "model.attention.interpret=True to run it in the Pallas interpreter (slow, for tests)"
        )
    if kind == "gpu":
        for field, val in (("block_q", opts.block_q), ("block_k", opts.block_k)):
            if val < 16 or val & (val - 1):
                raise UnsupportedAttention(f"{name}: model.attention.{field}={val} must be a power of two >= 16")
        from mmdit_kernels import flash_gpu

        return flash_gpu
    for field, val in (("block_q", opts.block_q), ("block_k", opts.block_k)):
        if val < TPU_TILE or val % TPU_TILE:
            raise UnsupportedAttention(
                f"{name}: model.attention.{field}={val}; the TPU kernel needs multiples of {TPU_TILE} (e.g. 128, 256, 512)"
            )
    from mmdit_kernels import flash_tpu

    return flash_tpu


def _pick(q, k, opts: AttentionOptions):
    """``pallas``: the kernel family for the target platform (CPU: the GPU kernel, interpreted)."""
    import mmdit_kernels as mk

    try:
        return mk.resolve_backend("auto", opts.interpret, platform=platform())
    except ValueError:
        raise UnsupportedAttention(
            f"pallas: no compiled kernel for the {platform()!r} backend; set model.attention.interpret=True "
            "to run the GPU kernel in the Pallas interpreter (slow, for tests)"
        ) from None


def _mask_args(mask: MaskSpec, opts: AttentionOptions) -> dict:
    """Keyword arguments every ``mmdit_kernels`` entry point takes."""
    return dict(
        mask_fn=mask.kernel_mask_fn(),
        q_meta=tuple(mask.q),
        k_meta=tuple(mask.k),
        block_map=mask.block_map(opts.block_q, opts.block_k),
        scale=opts.scale,
        block_q=opts.block_q,
        block_k=opts.block_k,
        interpret=opts.interpret,
    )


def _entries(name: str, kind: str | None):
    """``(attention, fwd_lse, bwd)`` for one registry name; ``kind=None`` picks by backend."""

    def kernel(q, k, opts, suffix: str):
        chosen = kind or _pick(q, k, opts)
        return getattr(_kernel(name, chosen, q, k, opts), f"flash_attention_{chosen}{suffix}")

    def attention(q, k, v, mask: MaskSpec, opts: AttentionOptions):
        """``q: [B, Sq, H, Dh]``, ``k, v: [B, Sk, H, Dh]`` -> ``[B, Sq, H, Dh]`` in ``q``'s dtype."""
        return kernel(q, k, opts, "")(q, k, v, **_mask_args(mask, opts))

    def fwd_lse(q, k, v, mask: MaskSpec, opts: AttentionOptions):
        """``(out [B, Sq, H, Dh], lse f32 [B, H, Sq])`` for one key block (ring attention)."""
        return kernel(q, k, opts, "_fwd_lse")(q, k, v, **_mask_args(mask, opts))

    def bwd(q, k, v, mask: MaskSpec, opts: AttentionOptions, out, lse, dout):
        """This key block's ``(dq, dk, dv)`` given the global ``out`` and ``lse`` (ring attention)."""
        return kernel(q, k, opts, "_bwd")(q, k, v, out, lse, dout, **_mask_args(mask, opts))

    attention.__name__ = fwd_lse.__name__ = bwd.__name__ = name
    return attention, fwd_lse, bwd


pallas_attention, pallas_fwd_lse, pallas_bwd = _entries("pallas", None)
pallas_gpu_attention, pallas_gpu_fwd_lse, pallas_gpu_bwd = _entries("pallas_gpu", "gpu")
pallas_tpu_attention, pallas_tpu_fwd_lse, pallas_tpu_bwd = _entries("pallas_tpu", "tpu")


def _splash(q, k, v, mask: MaskSpec, opts: AttentionOptions):
    from mmdit_kernels.splash_tpu import TracedMetadataError, splash_attention

    try:
        return splash_attention(
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
        raise UnsupportedAttention(
            f"splash: mask {mask.rule} has traced metadata, but splash builds static masks on the host; "
            f"use model.attention.impl='pallas' (traced masks) instead. {e}"
        ) from None


def splash_attention(q, k, v, mask: MaskSpec, opts: AttentionOptions):
    """JAX's Splash attention (TPU; CPU only through its interpreter with ``opts.interpret``)."""
    _check_shapes(q, k, "splash")
    if platform() != "tpu" and not opts.interpret:
        raise UnsupportedAttention(
            f"splash runs on TPU only (backend is {platform()!r}); set "
            "model.attention.interpret=True to run it in the Pallas interpreter"
        )
    return _splash(q, k, v, mask, opts)


register("pallas", pallas_attention, needs_block_map=True, blockwise=(pallas_fwd_lse, pallas_bwd))
register("pallas_gpu", pallas_gpu_attention, needs_block_map=True, blockwise=(pallas_gpu_fwd_lse, pallas_gpu_bwd))
register("pallas_tpu", pallas_tpu_attention, needs_block_map=True, blockwise=(pallas_tpu_fwd_lse, pallas_tpu_bwd))
register("splash", splash_attention)
