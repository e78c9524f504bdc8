"""Output types of ``pallas_call``s that also work inside ``jax.shard_map``.

A ``pallas_call`` inside a ``shard_map`` that checks varying manual axes must declare which mesh
axes its outputs vary over; the kernels' outputs vary over the union of their operands' axes.
"""

from __future__ import annotations

import jax


def out_struct(shape, dtype, operands) -> jax.ShapeDtypeStruct:
    """``ShapeDtypeStruct(shape, dtype)`` varying over every manual axis any of ``operands`` (a
    pytree of arrays) varies over; a plain struct outside ``shard_map``."""
    mats = [jax.typeof(x).manual_axis_type for x in jax.tree.leaves(operands)]
    varying = frozenset().union(*(m.varying for m in mats))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mats[0].update(varying=varying))
