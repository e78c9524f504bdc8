"""Device meshes from config: ``data × fsdp × sequence × tensor``, single- or multi-slice.

The config section (``config.mesh``, an ml_collections ``ConfigDict`` or a plain dict) names the
*total* size of each mesh axis; at most one axis may be ``-1`` and absorbs the devices left over::

    mesh = dict(data=1, fsdp=-1, sequence=2, tensor=1,      # 8 devices -> fsdp=4
                dcn=dict(data=2))                          # 2 slices: data spans the DCN

``dcn`` (optional) says how much of each axis crosses the slow network between slices/hosts: an
axis of size ``n`` with ``dcn=d`` is ``d`` slices × ``n/d`` devices within a slice (ICI). When the
product of ``dcn`` sizes is > 1 the device grid comes from
:func:`jax.experimental.mesh_utils.create_hybrid_device_mesh` (slices from ``device.slice_index``
on TPU, processes elsewhere), otherwise from ``create_device_mesh``. Axis order is outermost →
innermost, so ``tensor`` (the most communication-hungry) lands on the fastest links.

Meshes always use ``AxisType.Auto`` (docs/design.md, pitfalls: ``jax.make_mesh`` defaults to Explicit, which
changes how jit propagates shardings and breaks ``shard_map`` on unsharded inputs).

Every misconfiguration raises ``ValueError`` naming the config field and the fix, before anything
compiles. ``config.mesh.rules`` (logical axis rules, see :mod:`mmdit.parallel.rules`) may live in
the same section; :func:`make_mesh` ignores it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from mmdit.util.plain import plain

AXES: tuple[str, ...] = ("data", "fsdp", "sequence", "tensor")
_OTHER_KEYS = ("dcn", "rules")


def _as_dict(cfg: Any) -> dict:
    cfg = plain(cfg)
    if cfg is None:
        return {}
    if isinstance(cfg, dict):
        return cfg
    raise TypeError(f"mesh config must be a ConfigDict or a mapping, got {type(cfg).__name__}")


def _int_field(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{field}={value!r} must be an integer (a size, or -1 to fill); fix {field}")
    return int(value)


def axis_sizes(mesh_cfg: Any, *, field: str = "mesh") -> dict[str, int]:
    """Configured axis sizes ``{axis: size or -1}`` (ordered as :data:`AXES`; missing axes 1),
    checked without knowing the devices: known keys, integers, sizes >= 1 or one -1."""
    cfg = _as_dict(mesh_cfg)
    unknown = sorted(set(cfg) - set(AXES) - set(_OTHER_KEYS))
    if unknown:
        raise ValueError(
            f"{field}: unknown field(s) {[f'{field}.{k}' for k in unknown]}; the mesh axes are "
            f"{list(AXES)} (plus optional {field}.dcn and {field}.rules); rename or remove them"
        )
    sizes = {a: _int_field(cfg.get(a, 1), f"{field}.{a}") for a in AXES}
    fill = [a for a, n in sizes.items() if n == -1]
    if len(fill) > 1:
        raise ValueError(
            f"{field}: {', '.join(f'{field}.{a}' for a in fill)} are all -1; at most one mesh axis "
            f"may be -1 (auto-fill from the device count); give the others explicit sizes"
        )
    bad = [a for a, n in sizes.items() if n <= 0 and n != -1]
    if bad:
        a = bad[0]
        raise ValueError(
            f"{field}.{a}={sizes[a]} is not a valid mesh axis size; use a positive size "
            f"(1 to leave the axis unsharded) or -1 to fill from the device count"
        )
    return sizes


def resolve_mesh_shape(mesh_cfg: Any, num_devices: int, *, field: str = "mesh") -> dict[str, int]:
    """Total axis sizes ``{axis: size}`` (ordered as :data:`AXES`) for ``num_devices`` devices.

    Missing axes default to 1; one axis may be -1 and is filled so the product is ``num_devices``.
    """
    sizes = axis_sizes(mesh_cfg, field=field)
    fill = [a for a, n in sizes.items() if n == -1]
    known = math.prod(n for n in sizes.values() if n != -1)
    desc = " × ".join(f"{a}={n}" for a, n in sizes.items())
    if fill:
        a = fill[0]
        if num_devices % known:
            raise ValueError(
                f"{field}.{a}=-1 cannot be filled: the other axes ({desc}) multiply to {known}, "
                f"which does not divide the {num_devices} devices; make the product of the fixed "
                f"axes a divisor of {num_devices}"
            )
        sizes[a] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"{field}: axis sizes {desc} multiply to {known} but there are {num_devices} devices; "
            f"make the product of {', '.join(f'{field}.{a}' for a in AXES)} equal {num_devices}, "
            f"or set one of them to -1 to absorb the rest"
        )
    return sizes


def resolve_dcn_shape(mesh_cfg: Any, sizes: Mapping[str, int], *, field: str = "mesh") -> dict[str, int]:
    """Per-axis DCN (between-slice) sizes; each must divide the axis' total size."""
    dcn_cfg = _as_dict(_as_dict(mesh_cfg).get("dcn"))
    unknown = sorted(set(dcn_cfg) - set(AXES))
    if unknown:
        raise ValueError(
            f"{field}.dcn: unknown field(s) {[f'{field}.dcn.{k}' for k in unknown]}; "
            f"DCN sizes are given per mesh axis {list(AXES)}"
        )
    dcn = {a: _int_field(dcn_cfg.get(a, 1), f"{field}.dcn.{a}") for a in AXES}
    for a, d in dcn.items():
        if d <= 0:
            raise ValueError(
                f"{field}.dcn.{a}={d} is not valid; DCN sizes are positive (1 = the axis stays "
                f"within a slice); -1 is not supported here"
            )
        if sizes[a] % d:
            raise ValueError(
                f"{field}.dcn.{a}={d} does not divide {field}.{a}={sizes[a]}: an axis of size n "
                f"with dcn=d is d slices × n/d devices per slice; make {field}.{a} a multiple of "
                f"{d} or change {field}.dcn.{a}"
            )
    return dcn


