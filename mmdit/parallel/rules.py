"""Logical axis rules: which mesh axes shard each named array dimension, and checks on them.

Params carry logical dimension names (``nn.with_logical_partitioning``), activations are constrained
with logical names (:func:`with_logical_constraint`); a *rules* list in config
(``config.mesh.rules``) maps each name to a mesh axis, a tuple of mesh axes, or ``None``
(replicated). Resolution is flax's (``nn.logical_to_mesh_axes``): rules are tried **in list
order** and a mesh axis already used by an earlier rule for the same array is skipped, so with
:data:`DEFAULT_RULES` an activation ``[batch, length, embed]`` becomes
``P(("data", "fsdp"), "sequence", None)`` (batch claims fsdp first) while a weight
``[embed, mlp]`` becomes ``P("fsdp", "tensor")`` (FSDP shards weights on ``embed``).

:func:`validate_rules` checks a rules list against a mesh, a param tree and the run's shapes before
anything compiles; :func:`check_not_replicated` catches large params left fully replicated.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
    # activations: batch over every data-parallel axis (FSDP is data parallel for activations);
    # listed first so it claims `fsdp` before `embed` on arrays that carry both names.
    ("batch", ("data", "fsdp")),
    # the joint token sequence (sequence parallelism; Ulysses / ring re-split it for attention)
    ("length", "sequence"),
    # text / reference-audio cross-attention context: short, replicated
    ("cond_length", None),
    # weights: FSDP shards the model dimension; tensor parallelism shards heads and the MLP width
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),  # per-head dim: never sharded
    ("mlp", "tensor"),
    ("layers", None),  # the nn.scan layer axis: every device runs every layer
    # small or frozen: token vocab (text encoders run offline), latent channels, norm scales,
    # condition feature width, timestep-embedding frequencies / output, adaLN modulation rows
    ("vocab", None),
    ("channels", None),
    ("norm", None),
    ("cond", None),
    ("freq", None),
    ("embed_out", None),
    ("mod", None),
)


def rules_from_config(rules: Any = None, *, field: str = "mesh.rules") -> Rules:
    """Normalises a config rules list (lists or tuples; ``None`` → :data:`DEFAULT_RULES`)."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for i, entry in enumerate(rules):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], str):
            raise ValueError(
                f"{field}[{i}]={entry!r} is not a (logical_name, mesh_axes) pair; write e.g. "
                f"('embed', 'fsdp'), ('batch', ('data', 'fsdp')) or ('kv', None)"
            )
        name, axes = entry
        if axes is None or isinstance(axes, str):
            out.append((name, axes))
        elif isinstance(axes, (list, tuple)) and all(isinstance(a, str) for a in axes):
            out.append((name, tuple(axes) if axes else None))
        else:
            raise ValueError(f"{field}[{i}]: mesh axes {axes!r} for {name!r} must be a mesh axis name, a tuple of names, or None")
    return tuple(out)


def _axes_of(entry: MeshAxes) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _mesh_sizes(mesh) -> dict[str, int]:
    return dict(mesh.shape)


def _check_names_mapped(names: Iterable[str | None], rules: Rules, where: str, field: str) -> None:
    mapped = {n for n, _ in rules}
    missing = [n for n in names if isinstance(n, str) and n not in mapped]
    if missing:
        raise ValueError(
            f"{where}: logical axis name(s) {missing} have no entry in {field}; add e.g. "
            f"({missing[0]!r}, None) to replicate, or map it to a mesh axis"
        )


def logical_to_spec(names: Sequence[str | None], rules: Rules | None = None, *, field: str = "mesh.rules") -> PartitionSpec:
    """Mesh ``PartitionSpec`` for one array's logical names; an unmapped name is an error."""
    rules = rules_from_config(rules, field=field)
    _check_names_mapped(names, rules, f"logical axes {tuple(names)}", field)
    return nn.logical_to_mesh_axes(tuple(names), rules)


def _boxed_leaves(tree):
    """``[(path_str, names, shape, dtype)]`` for every ``nn.Partitioned`` leaf of ``tree``."""
    is_box = lambda x: isinstance(x, nn.Partitioned)
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]:
        if is_box(leaf):
            out.append(
                (
                    jax.tree_util.keystr(path, simple=True, separator="/"),
                    tuple(leaf.names),
                    tuple(leaf.value.shape),
                    leaf.value.dtype,
                )
            )
    return out


