"""Serving bundles: a trained model as params + config + a serialised (``jax.export``) step function.

A bundle is everything a sampler needs without the training code or the model's Python source at
the version it was trained with (the step function is StableHLO; the codecs and the sampling loop
still come from the installed ``mmdit``)::

    BUNDLE/bundle.json            manifest (below); written last, so its presence marks a whole bundle
    BUNDLE/config.json            the resolved experiment config (``config_lib.to_json``)
    BUNDLE/denoise_step.jaxexport ``jax.export`` serialisation of ``sampler.denoise_step_fn``
    BUNDLE/params/                the unboxed params, an orbax ``StandardCheckpointer`` checkpoint

**Params format: orbax** ``StandardCheckpointer`` (not one msgpack blob), because a real bundle holds
5..20 GB of weights: orbax writes and reads per-array tensorstore chunks in parallel, never holds
the whole tree as one bytes object (``flax.serialization.to_bytes`` does, twice), and restores
straight onto a device mesh given abstract arrays with shardings. The abstract target comes from
the exported function's own input avals, so loading needs no model code.

**Step function.** ``(params, x_tokens, sigma_tokens, raw_conds, cond_keep, known, valid) ->
v_tokens`` (see :func:`mmdit.sample.sampler.denoise_step_fn`) exported with a **symbolic batch**
``b`` on every non-param input (``batch_symbolic=False``: a fixed batch of 1), so one bundle serves
any batch and any CFG structure (the sampler stacks the ``P·B`` guidance rows into ``b``). When the
model cannot be traced with a symbolic batch the step is exported in its per-sample form (``vmap``
of a batch-of-one call); ``bundle.json`` records which (``batching``). Platforms: ``cpu`` plus
``cuda`` and ``tpu`` where their lowering succeeds (multi-platform export works from any host).

**bundle.json**: ``format`` ("mmdit.bundle"), ``format_version``, ``created``, ``jax_version``,
``jaxlib_version``, ``step`` (training step or null), ``platforms``, ``skipped_platforms``
(``{platform: reason}``), ``batch`` ("b" or an int), ``batching`` ("native" | "per_sample"),
``files``, ``sha256`` of config.json, the export and every file under ``params/`` (``params/<path>``;
checked on load unless ``verify=False``, so a flipped bit in the weights fails before sampling), ``params`` (``format``, ``count``, ``bytes``,
``tree``: ``{path: [shape, dtype]}``), ``inputs`` / ``outputs`` (``{arg: {path: {shape, dtype}}}``,
shapes with "b"), ``in_tree`` / ``out_tree`` (pytree strings), ``guidance_order`` (the config's
guidance condition order, which the sorted JSON config loses).

Writes are atomic: the bundle is built in a sibling temp directory and ``os.replace``-d into place
(an existing bundle at the path is swapped out and deleted only afterwards). A killed export leaves
only ``.NAME.tmp-*`` siblings, removed by the next export to that path; one killed between the two
renames leaves the previous bundle in ``.NAME.old-*/bundle``, which the next export puts back first.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import ml_collections as mlc
import numpy as np

from mmdit import config_lib, config_spec
from mmdit.sample.sampler import denoise_step_fn, step_example_inputs
from mmdit.util.files import file_sha256

BUNDLE_FORMAT = "mmdit.bundle"
BUNDLE_VERSION = 1
MANIFEST = "bundle.json"
CONFIG = "config.json"
STEP = "denoise_step.jaxexport"
PARAMS = "params"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export lowering platforms
_ARG_NAMES = ("params", "x_tokens", "sigma_tokens", "raw_conds", "cond_keep", "known", "valid")

__all__ = ["Bundle", "export_bundle", "load_bundle", "BUNDLE_FORMAT", "BUNDLE_VERSION"]


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A loaded serving bundle: ``config`` (ConfigDict), ``params`` (unboxed jax arrays), ``step_fn``
    (the exported step, :func:`denoise_step_fn`'s signature), ``manifest`` (bundle.json), ``path``."""

    config: mlc.ConfigDict
    params: Any
    step_fn: Callable
    manifest: dict
    path: str


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _dim(d) -> Any:
    return d if isinstance(d, int) else str(d)


