"""Attention implementations, chosen by one config string (``model.attention.impl``).

An implementation is a function ``fn(q, k, v, mask, opts) -> out`` with ``q: [B, Sq, H, Dh]``,
``k, v: [B, Sk, H, Dh]``, ``mask`` a :class:`~mmdit.attention.masks.MaskSpec` and ``opts`` an
:class:`AttentionOptions`; it returns ``[B, Sq, H, Dh]`` in ``q``'s dtype. Rows with no attended key
return zeros. A kernel that cannot honour a mask or shape raises :class:`UnsupportedAttention`;
:func:`attend` then falls back to ``opts.fallback`` if the config names one, else re-raises.

Registering a new kernel is one call: ``register("name", fn)`` (or ``register_lazy`` with a module
path, so heavy kernel modules are imported only when chosen). ``register(..., blockwise=(fwd_lse,
bwd))`` adds the pair ring attention runs per ring step (:func:`blockwise`; ``xla``'s is the dense
reference). ``impl="auto"`` is resolved when the model spec is built (:func:`resolve_auto`), for
:func:`platform` -- the backend, or the target of a :func:`target_platform` lowering check.

Built in: ``xla`` (dense reference), ``cudnn`` (``jax.nn.dot_product_attention`` with sequence
lengths: the ``full`` rule with padding and per-stream groups); lazily: ``pallas`` / ``pallas_gpu`` /
``pallas_tpu`` / ``splash`` (:mod:`mmdit.attention.pallas`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

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
# Blockwise pair (ring attention's block step):
#   fwd_lse(q, k, v, mask, opts) -> (out [B, Sq, H, Dh] in q.dtype, lse f32 [B, H, Sq], natural log;
#                                    rows with no attended key: out 0, lse -inf)
#   bwd(q, k, v, mask, opts, out, lse, dout) -> (dq, dk, dv): this block's share of the gradient given
#       the GLOBAL (merged over all key blocks) out [B, Sq, H, Dh] and lse [B, H, Sq]
#       (delta = rowsum(dout * out), p = exp(s - lse)).
BlockwiseFwd = Callable[..., tuple[jax.Array, jax.Array]]
BlockwiseBwd = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]
_IMPLS: dict[str, AttentionFn] = {}
_LAZY: dict[str, tuple[str, bool]] = {}
_NEEDS_BLOCK_MAP: set[str] = set()
_BLOCKWISE: dict[str, tuple[BlockwiseFwd, BlockwiseBwd]] = {}


def register(
    name: str,
    fn: AttentionFn,
    needs_block_map: bool = False,
    blockwise: tuple[BlockwiseFwd, BlockwiseBwd] | None = None,
) -> None:
    """``needs_block_map``: the kernel reads ``mask.block_map(...)``, so the model precomputes it once
    per forward (outside the layer scan) and hands it over in ``MaskSpec.precomputed_block_map``.

    ``blockwise``: ``(fwd_lse_fn, bwd_fn)`` (signatures above) so ring attention can run this kernel
    per ring step and merge blocks by log-sum-exp; without it ring attention uses the ``xla`` pair."""
    _IMPLS[name] = fn
    if needs_block_map:
        _NEEDS_BLOCK_MAP.add(name)
    if blockwise is not None:
        fwd, bwd = blockwise
        _BLOCKWISE[name] = (fwd, bwd)


def register_lazy(name: str, module: str, needs_block_map: bool = False) -> None:
    """``module`` registers ``name`` when imported."""
    _LAZY[name] = (module, needs_block_map)
    if needs_block_map:
        _NEEDS_BLOCK_MAP.add(name)


def needs_block_map(name: str) -> bool:
    return name in _NEEDS_BLOCK_MAP


def available() -> list[str]:
    return sorted(set(_IMPLS) | set(_LAZY))


def blockwise(name: str) -> tuple[BlockwiseFwd, BlockwiseBwd] | None:
    """The ``(fwd_lse_fn, bwd_fn)`` pair registered for ``name`` (importing a lazy module), or None."""
    get(name)
    return _BLOCKWISE.get(name)


def get(name: str) -> AttentionFn:
    if name not in _IMPLS and name in _LAZY:
        importlib.import_module(_LAZY[name][0])
    if name == "auto":
        raise ValueError(
            "model.attention.impl='auto' is resolved when the model spec is built (mmdit.model.spec.build_spec); "
            "pass the resolved impl to the registry"
        )
    if name not in _IMPLS:
        raise ValueError(
            f"model.attention.impl={name!r} is not a registered attention implementation; choose one of {available()}"
        )
    return _IMPLS[name]


_TARGET: list[str] = []  # platform stack set by target_platform()


def platform() -> str:
    """The platform attention is being built for: the innermost :func:`target_platform`, else
    ``jax.default_backend()``. Implementations that pick a kernel per platform read this.

    Before JAX's backends are initialised (the model spec is built before
    ``jax.distributed.initialize``, which must come first on multi-host runs) the backend is not
    started here: the platform is read from ``JAX_PLATFORMS`` / ``jax_platforms`` if set, else
    guessed from the installed plugins (libtpu -> ``tpu``, a CUDA plugin -> ``gpu``, else ``cpu``),
    which is JAX's own default order."""
    if _TARGET:
        return _TARGET[-1]
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return jax.default_backend()
    configured = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    if configured:
        first = configured.split(",")[0].strip().lower()
        return "gpu" if first in _GPU_PLATFORMS else first
    if importlib.util.find_spec("libtpu") is not None:
        return "tpu"
    if any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")):
        return "gpu"
    return "cpu"