def validate_rules(
    rules: Any,
    mesh,
    *,
    params_shapes: Any = None,
    batch_size: int | None = None,
    num_heads: int | None = None,
    seq_len: int | None = None,
    sequence_strategy: str = "ulysses",
    logical_names: Iterable[str] = (),
    field: str = "mesh.rules",
) -> Rules:
    """Checks ``rules`` against ``mesh`` and the run's shapes; returns the normalised rules.

    Args:
      rules: config rules list (``None`` → :data:`DEFAULT_RULES`).
      mesh: a ``Mesh`` or ``AbstractMesh`` (only axis names and sizes are read).
      params_shapes: a param tree with ``nn.LogicallyPartitioned`` leaves, e.g.
        ``jax.eval_shape(model.init, ...)``: every logical name must be mapped and every sharded
        dimension divisible by its mesh axes' total size.
      batch_size: global batch; must be divisible by the mesh axes ``batch`` maps to.
      num_heads: attention heads; must be divisible by the ``heads`` mesh axes (tensor) and, with
        ``sequence_strategy="ulysses"``, by those × the ``sequence`` axis (Ulysses splits the
        local heads over it). Ring attention has no head constraint.
      seq_len: joint token count; must be at least the ``sequence`` axis size (shorter sequences
        would leave devices holding only padding).
      logical_names: extra names (e.g. activation names the model constrains) that must be mapped.

    Raises ``ValueError`` listing every problem found, each naming the param / field and the fix.
    """
    rules = rules_from_config(rules, field=field)
    sizes = _mesh_sizes(mesh)
    errors: list[str] = []
    for name, axes in rules:
        for a in _axes_of(axes):
            if a not in sizes:
                errors.append(
                    f"{field}: ({name!r}, {axes!r}) names mesh axis {a!r}, but the mesh axes are "
                    f"{list(sizes)}; use one of them or None"
                )
    if errors:
        raise ValueError("\n".join(errors))

    def total(axes_entry) -> int:
        return math.prod(sizes[a] for a in _axes_of(axes_entry))

    mapped = {n for n, _ in rules}
    missing = sorted({n for n in logical_names if n not in mapped})
    if missing:
        errors.append(f"{field}: logical axis name(s) {missing} are used but have no rule; add e.g. ({missing[0]!r}, None)")
    if params_shapes is not None:
        for path, names, shape, _ in _boxed_leaves(params_shapes):
            if len(names) != len(shape):
                errors.append(
                    f"param {path}: {len(names)} logical names {names} for a {len(shape)}-d "
                    f"array {shape}; fix its nn.with_logical_partitioning names"
                )
                continue
            unmapped = [n for n in names if isinstance(n, str) and n not in mapped]
            if unmapped:
                errors.append(
                    f"param {path} {shape}: logical axis name(s) {unmapped} have no entry in "
                    f"{field}; add ({unmapped[0]!r}, None) to replicate it or map it to a "
                    f"mesh axis"
                )
                continue
            spec = nn.logical_to_mesh_axes(names, rules)
            for dim, (n, entry) in enumerate(zip(names, spec)):
                t = total(entry)
                if t > 1 and shape[dim] % t:
                    axes = _axes_of(entry)
                    errors.append(
                        f"param {path} {shape}: dim {dim} ({n!r}, size {shape[dim]}) is sharded over "
                        f"mesh axes {axes} of total size {t}, which does not divide it; change "
                        f"{' / '.join('mesh.' + a for a in axes)} or the model width, or map {n!r} "
                        f"to None in {field}"
                    )
    if batch_size is not None:
        batch_axes = nn.logical_to_mesh_axes(("batch",), rules)[0] if "batch" in mapped else None
        t = total(batch_axes)
        if batch_size % t:
            errors.append(
                f"global batch size {batch_size} is not divisible by the batch mesh axes "
                f"{_axes_of(batch_axes)} (total {t}); make the batch a multiple of {t} or shrink "
                f"{' / '.join('mesh.' + a for a in _axes_of(batch_axes))}"
            )
    seq = sizes.get("sequence", 1)
    if num_heads is not None:
        head_axes = nn.logical_to_mesh_axes(("heads",), rules)[0] if "heads" in mapped else None
        t = total(head_axes)
        if num_heads % t:
            errors.append(
                f"model.heads={num_heads} is not divisible by the heads mesh axes "
                f"{_axes_of(head_axes)} (total {t}); change model.heads or "
                f"{' / '.join('mesh.' + a for a in _axes_of(head_axes))}"
            )
        elif sequence_strategy == "ulysses" and num_heads % (t * seq):
            errors.append(
                f"model.heads={num_heads} is not divisible by mesh.sequence={seq}"
                + (f" × heads axes {_axes_of(head_axes)} ({t})" if t > 1 else "")
                + ": Ulysses sequence parallelism splits the heads over the sequence axis; change "
                "model.heads or mesh.sequence, or use the 'ring' strategy"
            )
    if seq_len is not None and seq > 1 and seq_len < seq:
        errors.append(f"sequence length {seq_len} is shorter than mesh.sequence={seq}; reduce mesh.sequence")
    if errors:
        raise ValueError("\n".join(errors))
    return rules