def _granule_key(device) -> tuple[str, int]:
    try:
        return "slice_index", int(device.slice_index)
    except (AttributeError, TypeError):
        return "process_index", int(device.process_index)


def device_grid(mesh_cfg: Any, devices: Sequence[Any] | None = None, *, field: str = "mesh") -> np.ndarray:
    """The ``[data, fsdp, sequence, tensor]`` array of devices for ``mesh_cfg`` (no Mesh object).

    Split out of :func:`make_mesh` so the layout logic can be tested with stand-in devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_cfg, len(devices), field=field)
    dcn = resolve_dcn_shape(mesh_cfg, sizes, field=field)
    shape = [sizes[a] for a in AXES]
    n_dcn = math.prod(dcn.values())
    if n_dcn == 1:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    attr, _ = _granule_key(devices[0])
    n_granules = len({_granule_key(d)[1] for d in devices})
    if n_granules != n_dcn:
        unit = "slices" if attr == "slice_index" else "processes"
        raise ValueError(
            f"{field}.dcn: DCN sizes {dict((a, d) for a, d in dcn.items() if d > 1)} multiply to "
            f"{n_dcn} but the devices span {n_granules} {unit} ({attr}); make the product of "
            f"{field}.dcn.* equal {n_granules}, or drop {field}.dcn for a single slice"
        )
    ici = [sizes[a] // dcn[a] for a in AXES]
    return mesh_utils.create_hybrid_device_mesh(
        ici,
        [dcn[a] for a in AXES],
        devices,
        process_is_granule=(attr == "process_index"),
        allow_split_physical_axes=True,
    )


def make_mesh(mesh_cfg: Any, devices: Sequence[Any] | None = None, *, field: str = "mesh") -> Mesh:
    """A :class:`jax.sharding.Mesh` with axes ``("data", "fsdp", "sequence", "tensor")``, all Auto.

    ``devices`` defaults to ``jax.devices()`` (every device of every process). Raises ``ValueError``
    naming ``mesh.<field>`` on any misconfiguration.
    """
    grid = device_grid(mesh_cfg, devices, field=field)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def describe(mesh: Mesh) -> str:
    """``"data=2 fsdp=1 sequence=4 tensor=1 (8 devices)"`` for logs."""
    return " ".join(f"{a}={n}" for a, n in mesh.shape.items()) + f" ({mesh.size} devices)"
