"""Attention implementations, chosen by one config string (``model.attention.impl``).

An implementation is a function ``fn(q, k, v, mask, opts) -> out`` with ``q: [B, Sq, H, Dh]``,
``k, v: [B, Sk, H, Dh]``, ``mask`` a :class:`~mmdit.attention.masks.MaskSpec` and ``opts`` an
:class:`AttentionOptions`; it returns ``[B, Sq, H, Dh]`` in ``q``'s dtype. Rows with no attended key
return zeros. A kernel that cannot honour a mask or shape raises :class:`UnsupportedAttention`;
:func:`attend` then falls back to ``opts.fallback`` if the config names one, else re-raises.

Registering a new kernel is one call: ``register("name", fn)`` (or ``register_lazy`` with a module
path, so heavy kernel modules are imported only when chosen).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import jax
import jax.numpy as jnp

from mmdit.attention.masks import MaskSpec


class UnsupportedAttention(ValueError):
    """The chosen implementation cannot run this mask/shape/backend."""


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    impl: str = "xla"
    fallback: str | None = None  # impl to use when `impl` raises UnsupportedAttention
    scale: float | None = None  # default 1/sqrt(Dh)
    block_q: int = 128
    block_k: int = 128
    interpret: bool = False  # run Pallas kernels in interpret mode (CPU tests)


AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, MaskSpec, AttentionOptions], jax.Array]
_IMPLS: dict[str, AttentionFn] = {}
_LAZY: dict[str, tuple[str, bool]] = {}
_NEEDS_BLOCK_MAP: set[str] = set()


def register(name: str, fn: AttentionFn, needs_block_map: bool = False) -> None:
    """``needs_block_map``: the kernel reads ``mask.block_map(...)``, so the model precomputes it once
    per forward (outside the layer scan) and hands it over in ``MaskSpec.precomputed_block_map``."""
    _IMPLS[name] = fn
    if needs_block_map:
        _NEEDS_BLOCK_MAP.add(name)


def register_lazy(name: str, module: str, needs_block_map: bool = False) -> None:
    """``module`` registers ``name`` when imported."""
    _LAZY[name] = (module, needs_block_map)
    if needs_block_map:
        _NEEDS_BLOCK_MAP.add(name)


def needs_block_map(name: str) -> bool:
    return name in _NEEDS_BLOCK_MAP


def available() -> list[str]:
    return sorted(set(_IMPLS) | set(_LAZY))


def get(name: str) -> AttentionFn:
    if name not in _IMPLS and name in _LAZY:
        importlib.import_module(_LAZY[name][0])
    if name not in _IMPLS:
        raise ValueError(
            f"model.attention.impl={name!r} is not a registered attention implementation; choose one of {available()}"
        )
    return _IMPLS[name]


def attend(q, k, v, mask: MaskSpec, opts: AttentionOptions):
    try:
        return get(opts.impl)(q, k, v, mask, opts)
    except UnsupportedAttention as e:
        if opts.fallback and opts.fallback != opts.impl:
            return get(opts.fallback)(q, k, v, mask, dataclasses.replace(opts, impl=opts.fallback))
        raise UnsupportedAttention(
            f"{e} (model.attention.impl={opts.impl!r}; set model.attention.fallback='xla' to fall back)"
        ) from None


def xla_attention(q, k, v, mask: MaskSpec, opts: AttentionOptions):
    """Reference attention: dense scores under the dense mask, f32 softmax (the same reference the
    kernels are tested against, ``mmdit_kernels.reference_attention``)."""
    from mmdit_kernels import reference_attention

    return reference_attention(
        q, k, v, mask_fn=mask.kernel_mask_fn(), q_meta=tuple(mask.q), k_meta=tuple(mask.k), scale=opts.scale
    )


def cudnn_attention(q, k, v, mask: MaskSpec, opts: AttentionOptions):
    """``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU, XLA elsewhere).

    Only for masks that attend every pair: cuDNN would fold any other mask into a dense S x S bias.
    """
    if not mask.is_full:
        raise UnsupportedAttention(f"cudnn attention runs only unmasked attention; mask is {mask.rule}")
    backend = jax.default_backend()
    implementation = "cudnn" if backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) else None
    return jax.nn.dot_product_attention(q, k, v, scale=opts.scale, implementation=implementation)


register("xla", xla_attention)
register("cudnn", cudnn_attention)
register_lazy("pallas", "mmdit.attention.pallas", needs_block_map=True)
register_lazy("splash", "mmdit.attention.pallas")
