"""mmdit_kernels: flash attention with block-sparse metadata masks (Pallas; GPU and TPU).

Installed from the repository's top-level ``kernels/`` folder as ``mmdit_kernels`` (the PyPI name
``kernels`` belongs to another project). It does not import ``mmdit``: masks arrive as a predicate
over metadata tuples plus an optional block map (``mmdit.attention.masks`` builds both).

* :func:`flash_attention` -- dispatches to the GPU kernel (:mod:`.flash_gpu`, Pallas/Triton) or
  the TPU kernel (:mod:`.flash_tpu`, Pallas/Mosaic; block map as scalar-prefetch operands); on CPU
  either runs in its Pallas interpreter (``interpret=True``);
* ``flash_attention_{gpu,tpu}_fwd_lse`` / ``flash_attention_{gpu,tpu}_bwd`` -- one key block's
  ``(out, lse)`` and its gradient share given the merged ``out``/``lse`` (ring attention);
* :mod:`.splash_tpu` -- JAX's Splash attention driven by our predicates over *concrete* metadata
  (static masks only);
* :func:`reference_attention` -- dense pure-JAX reference (:mod:`.reference`);
* :mod:`.block_map` -- EMPTY/PARTIAL/FULL tile maps and helpers.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax

from mmdit_kernels.block_map import EMPTY, FULL, PARTIAL, block_map_from_dense, block_map_from_mask_fn
from mmdit_kernels.reference import reference_attention

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "block_map_from_dense",
    "block_map_from_mask_fn",
    "flash_attention",
    "reference_attention",
    "resolve_backend",
]


def resolve_backend(backend: str = "auto", interpret: bool = False, platform: str | None = None) -> str:
    """``"gpu"`` or ``"tpu"``: the kernel family for ``backend`` on ``platform`` (default: this machine's
    ``jax.default_backend()``; a lowering check for another target passes the target).

    ``auto`` follows the platform; on CPU ``auto`` requires ``interpret=True`` and picks the GPU kernel
    in the Pallas interpreter (``"tpu"`` explicitly runs the TPU kernel in the TPU interpreter).
    """
    if backend not in ("auto", "gpu", "tpu"):
        raise ValueError(f"backend={backend!r}: choose 'auto', 'gpu' or 'tpu'")
    if backend != "auto":
        return backend
    platform = jax.default_backend() if platform is None else platform
    if platform == "tpu":
        return "tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    if not interpret:
        raise ValueError(
            f"flash_attention has no compiled kernel for the {platform!r} backend; pass "
            "interpret=True to run the GPU kernel in the Pallas interpreter (slow, for tests)"
        )
    return "gpu"


def flash_attention(
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
    backend: str = "auto",
    interpret: bool = False,
    **options,
) -> jax.Array:
    """Flash attention ``[B, Sq, H, Dh]`` under a metadata mask predicate.

    Args:
      q: ``[B, Sq, H, Dh]``; k, v: ``[B, Sk, H, Dh]`` (bf16/f16/f32, same dtype).
      mask_fn: ``(q_fields, k_fields) -> bool``; fields arrive as ``[bq, 1]`` / ``[1, bk]`` tiles
        (``[.., Sq, 1]`` / ``[.., 1, Sk]`` in the reference). Must fold in key validity. ``None``
        attends every key.
      q_meta, k_meta: tuples of ``[B, S]`` or ``[1, S]`` arrays (bool, integer or float).
      block_map: ``int8 [B | 1, ceil(Sq/block_q), ceil(Sk/block_k)]`` EMPTY/PARTIAL/FULL (may be
        traced); if ``None`` it is computed densely from ``mask_fn``.
      scale: softmax scale, default ``Dh ** -0.5``.
      block_q, block_k: tile sizes, the block map's granularity (GPU: powers of two >= 16; TPU:
        multiples of 128).
      backend: ``"auto"`` (from ``jax.default_backend()``), ``"gpu"`` or ``"tpu"``.
      interpret: run the Pallas kernels in interpret mode (required on CPU).
      **options: GPU kernel knobs (``block_q_bwd``, ``block_k_bwd``, ``num_warps``, ``num_stages``,
        ``num_stages_bwd``; see :func:`mmdit_kernels.flash_gpu.flash_attention_gpu`).

    Rows with no attended key output 0 (and zero gradients).
    """
    kind = resolve_backend(backend, interpret)
    if kind == "tpu":
        if options:
            raise ValueError(f"options {sorted(options)} apply to the GPU kernel only")
        from mmdit_kernels.flash_tpu import flash_attention_tpu as kernel
    else:
        from mmdit_kernels.flash_gpu import flash_attention_gpu as kernel
    return kernel(
        q,
        k,
        v,
        mask_fn=mask_fn,
        q_meta=q_meta,
        k_meta=k_meta,
        block_map=block_map,
        scale=scale,
        block_q=block_q,
        block_k=block_k,
        interpret=interpret,
        **options,
    )
