"""Converted checkpoints on disk: ``save(out_dir, params, manifest)`` / ``load(out_dir) -> (manifest, params)``.

Layout of ``out_dir``::

    manifest.json   {"format": "mmdit-converted", "family", "target", "dtype", "params": {path: [shape, dtype]}, ...}
    params/         an orbax PyTree checkpoint of the nested params ({"params": {...}})

``manifest.json`` is written last, so a directory without it is not a finished checkpoint (``mmdit
convert`` additionally writes into a temporary directory and renames it). ``load`` restores either to
host numpy arrays, or -- given ``shardings`` (or a ``mesh``) -- directly as sharded ``jax.Array``s:
each device reads only its own shards from disk, no host holds a full copy per device.

This module is the lowest layer (jax, orbax, numpy only): codecs and encoders built from converted
checkpoints load through it without importing :mod:`mmdit.convert`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from mmdit.util import files

MANIFEST = "manifest.json"
PARAMS_DIR = "params"
FORMAT = "mmdit-converted"
FORMAT_VERSION = 1


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name  # "bfloat16" for ml_dtypes.bfloat16


def tree_spec(params) -> dict[str, list]:
    """``{"a/b/c": [shape, dtype name]}`` of every leaf of a nested dict of arrays."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        out[path_str(path)] = [list(np.shape(leaf)), _dtype_name(leaf.dtype)]
    return out


def path_str(path) -> str:
    """``"params/blocks/attn/kernel"`` from a jax key path."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
    return "/".join(parts)


def _no_copy_registry():
    """orbax type handlers that write host numpy arrays without first deep-copying them (orbax's
    default copies every host array -- a second full copy of a converted model in memory). Safe here:
    :func:`save` is synchronous and nothing mutates the arrays meanwhile."""
    th = ocp.type_handlers
    return th.create_type_handler_registry(
        (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, th.ArrayHandler()),
        (np.number, th.ScalarHandler()),
        (int, th.ScalarHandler()),
        (float, th.ScalarHandler()),
    )


def save(out_dir: str, params, manifest: dict) -> dict:
    """Writes ``params`` (nested dict of numpy/jax arrays) and ``manifest`` (JSON-able, gains
    ``format``, ``params`` spec and ``n_params``) into ``out_dir`` (created; must not hold a
    checkpoint already). Returns the manifest written."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, MANIFEST)) or os.path.exists(os.path.join(out_dir, PARAMS_DIR)):
        raise FileExistsError(f"{out_dir} already holds a converted checkpoint; write into a new directory")
    manifest = json.loads(json.dumps(manifest))  # what load() will return (tuples -> lists); fails early if not JSON-able
    manifest["format"] = FORMAT
    manifest["format_version"] = FORMAT_VERSION
    manifest["params"] = tree_spec(params)
    manifest["n_params"] = int(sum(int(np.prod(s)) for s, _ in manifest["params"].values()))
    # No compression: zstd buffers the compressed chunks in memory until the commit (~+80% of the
    # output measured on random bf16 weights), for a ~20% smaller file; weights barely compress.
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_no_copy_registry(), use_compression=False)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(os.path.join(out_dir, PARAMS_DIR), args=ocp.args.PyTreeSave(params))
    files.write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def read_manifest(out_dir: str) -> dict:
    """``out_dir/manifest.json``; FileNotFoundError naming it (and the fix) when absent or not ours."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"{out_dir}: no such directory; create it with `mmdit convert --from HF_DIR --to {out_dir}`")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {out_dir} is not a finished converted checkpoint (an interrupted conversion?); "
            f"run `mmdit convert --from HF_DIR --to {out_dir} --force` again"
        )
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}; not written by `mmdit convert`")
    if not os.path.isdir(os.path.join(out_dir, PARAMS_DIR)):
        raise FileNotFoundError(f"{os.path.join(out_dir, PARAMS_DIR)} not found (manifest present); convert again with --force")
    return manifest


def is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


def _unflatten(spec: dict[str, list], leaf: Callable[[str, tuple, str], Any]) -> dict:
    tree: dict = {}
    for key, (shape, dtype) in spec.items():
        node = tree
        parts = key.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = leaf(key, tuple(shape), dtype)
    return tree


def abstract_params(manifest: dict) -> dict:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves (from the manifest; no disk reads)."""
    return _unflatten(manifest["params"], lambda _k, shape, dtype: jax.ShapeDtypeStruct(shape, np.dtype(dtype)))


def tree_metadata(orbax_dir: str) -> dict[str, list]:
    """``{"a/b/c": [shape, dtype name]}`` of every array in any orbax PyTree checkpoint directory
    (converted params, a serving bundle's ``params/``, a training step's ``state/``); reads metadata only."""
    with _without_step_metadata_warning(), ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(orbax_dir)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
    if tree is None:
        tree = getattr(meta, "item_metadata", meta)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            out[path_str(path)] = [list(leaf.shape), _dtype_name(leaf.dtype)]
    return out


def restore_tree(orbax_dir: str, spec: dict[str, list], shardings=None, partial: bool = False):
    """The arrays listed in ``spec`` (``{path: [shape, dtype]}``, e.g. from :func:`tree_metadata`)
    from an orbax PyTree checkpoint, as a nested dict.

    ``shardings`` as in :func:`load`; a callable may return None for a leaf to read it to host
    numpy. ``partial=True`` reads only the listed leaves of a checkpoint holding more (e.g. only the
    EMA of a training state)."""
    if isinstance(shardings, jax.sharding.Sharding):
        one = shardings
        pick = lambda k, s: one  # noqa: E731
    elif shardings is None or callable(shardings):
        pick = shardings or (lambda k, s: None)
    else:
        flat = {path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
        missing = sorted(set(spec) - set(flat))
        if missing:
            raise ValueError(f"{orbax_dir}: no sharding given for {missing[0]} (and {len(missing) - 1} more)")
        pick = lambda k, s: flat[k]  # noqa: E731

    def args(key, shape, dtype):
        sh = pick(key, shape)
        if sh is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.dtype(dtype))
        return ocp.ArrayRestoreArgs(restore_type=jax.Array, sharding=sh, global_shape=shape, dtype=np.dtype(dtype))

    restore_args = _unflatten(spec, args)
    item = _unflatten(spec, lambda _k, shape, dtype: jax.ShapeDtypeStruct(shape, np.dtype(dtype)))
    with _without_step_metadata_warning(), ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(
            orbax_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=partial)
        )


class _StepMetadataWarning(logging.Filter):
    """Drops orbax's "Metadata file does not exist" warning: a tree restored on its own (a converted
    checkpoint's ``params/``, a training step's ``state/``) has no step-level ``_CHECKPOINT_METADATA`` by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Metadata file does not exist")


@contextlib.contextmanager
def _without_step_metadata_warning():
    quiet, logger = _StepMetadataWarning(), logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def load(out_dir: str, mesh: jax.sharding.Mesh | None = None, shardings=None):
    """``(manifest, params)`` of a converted checkpoint.

    ``shardings``: None -> host numpy arrays (or, with ``mesh``, arrays replicated on ``mesh``); a
    single ``jax.sharding.Sharding`` for every leaf; a pytree of shardings matching the params; or a
    callable ``(path "a/b/c", shape) -> Sharding`` (None: that leaf to host numpy). Sharded leaves
    are read directly into their shards.
    """
    out_dir = os.path.abspath(out_dir)
    manifest = read_manifest(out_dir)
    if shardings is None and mesh is not None:
        shardings = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return manifest, restore_tree(os.path.join(out_dir, PARAMS_DIR), manifest["params"], shardings)
