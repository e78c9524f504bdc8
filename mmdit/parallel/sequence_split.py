"""How a joint token sequence is split over the ``sequence`` mesh axis (shared by Ulysses and ring).

**Padding policy.** A joint sequence (e.g. 24 video + 7 audio tokens) rarely divides the number of
sequence shards ``P``. Both strategies pad q/k/v with zeros and the token metadata with *invalid*
tokens (``valid=False``, :meth:`TokenMeta.pad_to`) up to the next multiple of ``P``, run, and slice
the output back to the original length. Invalid keys are never attended, so real rows are exact;
padded query rows compute garbage-but-finite values that are sliced away, and their zero
cotangents contribute nothing to the gradients. A padded mask is no longer "every pair attended",
so ``MaskSpec.is_full`` is cleared (a mask-free kernel such as ``cudnn`` would attend the padding);
pick a sequence length that divides ``P`` to keep mask-free kernels.

**Partitioning.** q/k/v ``[B, S, H, Dh]`` enter ``shard_map`` as ``P(batch_axes, axis, head_axes,
None)``. ``batch_axes`` defaults to the data-parallel axes (``data``, ``fsdp``) whose sizes divide
``B`` (others replicate the batch), ``head_axes`` to ``tensor`` when it divides the heads. Token
metadata ``[Bm, S]`` (``Bm`` is 1 or ``B``) is sharded like the batch when ``Bm == B``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mmdit.attention.masks import MaskSpec, TokenMeta

DEFAULT_BATCH_AXES = ("data", "fsdp")
DEFAULT_HEAD_AXES = ("tensor",)


def axis_size(mesh, axis: str) -> int:
    if axis not in mesh.shape:
        raise ValueError(
            f"sequence parallel axis {axis!r} is not a mesh axis {list(mesh.shape)}; add it to the "
            f"mesh config (mesh.{axis}) or set the attention's axis to an existing one"
        )
    return int(mesh.shape[axis])


def _entry(axes: Sequence[str]):
    axes = tuple(axes)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def resolve_axes(
    mesh, dim: int, requested, default: Sequence[str], *, exclude: str, what: str, multiple: int = 1
) -> tuple[str, ...]:
    """Mesh axes to shard a dimension of size ``dim`` over (whose sizes × ``multiple`` divide it).

    ``requested=None`` → the ``default`` axes present in the mesh, greedily kept while they divide
    (the rest replicate). An explicit request must divide exactly, else ``ValueError``.
    """
    sizes = dict(mesh.shape)
    if requested is None:
        kept, prod = [], multiple
        for a in default:
            if a in sizes and a != exclude and sizes[a] > 1 and dim % (prod * sizes[a]) == 0:
                kept.append(a)
                prod *= sizes[a]
        return tuple(kept)
    requested = (requested,) if isinstance(requested, str) else tuple(requested)
    for a in requested:
        if a not in sizes or a == exclude:
            raise ValueError(f"{what}: mesh axis {a!r} is not usable here (mesh axes {list(sizes)}, sequence axis {exclude!r})")
    total = multiple * math.prod(sizes[a] for a in requested)
    if dim % total:
        raise ValueError(
            f"{what}: size {dim} is not divisible by mesh axes {requested} (× {multiple}) = {total}; change the shape or the axes"
        )
    return requested


def check_shapes(q, k, v, mask: MaskSpec) -> None:
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"sequence-parallel attention wants q [B, Sq, H, Dh], k = v [B, Sk, H, Dh]; got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    for name, x, meta in (("q", q, mask.q), ("k", k, mask.k)):
        ms = jnp.shape(meta.stream)
        if ms[1] != x.shape[1] or ms[0] not in (1, x.shape[0]):
            raise ValueError(
                f"mask.{name} metadata is {ms} but {name} is {x.shape[:2]} (want "
                f"[1 or B, S]); build the MaskSpec from the same token layout"
            )


def pad_sequence(x: jax.Array, meta: TokenMeta, multiple: int) -> tuple[jax.Array, TokenMeta]:
    """Pads ``x [B, S, ...]`` with zeros and ``meta`` with invalid tokens to a multiple of ``multiple``."""
    s = x.shape[1]
    sp = -(-s // multiple) * multiple
    meta = TokenMeta(*(jnp.asarray(f) for f in meta))
    if sp == s:
        return x, meta
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, sp - s)
    return jnp.pad(x, widths), meta.pad_to(sp)


def padded_mask(mask: MaskSpec, q_meta: TokenMeta, k_meta: TokenMeta, padded: bool) -> MaskSpec:
    """``mask`` on new (padded / per-device) metadata: ``is_full`` cleared when padding was added;
    a precomputed block map (global, unpadded layout) is dropped -- kernels recompute it."""
    extra = {}
    if any(f.name == "precomputed_block_map" for f in dataclasses.fields(mask)):
        extra["precomputed_block_map"] = None
    return dataclasses.replace(mask, q=q_meta, k=k_meta, is_full=mask.is_full and not padded, **extra)


def qkv_spec(batch_axes, axis, head_axes) -> PartitionSpec:
    return PartitionSpec(_entry(batch_axes), axis, _entry(head_axes), None)


def meta_spec(meta: TokenMeta, batch: int, batch_axes, seq_axis) -> TokenMeta:
    """A ``TokenMeta`` of ``PartitionSpec`` s: batch-sharded if ``Bm == B``, sequence on ``seq_axis``."""
    b = _entry(batch_axes) if jnp.shape(meta.stream)[0] == batch and batch > 1 else None
    return TokenMeta(*(PartitionSpec(b, seq_axis) for _ in meta))
