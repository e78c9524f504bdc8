"""Per-token metadata as the kernels carry it.

Metadata is a tuple of fields, each ``[Bm, S]`` with ``Bm`` 1 (shared by the batch) or the batch.
Kernels load fields in tiles (``[bq]`` query rows, ``[bk]`` key columns) and hand them to the mask
predicate as ``[bq, 1]`` / ``[1, bk]`` blocks. Tiled loads need 32-bit element types (the Triton
lowering cannot load ``i1``), so fields travel as ``int32``/``float32`` and booleans are restored
in-kernel before the predicate sees them: a predicate written for bools (``~known``) stays correct.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check(meta: Sequence, batch: int, seq: int, name: str) -> tuple:
    """Validates ``meta`` (fields ``[1 | batch, seq]``) and returns it as a tuple of arrays."""
    out = []
    for i, f in enumerate(meta):
        shape = tuple(np.shape(f))
        if len(shape) != 2 or shape[1] != seq or shape[0] not in (1, batch):
            raise ValueError(f"{name}[{i}] has shape {shape}; metadata fields must be [B, S] or [1, S] with B={batch}, S={seq}")
        out.append(f)
    return tuple(out)


def bool_flags(meta: Sequence) -> tuple[bool, ...]:
    """Static per-field flag: was the field boolean (restored in-kernel by :func:`decode`)."""
    return tuple(jnp.dtype(jnp.result_type(f)) == jnp.bool_ for f in meta)


def encode(meta: Sequence) -> tuple[jax.Array, ...]:
    """Fields as ``int32`` (bool and integer fields) or ``float32`` (floating fields)."""
    out = []
    for f in meta:
        f = jnp.asarray(f)
        if jnp.issubdtype(f.dtype, jnp.floating):
            out.append(f.astype(jnp.float32))
        elif f.dtype == jnp.bool_ or jnp.issubdtype(f.dtype, jnp.integer):
            out.append(f.astype(jnp.int32))
        else:
            raise TypeError(f"unsupported metadata dtype {f.dtype}: use bool, integer or float fields")
    return tuple(out)


def decode(values: Sequence[jax.Array], flags: Sequence[bool]) -> tuple[jax.Array, ...]:
    """Inverse of :func:`encode` for loaded tiles: restores boolean fields."""
    return tuple(v != 0 if is_bool else v for v, is_bool in zip(values, flags))


def pad(meta: Sequence[jax.Array], length: int) -> tuple[jax.Array, ...]:
    """Pads the sequence axis to ``length`` with zeros (kernels mask padded keys by position)."""
    out = []
    for f in meta:
        extra = length - f.shape[1]
        out.append(f if extra == 0 else jnp.pad(f, ((0, 0), (0, extra))))
    return tuple(out)