def _describe(tree) -> dict:
    """``{path: {"shape": [...], "dtype": str}}`` of a pytree of (abstract) arrays."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[jax.tree_util.keystr(path)] = {"shape": [_dim(d) for d in leaf.shape], "dtype": str(leaf.dtype)}
    return out


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


def _mismatches(want: dict, have: dict, limit: int = 5) -> list[str]:
    """Differences between two ``_describe`` dicts (missing, extra, shape/dtype), first ``limit``."""
    out = [f"missing {k}" for k in want if k not in have]
    out += [f"unexpected {k}" for k in have if k not in want]
    out += [
        f"{k}: {have[k]['shape']} {have[k]['dtype']} vs expected {want[k]['shape']} {want[k]['dtype']}"
        for k in want
        if k in have and want[k] != have[k]
    ]
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def _example_args(model, params_abstract, batch_symbolic: bool):
    """Abstract step arguments: params fixed, every other input with batch ``b`` (or 1)."""
    example = step_example_inputs(model, 1)
    if batch_symbolic:
        (b,) = jax.export.symbolic_shape("b")
        rows = jax.tree.map(lambda a: jax.ShapeDtypeStruct((b,) + a.shape[1:], a.dtype), example)
    else:
        rows = _abstract(example)
    return (params_abstract,) + tuple(rows)


def _export(model, args, platforms: Sequence[str]):
    """Exports the step for ``platforms``; native batching first, per-sample if that cannot trace."""
    try:
        return jax.export.export(jax.jit(denoise_step_fn(model)), platforms=tuple(platforms))(*args), "native"
    except jax.errors.InconclusiveDimensionOperation:
        fn = denoise_step_fn(model, per_sample=True)
        return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*args), "per_sample"


def _export_platforms(model, args, platforms: Sequence[str]):
    """Exports for as many of ``platforms`` as lower; returns (exported, batching, skipped)."""
    try:
        exp, batching = _export(model, args, platforms)
        return exp, batching, {}
    except Exception as e:  # noqa: BLE001 -- find which platform fails, keep the others
        if len(platforms) == 1:
            raise ValueError(
                f"cannot export the step for platform {platforms[0]!r}: {type(e).__name__}: {e}; "
                "check model.attention.impl (use 'xla' for a portable bundle)"
            ) from e
    ok, skipped = [], {}
    for p in platforms:
        try:
            _export(model, args, [p])
            ok.append(p)
        except Exception as e:  # noqa: BLE001
            skipped[p] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    if not ok:
        raise ValueError(
            f"the step lowers for none of {list(platforms)}: {skipped}; check "
            "model.attention.impl (use 'xla' for a portable bundle)"
        )
    exp, batching = _export(model, args, ok)
    return exp, batching, skipped


def _check_out_dir(out_dir: str) -> bool:
    """True when ``out_dir`` holds a bundle to replace; raises if it holds anything else."""
    if not os.path.lexists(out_dir):
        return False
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
        return False
    if os.path.isdir(out_dir) and (
        os.path.isfile(os.path.join(out_dir, MANIFEST)) or os.path.isdir(os.path.join(out_dir, PARAMS))
    ):
        return True
    raise ValueError(f"{out_dir} exists and is not a serving bundle (no {MANIFEST}); choose another --out path or remove it")


def _replace_dir(tmp: str, out_dir: str) -> None:
    """Moves the finished ``tmp`` to ``out_dir``; an existing bundle there is swapped out first and
    deleted afterwards, so at every instant ``out_dir`` is either the old or the new bundle (or,
    between the two renames, absent)."""
    if _check_out_dir(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
        os.replace(out_dir, os.path.join(old, "bundle"))
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty
    os.replace(tmp, out_dir)


def _recover_and_clean(out_dir: str) -> list[str]:
    """Before writing ``out_dir``: puts back a previous bundle a killed export left swapped out
    (``.NAME.old-*/bundle`` while ``out_dir`` is missing) and removes the temp directories of killed
    exports. Returns notes on what it did. The caller holds the path's lock."""
    parent, name = os.path.dirname(out_dir), os.path.basename(out_dir)
    if not os.path.isdir(parent):
        return []
    notes = []
    for entry in sorted(os.listdir(parent)):
        path = os.path.join(parent, entry)
        if entry.startswith(f".{name}.old-") and os.path.isdir(path):
            kept = os.path.join(path, "bundle")
            if not os.path.lexists(out_dir) and os.path.isfile(os.path.join(kept, MANIFEST)):
                os.replace(kept, out_dir)
                notes.append(f"restored the previous bundle {out_dir} that an interrupted export had moved aside")
            shutil.rmtree(path, ignore_errors=True)
        elif entry.startswith(f".{name}.tmp-") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            notes.append(f"removed {path}, left by an interrupted export")
    return notes