@contextlib.contextmanager
def target_platform(name: str):
    """Traces attention for platform ``name`` (``tpu`` | ``cuda`` | ``gpu`` | ``cpu``) from any host, for
    ``jax.export(..., platforms=(name,))`` lowering checks (``mmdit-plan``): inside the context
    :func:`platform` returns ``name``, so every implementation picks the kernel of the target."""
    _TARGET.append("gpu" if name == "cuda" else name)
    try:
        yield
    finally:
        _TARGET.pop()


_GPU_PLATFORMS = ("gpu", "cuda", "rocm")
_HALF = ("bfloat16", "float16")
_ANNOUNCED: set[str] = set()


def resolve_auto(rule, platform: str, dtype: str = "bfloat16") -> tuple[str, str | None]:
    """``model.attention.impl="auto"`` -> ``(impl, fallback)`` for a target ``platform`` (``cpu`` |
    ``gpu``/``cuda``/``rocm`` | ``tpu``), mask ``rule`` (a :class:`~mmdit.attention.masks.Rule`) and
    compute ``dtype`` name:

    * GPU: ``cudnn`` for the ``full`` rule in bf16/f16 (padding and per-stream groups become sequence
      lengths), falling back to ``pallas``; ``pallas`` (the block-sparse Triton kernel) otherwise;
    * TPU: ``pallas`` (the Mosaic kernel, any rule, traced metadata);
    * CPU (and anything else): ``xla``.
    """
    from mmdit.attention.masks import Full

    platform = platform.lower()
    if platform in _GPU_PLATFORMS:
        if isinstance(rule, Full) and str(dtype) in _HALF:
            return "cudnn", "pallas"
        return "pallas", None
    if platform == "tpu":
        return "pallas", None
    return "xla", None


def announce(message: str) -> None:
    """Prints ``message`` to stderr once per process (the ``impl="auto"`` choice, at model build)."""
    if message not in _ANNOUNCED:
        _ANNOUNCED.add(message)
        print(f"[mmdit.attention] {message}", file=sys.stderr)


def attend(q, k, v, mask: MaskSpec, opts: AttentionOptions):
    try:
        return get(opts.impl)(q, k, v, mask, opts)
    except UnsupportedAttention as e:
        if opts.fallback and opts.fallback != opts.impl:
            return get(opts.fallback)(q, k, v, mask, dataclasses.replace(opts, impl=opts.fallback))
        raise UnsupportedAttention(
            f"{e} (model.attention.impl={opts.impl!r}; set model.attention.fallback='xla' to fall back)"
        ) from None


