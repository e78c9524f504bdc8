"""Parallelism: device meshes, logical axis rules, and sequence-parallel joint attention.

* :mod:`~mmdit.parallel.mesh` -- ``make_mesh(config.mesh)``: ``data × fsdp × sequence × tensor``,
  hybrid ICI × DCN for multi-slice, Auto axis types, config errors naming the field.
* :mod:`~mmdit.parallel.rules` -- logical axis rules, ``validate_rules``, ``logical_to_sharding``,
  ``check_not_replicated``, ``with_logical_constraint``.
* :mod:`~mmdit.parallel.ulysses` / :mod:`~mmdit.parallel.ring` -- sequence-parallel attention
  wrapping any attention implementation (Ulysses) or running the implementation's blockwise
  ``(fwd_lse, bwd)`` pair per ring step, merged by log-sum-exp (ring);
  :mod:`~mmdit.parallel.sequence_split` holds their shared padding policy and partition specs.
"""

from __future__ import annotations

from mmdit.attention import registry as attention_registry
from mmdit.attention.masks import MaskSpec
from mmdit.attention.registry import AttentionOptions
from mmdit.parallel.mesh import AXES, axis_sizes, describe, device_grid, make_mesh, resolve_mesh_shape
from mmdit.parallel.ring import ring_attention
from mmdit.parallel.rules import (
    DEFAULT_RULES,
    check_not_replicated,
    logical_to_sharding,
    logical_to_spec,
    rules_from_config,
    validate_rules,
    with_logical_constraint,
)
from mmdit.parallel.ulysses import ulysses_attention

STRATEGIES = ("none", "ulysses", "ring")


def sequence_parallel_attention(
    q, k, v, mask: MaskSpec, opts: AttentionOptions, *, mesh=None, strategy: str = "none", axis: str = "sequence", **kwargs
):
    """Joint attention ``[B, S, H, Dh] -> [B, S, H, Dh]`` under a sequence-parallel ``strategy``.

    ``"none"`` (or no mesh, or a sequence axis of size 1) calls
    :func:`~mmdit.attention.registry.attend` directly (XLA's partitioner handles whatever
    sharding the inputs have); ``"ulysses"`` / ``"ring"`` shard the sequence over ``mesh.axis``.
    ``kwargs`` go to the strategy (``batch_axes``, ``head_axes``).
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"model.attention.sequence_parallel={strategy!r} is not a sequence-parallel strategy; "
            f"choose one of {list(STRATEGIES)}"
        )
    if strategy == "none" or mesh is None or mesh.shape.get(axis, 1) == 1:
        return attention_registry.attend(q, k, v, mask, opts)
    fn = ulysses_attention if strategy == "ulysses" else ring_attention
    return fn(q, k, v, mask, opts, mesh=mesh, axis=axis, **kwargs)


__all__ = [
    "AXES",
    "DEFAULT_RULES",
    "STRATEGIES",
    "check_not_replicated",
    "describe",
    "device_grid",
    "logical_to_sharding",
    "logical_to_spec",
    "make_mesh",
    "resolve_mesh_shape",
    "axis_sizes",
    "ring_attention",
    "rules_from_config",
    "sequence_parallel_attention",
    "ulysses_attention",
    "validate_rules",
    "with_logical_constraint",
]