def params_checksums(params_dir: str) -> dict[str, str]:
    """``{"params/<relative path>": sha256}`` of every file under a bundle's ``params/``."""
    out = {}
    for root, _, names in os.walk(params_dir):
        for n in sorted(names):
            path = os.path.join(root, n)
            out[os.path.join(PARAMS, os.path.relpath(path, params_dir))] = file_sha256(path)
    return out


def export_bundle(
    cfg,
    params,
    out_dir: str,
    *,
    step: int | None = None,
    batch_symbolic: bool = True,
    platforms: Sequence[str] | None = None,
    note=None,
) -> str:
    """Writes a serving bundle (module docstring) for ``cfg`` + ``params`` to ``out_dir``, atomically.

    Args:
      cfg: the resolved experiment config (``cfg.model`` builds the model).
      params: the model params to serve (normally EMA), boxed or unboxed; must match ``cfg.model``.
      out_dir: bundle directory (created; an existing bundle there is replaced atomically).
      step: the training step the params come from (recorded in bundle.json).
      batch_symbolic: export with a symbolic batch ``b`` (default) instead of a fixed batch of 1.
      platforms: lowering platforms (default ``cpu``, ``cuda``, ``tpu``; those that fail to lower
        are skipped and listed in ``skipped_platforms``; an explicit single platform must lower).
      note: receives one-line notes (a recovered previous bundle, removed leftovers); default stderr.

    Returns:
      ``out_dir`` (absolute).
    """
    from mmdit.model.diffusion import DiffusionModel
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    bad = sorted(set(platforms or ()) - set(KNOWN_PLATFORMS))
    if bad or (platforms is not None and not list(platforms)):
        raise ValueError(f"--platforms {list(platforms or [])}: unknown platform(s) {bad}; choose from {list(KNOWN_PLATFORMS)}")
    for line in _recover_and_clean(out_dir):
        (note or (lambda m: print(f"note: {m}", file=sys.stderr)))(line)
    _check_out_dir(out_dir)  # fail before the expensive part
    model = DiffusionModel.from_config(cfg)
    params = nn.meta.unbox(params)
    want = _describe(jax.eval_shape(lambda k: nn.meta.unbox(model.init(k)), jax.random.key(0)))
    have = _describe(_abstract(params))
    if want != have:
        raise ValueError(
            f"params do not match cfg.model ({'; '.join(_mismatches(want, have))}); export the "
            "params with the config they were trained with"
        )
    args = _example_args(model, _abstract(params), batch_symbolic)
    exported, batching, skipped = _export_platforms(model, args, list(platforms or DEFAULT_PLATFORMS))

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        _write_synced(os.path.join(tmp, CONFIG), config_lib.to_json(cfg).encode())
        _write_synced(os.path.join(tmp, STEP), bytes(exported.serialize()))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS), params)
            ckptr.wait_until_finished()
        leaves = jax.tree.leaves(params)
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax_version": jax.__version__,
            "jaxlib_version": getattr(__import__("jaxlib"), "__version__", None),
            "step": step,
            "platforms": list(exported.platforms),
            "skipped_platforms": skipped,
            "batch": "b" if batch_symbolic else 1,
            "batching": batching,
            "files": {"config": CONFIG, "step": STEP, "params": PARAMS},
            "sha256": {
                CONFIG: file_sha256(os.path.join(tmp, CONFIG)),
                STEP: file_sha256(os.path.join(tmp, STEP)),
                **params_checksums(os.path.join(tmp, PARAMS)),
            },
            "params": {
                "format": "orbax.StandardCheckpointer",
                "count": int(sum(np.size(a) for a in leaves)),
                "bytes": int(sum(np.size(a) * np.dtype(a.dtype).itemsize for a in leaves)),
                "tree": {k: [v["shape"], v["dtype"]] for k, v in have.items()},
            },
            "inputs": {n: _describe(a) for n, a in zip(_ARG_NAMES[1:], args[1:])},
            "outputs": _describe(jax.tree.unflatten(exported.out_tree, exported.out_avals)),
            "in_tree": str(exported.in_tree),
            "out_tree": str(exported.out_tree),
            "guidance_order": list(config_spec.sample_spec(cfg, model.spec, check_tasks=False).guidance),
        }
        _write_synced(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=2).encode())  # last
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _first_line(e: BaseException, limit: int = 300) -> str:
    """The start of an exception's message (TensorStore errors carry a 70-line spec)."""
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:limit]