@jax.custom_vjp
def masked_softmax(s, m):
    """Softmax over the last axis of f32 scores ``s`` where bool ``m`` (broadcastable to ``s``) holds;
    masked entries, and every entry of a row with no attended key, are exactly 0.

    The backward pass reads only the probabilities: ``ds = p * (g - rowsum(p * g))`` is already 0 on
    masked entries, so the mask is neither saved for it nor broadcast to ``s``'s shape."""
    s = jnp.where(m, s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0))  # exp(-inf) = 0 on masked entries
    denom = e.sum(axis=-1, keepdims=True)
    return e / jnp.where(denom == 0, 1.0, denom)


def _masked_softmax_fwd(s, m):
    p = masked_softmax(s, m)
    return p, p


def _masked_softmax_bwd(p, g):
    return p * (g - jnp.sum(p * g, axis=-1, keepdims=True)), None


masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


def xla_attention(q, k, v, mask: MaskSpec, opts: AttentionOptions):
    """Reference attention: dense f32 scores and softmax, the same values as
    ``mmdit_kernels.reference_attention`` (which the kernels are tested against).

    ``mask.is_full`` (a static promise that every pair is attended) builds no mask at all; otherwise the
    dense bool mask ``[B|1, 1, Sq, Sk]`` enters :func:`masked_softmax`, whose backward needs only the
    probabilities -- no per-layer ``[B, H, Sq, Sk]`` mask is materialised or kept for the backward pass."""
    scale = q.shape[-1] ** -0.5 if opts.scale is None else opts.scale
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(s, axis=-1) if mask.is_full else masked_softmax(s, mask.dense()[:, None])
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32)).astype(q.dtype)