def logical_to_sharding(logical_spec_tree: Any, mesh, rules: Any = None, *, field: str = "mesh.rules") -> Any:
    """Tree of ``NamedSharding`` from a tree of logical ``PartitionSpec`` (``nn.get_partition_spec``
    output) or directly from a boxed param tree. Unmapped names raise."""
    rules = rules_from_config(rules, field=field)
    if any(
        isinstance(x, nn.Partitioned) for x in jax.tree.leaves(logical_spec_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    ):
        logical_spec_tree = nn.get_partition_spec(logical_spec_tree)

    def one(spec):
        if spec is None:
            spec = PartitionSpec()
        return NamedSharding(mesh, logical_to_spec(tuple(spec), rules, field=field))

    return jax.tree.map(one, logical_spec_tree, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def check_not_replicated(
    params: Any, shardings: Any = None, *, min_bytes: int = 1 << 20, model_axes: Sequence[str] = ("fsdp", "tensor")
) -> None:
    """Raises if a param of ``>= min_bytes`` is fully replicated on a mesh whose ``model_axes``
    (fsdp / tensor) have total size > 1 — every device would hold a full copy.

    ``params`` may be arrays, ``ShapeDtypeStruct`` s or boxed (``nn.Partitioned``) leaves;
    ``shardings`` a matching tree of ``NamedSharding`` (default: each array's own ``.sharding``).
    """
    is_box = lambda x: isinstance(x, nn.Partitioned)
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)[0]
    leaves = [(p, l.value if is_box(l) else l) for p, l in leaves]
    if shardings is None:
        shards = [getattr(l, "sharding", None) for _, l in leaves]
    else:
        shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        if len(shards) != len(leaves):
            raise ValueError(
                f"check_not_replicated: {len(leaves)} params but {len(shards)} shardings; "
                f"pass shardings with the params' tree structure"
            )
    offenders = []
    for (path, leaf), sh in zip(leaves, shards):
        if sh is None or not hasattr(leaf, "shape"):
            continue
        mesh_shape = dict(getattr(getattr(sh, "mesh", None), "shape", {}) or {})
        if math.prod(mesh_shape.get(a, 1) for a in model_axes) <= 1:
            continue
        nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        if nbytes >= min_bytes and sh.is_fully_replicated:
            offenders.append((nbytes, jax.tree_util.keystr(path, simple=True, separator="/"), tuple(leaf.shape)))
    if offenders:
        offenders.sort(reverse=True)
        listed = "\n".join(f"  {p} {s}: {b / 2**20:.1f} MiB" for b, p, s in offenders[:10])
        more = f"\n  ... and {len(offenders) - 10} more" if len(offenders) > 10 else ""
        raise ValueError(
            f"{len(offenders)} param(s) of >= {min_bytes} bytes are fully replicated on a mesh with "
            f"{'/'.join(model_axes)} > 1 ({sum(b for b, _, _ in offenders) / 2**20:.1f} MiB on every "
            f"device):\n{listed}{more}\nfix: give them logical axis names (nn.with_logical_partitioning) "
            f"and map one dimension to fsdp or tensor in mesh.rules"
        )


def with_logical_constraint(x: jax.Array, names: Sequence[str | None], *, rules: Any = None) -> jax.Array:
    """Constrains ``x`` to the sharding its logical ``names`` map to; a no-op outside a mesh
    context (``jax.set_mesh``) and inside a fully manual ``shard_map``.

    ``rules`` default: flax's active ``nn.logical_axis_rules`` context, else :data:`DEFAULT_RULES`.
    Best effort by design: mesh axes that are absent, manual, or do not divide the dimension (a
    7-token audio stream over ``sequence=4``) are dropped, leaving that dimension replicated over
    them. An unmapped logical name is an error.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if not any(t == AxisType.Auto for t in types.values()):
        return x
    if len(names) != x.ndim:
        raise ValueError(f"with_logical_constraint: {len(names)} names {tuple(names)} for a {x.ndim}-d array")
    if rules is None:
        rules = tuple(nn.get_logical_axis_rules()) or DEFAULT_RULES
    spec = logical_to_spec(names, rules)
    sizes = dict(mesh.shape)
    out = []
    for dim, entry in zip(x.shape, spec):
        kept, prod = [], 1
        for a in _axes_of(entry):
            if types.get(a) == AxisType.Auto and dim % (prod * sizes[a]) == 0:
                kept.append(a)
                prod *= sizes[a]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*out))