def _fail(path: str, what: str, fix: str = "re-export it with mmdit-export") -> ValueError:
    return ValueError(f"{path}: {what}; {fix}")


def _read_manifest(path: str) -> dict:
    if not os.path.isdir(path):
        raise _fail(path, "no such bundle directory", "pass the --out directory of mmdit-export")
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise _fail(file, "missing: not a serving bundle, or an export that did not finish")
    try:
        with open(file) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(file, f"is not valid JSON ({e}): the bundle is corrupt") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise _fail(file, f"format is {manifest.get('format')!r}, not {BUNDLE_FORMAT!r}: not a serving bundle")
    if manifest.get("format_version") != BUNDLE_VERSION:
        raise _fail(
            file,
            f"format_version {manifest.get('format_version')} is not the supported {BUNDLE_VERSION}",
            "re-export it with this version of mmdit",
        )
    return manifest


def _read_config(path: str, manifest: dict) -> mlc.ConfigDict:
    file = os.path.join(path, CONFIG)
    if not os.path.isfile(file):
        raise _fail(file, "missing: the bundle is incomplete")
    try:
        with open(file) as f:
            cfg = mlc.ConfigDict(json.load(f))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(file, f"is not valid JSON ({e}): the bundle is corrupt") from None
    order = manifest.get("guidance_order") or []
    guidance = cfg.get("sample", {}).get("guidance", None)
    if guidance is not None and set(order) == set(guidance):  # restore the nested-CFG order
        with cfg.sample.unlocked():
            cfg.sample.guidance = mlc.ConfigDict({c: guidance[c] for c in order})
    return cfg


def _read_export(path: str):
    file = os.path.join(path, STEP)
    if not os.path.isfile(file):
        raise _fail(file, "missing: the bundle is incomplete")
    with open(file, "rb") as f:
        data = f.read()
    try:
        return jax.export.deserialize(bytearray(data))
    except Exception as e:  # noqa: BLE001 -- flatbuffer errors come in many types
        raise _fail(
            file, f"cannot be deserialised ({type(e).__name__}: {e}): the file is corrupt or was written by an incompatible jax"
        ) from None


def _check_platform(file: str, exported) -> None:
    backend = jax.default_backend()
    names = {"gpu": ("cuda", "rocm")}.get(backend, (backend,))
    if not any(p in exported.platforms for p in names):
        raise _fail(
            file,
            f"was exported for {list(exported.platforms)}, but this process runs on {backend!r}",
            f"re-export with platforms including {names[0]!r}",
        )