def _xla_scores(q, k, mask: MaskSpec, scale):
    """f32 scores ``[B, H, Sq, Sk]`` and the dense mask ``[B|1, 1, Sq, Sk]``."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    return s, mask.dense()[:, None]


def xla_attention_lse(q, k, v, mask: MaskSpec, opts: AttentionOptions):
    """Dense blockwise forward: ``(out [B, Sq, H, Dh] q.dtype, lse f32 [B, H, Sq])``; rows with no
    attended key give ``out = 0`` and ``lse = -inf`` (the reference of every ``fwd_lse_fn``)."""
    scale = q.shape[-1] ** -0.5 if opts.scale is None else opts.scale
    s, m = _xla_scores(q, k, mask, scale)
    s = jnp.where(m, s, -jnp.inf)
    mx = jnp.max(s, axis=-1)
    mx_safe = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.where(m, jnp.exp(s - mx_safe[..., None]), 0.0)
    denom = p.sum(axis=-1)
    empty = denom == 0
    out = jnp.einsum("bhqk,bkhd->bqhd", p / jnp.where(empty, 1.0, denom)[..., None], v.astype(jnp.float32))
    lse = jnp.where(empty, -jnp.inf, mx_safe + jnp.log(jnp.where(empty, 1.0, denom)))
    return out.astype(q.dtype), lse


def xla_attention_bwd(q, k, v, mask: MaskSpec, opts: AttentionOptions, out, lse, dout):
    """Dense blockwise backward: this key block's ``(dq, dk, dv)`` given the global ``out`` and ``lse``
    (``p = exp(s - lse)``, ``delta = rowsum(dout * out)``); rows with ``lse = -inf`` contribute 0."""
    scale = q.shape[-1] ** -0.5 if opts.scale is None else opts.scale
    s, m = _xla_scores(q, k, mask, scale)
    live = m & jnp.isfinite(lse)[..., None]
    p = jnp.where(live, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)  # [B, H, Sq, Sk]
    do32 = dout.astype(jnp.float32)
    delta = jnp.einsum("bqhd,bqhd->bhq", do32, out.astype(jnp.float32))
    dv = jnp.einsum("bhqk,bqhd->bkhd", p, do32)
    dp = jnp.einsum("bqhd,bkhd->bhqk", do32, v, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None]) * scale
    dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q, preferred_element_type=jnp.float32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# Which implementations can run which masks (for error messages and ``impl="auto"``).
STRUCTURED_MASK_IMPLS = ("pallas", "xla")


def _group_ids(mask: MaskSpec) -> tuple[int, ...]:
    """The attention group ids to split by: ``range(mask.num_groups)``, or the distinct non-negative
    ids of concrete metadata; traced groups without ``num_groups`` raise :class:`UnsupportedAttention`."""
    if mask.num_groups is not None:
        return tuple(range(int(mask.num_groups)))
    fields = (mask.q.group, mask.k.group)
    if any(isinstance(f, jax.core.Tracer) for f in fields):
        raise UnsupportedAttention(
            "cudnn: the attention group ids are traced and MaskSpec.num_groups is not set (build the mask "
            "with num_groups=<number of streams>)"
        )
    ids = np.unique(np.concatenate([np.asarray(f).ravel() for f in fields]))
    return tuple(int(g) for g in ids if g >= 0)


def _to_front(sel):
    """``sel bool [B, S]`` -> (stable permutation putting selected tokens first, its inverse, count int32 [B])."""
    perm = jnp.argsort(jnp.logical_not(sel).astype(jnp.int8), axis=1, stable=True)
    inv = jnp.argsort(perm, axis=1)
    return perm, inv, sel.sum(axis=1, dtype=jnp.int32)


def _gather(x, idx):
    """``x [B, S, H, Dh]`` gathered along the sequence by ``idx [B, S]``."""
    return jnp.take_along_axis(x, idx[:, :, None, None], axis=1)


def cudnn_attention(q, k, v, mask: MaskSpec, opts: AttentionOptions):
    """``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU for bf16/f16, XLA elsewhere).

    Runs the ``full`` rule, whatever the padding/invalid tokens and attention groups: for each group
    ``g`` (one in joint layers; one per stream in non-joint layers), a stable permutation moves the
    group's queries and its *valid* keys to the front, cuDNN attends them with
    ``query_seq_lengths`` / ``key_value_seq_lengths`` (so it computes about ``n_q(g) x n_k(g)`` pairs
    and never the padding), and the inverse permutation puts the rows back. Queries whose group has
    no valid key output 0 (a dummy key keeps cuDNN finite; those rows are then zeroed, so they pass
    no gradient). Any other rule raises :class:`UnsupportedAttention` naming the impls that run it
    (``model.attention.fallback`` picks one).
    """
    if not mask.rule_is_full:
        raise UnsupportedAttention(
            f"cudnn attention runs the 'full' rule only (plus padding and per-stream groups, as sequence "
            f"lengths); model.mask={mask.rule} needs one of {list(STRUCTURED_MASK_IMPLS)} (set "
            f"model.attention.impl='pallas' or model.attention.fallback='pallas')"
        )
    implementation = "cudnn" if platform() in _GPU_PLATFORMS and q.dtype in (jnp.bfloat16, jnp.float16) else None
    call = lambda q, k, v, **kw: jax.nn.dot_product_attention(q, k, v, scale=opts.scale, implementation=implementation, **kw)
    if mask.is_full:  # static promise: every pair attended, no lengths needed
        return call(q, k, v)
    b, sq = q.shape[:2]
    sk = k.shape[1]
    q_group = jnp.broadcast_to(mask.q.group, (b, sq))
    k_group = jnp.broadcast_to(mask.k.group, (b, sk))
    k_valid = jnp.broadcast_to(mask.k.valid, (b, sk)).astype(bool)
    out = jnp.zeros(q.shape, q.dtype)
    for g in _group_ids(mask):
        q_sel = q_group == g
        k_sel = k_valid & (k_group == g)
        q_perm, q_inv, q_len = _to_front(q_sel)
        k_perm, _, kv_len = _to_front(k_sel)
        o = call(
            _gather(q, q_perm),
            _gather(k, k_perm),
            _gather(v, k_perm),
            query_seq_lengths=jnp.maximum(q_len, 1),
            key_value_seq_lengths=jnp.maximum(kv_len, 1),  # dummy key for rows with none; zeroed below
        )
        keep = q_sel & (kv_len > 0)[:, None]
        out = out + jnp.where(keep[:, :, None, None], _gather(o, q_inv), 0).astype(q.dtype)
    return out


register("xla", xla_attention, blockwise=(xla_attention_lse, xla_attention_bwd))
register("cudnn", cudnn_attention)
register_lazy("pallas", "mmdit.attention.pallas", needs_block_map=True)
register_lazy("pallas_gpu", "mmdit.attention.pallas", needs_block_map=True)
register_lazy("pallas_tpu", "mmdit.attention.pallas", needs_block_map=True)
register_lazy("splash", "mmdit.attention.pallas")