def _verify_params(path: str, manifest: dict) -> None:
    """Every ``params/...`` file bundle.json lists exists and matches its sha256 (bundles written
    before params were hashed list none: nothing to check)."""
    listed = {k: v for k, v in manifest.get("sha256", {}).items() if k.startswith(PARAMS + "/")}
    for rel, digest in sorted(listed.items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            raise _fail(file, f"is missing (listed in {MANIFEST}): the bundle is incomplete")
        if file_sha256(file) != digest:
            raise _fail(
                file,
                f"does not match its sha256 in {MANIFEST}: the weights were modified or corrupted "
                "(pass --no-verify to skip this check)",
            )


def load_bundle(path: str, *, verify: bool = True) -> Bundle:
    """Loads and checks a bundle written by :func:`export_bundle`.

    Checks, each a ValueError naming the file and the fix: the manifest (present, format, version);
    config.json and the export (present, parse); the model that config.json describes has exactly
    the exported step's input tree and shapes (a config or export from another model fails here);
    both files match their sha256 in bundle.json; the exported platforms include this backend;
    params/ holds exactly the exported param tree (shapes and dtypes) before anything is restored;
    with ``verify`` (default), every params file matches its sha256 in bundle.json (reads every byte;
    ``verify=False`` skips only this check, for huge bundles).
    """
    from mmdit.model.diffusion import DiffusionModel
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    manifest = _read_manifest(path)
    cfg = _read_config(path, manifest)
    exported = _read_export(path)
    step_file, config_file = os.path.join(path, STEP), os.path.join(path, CONFIG)

    try:
        model = DiffusionModel.from_config(cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise _fail(config_file, f"does not describe a valid model ({e})") from None
    params_abstract = jax.eval_shape(lambda k: nn.meta.unbox(model.init(k)), jax.random.key(0))
    expected = _example_args(model, params_abstract, manifest.get("batch") == "b")
    got = jax.tree.unflatten(exported.in_tree, exported.in_avals)
    if not (isinstance(got, tuple) and len(got) == 2 and len(got[0]) == len(expected)):
        raise _fail(step_file, f"takes {exported.in_tree}, not the step function's 7 arguments")
    for name, want, have in zip(_ARG_NAMES, expected, got[0]):
        diff = _mismatches(_describe(want), _describe(have))
        if diff:
            raise _fail(
                step_file,
                f"and {CONFIG} come from different models: the exported step's {name} "
                f"differ from what {CONFIG} builds ({'; '.join(diff)})",
                "keep the files of one bundle together, or re-export it with mmdit-export",
            )
    for name in (CONFIG, STEP):
        digest = manifest.get("sha256", {}).get(name)
        if digest != file_sha256(os.path.join(path, name)):
            raise _fail(
                os.path.join(path, name),
                f"does not match its sha256 in {MANIFEST}: the file was modified, truncated or comes from another bundle",
            )
    _check_platform(step_file, exported)

    params_dir = os.path.join(path, PARAMS)
    if not os.path.isdir(params_dir):
        raise _fail(params_dir, "missing: the bundle is incomplete")
    want = got[0][0]
    try:
        with ocp.StandardCheckpointer() as ckptr:
            stored = ckptr.metadata(params_dir).item_metadata.tree
    except Exception as e:  # noqa: BLE001
        if verify:
            _verify_params(path, manifest)  # names the missing/damaged file when that is the cause
        raise _fail(params_dir, f"is not a readable orbax checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    stored_desc = _describe(jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored))
    diff = _mismatches(_describe(want), stored_desc)
    if diff:
        raise _fail(
            params_dir,
            f"holds weights of a different model than {STEP} ({'; '.join(diff)})",
            "keep the files of one bundle together, or re-export it with mmdit-export",
        )
    if verify:
        _verify_params(path, manifest)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), want)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(params_dir, target)
    except Exception as e:  # noqa: BLE001
        raise _fail(params_dir, f"cannot be restored ({type(e).__name__}: {_first_line(e)}): the checkpoint is corrupt") from None

    fixed = manifest.get("batch") if isinstance(manifest.get("batch"), int) else None

    def step_fn(params, x_tokens, sigma_tokens, raw_conds, cond_keep, known, valid):
        rows = next(iter(jax.tree.leaves(x_tokens))).shape[0]
        if fixed is not None and rows != fixed:
            raise ValueError(
                f"{step_file} was exported for a fixed batch of {fixed} rows (--fixed-batch) but is "
                f"called with {rows} (samples x CFG patterns); re-export without --fixed-batch"
            )
        return exported.call(params, x_tokens, sigma_tokens, raw_conds, cond_keep, known, valid)

    return Bundle(cfg, params, step_fn, manifest, path)
