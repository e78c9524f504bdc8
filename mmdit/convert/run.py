"""``convert_dir(src_dir, out_dir, family=None, dtype="float32")``: one Hugging Face model folder ->
one converted checkpoint (:mod:`mmdit.util.converted`).

Steps: resolve the folder (a diffusers pipeline folder -> the one component the family converts),
read ``config.json``, pick the family (``--family`` or auto-detection) and let it ``check`` the
config, checksum every input file, stream the tensors through the family's ``convert`` (one tensor
in memory at a time, cast to the output dtype as it goes), then write params + ``manifest.json``
into ``<out>.tmp-<pid>`` and rename that to ``<out>``. An interrupted conversion leaves only the
temporary directory (removed by the next run); an existing ``<out>`` is kept unless it was converted
from the same files with the same settings (then nothing is done) or ``force=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import numpy as np

from mmdit.convert import registry
from mmdit.convert.source import (
    CONFIG_FILE,
    PIPELINE_INDEX,
    ConvertError,
    TensorSource,
    np_dtype,
    read_config,
    read_json,
    unused,
)
from mmdit.util import converted, files

TMP_MARK = ".tmp-"
DTYPES = ("float32", "bfloat16")


def mmdit_version() -> str:
    try:
        from importlib.metadata import version

        return version("mmdit")
    except Exception:
        return "unknown"


def resolve_component(src_dir: str, family=None) -> tuple[str, object]:
    """``(model folder, family)`` (``family`` a name, a family module or None; the result is the name
    or module given, else the detected name). A diffusers pipeline folder (``model_index.json``) resolves to
    the component subfolder the family matches (the one whose config matches any family when
    ``family`` is None -- several is an error naming them)."""
    src_dir = os.path.abspath(src_dir)
    if not os.path.isdir(src_dir):
        raise ConvertError(f"{src_dir}: not a directory; --from takes the folder `huggingface-cli download --local-dir` wrote")
    if os.path.isfile(os.path.join(src_dir, CONFIG_FILE)) or not os.path.isfile(os.path.join(src_dir, PIPELINE_INDEX)):
        subs = sorted(e for e in os.listdir(src_dir) if os.path.isfile(os.path.join(src_dir, e, CONFIG_FILE)))
        if subs and not os.path.isfile(os.path.join(src_dir, CONFIG_FILE)):
            raise ConvertError(
                f"{os.path.join(src_dir, CONFIG_FILE)} not found; the model folders are below it ({', '.join(subs[:6])}): "
                f"point --from at one, e.g. {os.path.join(src_dir, subs[0])}"
            )
        hf_config = read_config(src_dir)
        name = registry.detect(hf_config, os.path.join(src_dir, CONFIG_FILE)) if family is None else family
        return src_dir, name
    index = read_json(os.path.join(src_dir, PIPELINE_INDEX), "pipeline index")
    candidates = []
    for comp in sorted(k for k in index if not k.startswith("_")):
        sub = os.path.join(src_dir, comp)
        if not os.path.isfile(os.path.join(sub, CONFIG_FILE)):
            continue
        cfg = read_config(sub)
        if family is not None:
            if registry.get(family).matches(cfg):  # family: a name or a module
                candidates.append((sub, family))
            continue
        try:
            candidates.append((sub, registry.detect(cfg, os.path.join(sub, CONFIG_FILE))))
        except ConvertError:
            continue
    if len(candidates) == 1:
        return candidates[0]
    comps = [k for k in index if not k.startswith("_")]
    if not candidates:
        what = f"--family {registry.get(family).NAME}" if family else "any converter family"
        raise ConvertError(
            f"{os.path.join(src_dir, PIPELINE_INDEX)}: no component of this pipeline ({', '.join(comps)}) matches {what}; "
            f"point --from at the component folder (e.g. {os.path.join(src_dir, comps[0] if comps else 'transformer')})"
        )
    listed = ", ".join(f"{os.path.basename(d)} ({f})" for d, f in candidates)
    raise ConvertError(
        f"{src_dir} is a pipeline with several convertible components: {listed}; convert one at a time -- "
        "pass --family NAME or point --from at the component folder"
    )


def _input_checksums(directory: str, src: TensorSource) -> dict[str, str]:
    rels = [CONFIG_FILE] + src.files()
    return {rel: files.file_sha256(os.path.join(directory, rel)) for rel in rels}


def _same(manifest: dict, want: dict) -> bool:
    keys = ("family", "target", "dtype", "source_files")
    as_json = lambda v: json.loads(json.dumps(v))  # noqa: E731 -- tuples in `want` are lists once written
    return all(manifest.get(k) == as_json(want.get(k)) for k in keys)


def _clean_stale_tmp(out_dir: str) -> None:
    parent, base = os.path.split(out_dir)
    for entry in os.listdir(parent or "."):
        if not entry.startswith(base + TMP_MARK):
            continue
        pid = entry[len(base + TMP_MARK) :]
        alive = False
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
                alive = int(pid) != os.getpid()
            except OSError:
                alive = False
        if not alive:
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _finalise(params: dict, dtype: np.dtype) -> dict:
    """Checks every leaf is a numpy array; floating leaves are cast to ``dtype`` in place (one at a time)."""

    def fix(path, leaf):
        if not isinstance(leaf, (np.ndarray, np.generic)):
            raise TypeError(f"converter returned {type(leaf).__name__} at {converted.path_str(path)}; expected numpy arrays")
        leaf = np.asarray(leaf)
        if leaf.dtype != dtype and (np.issubdtype(leaf.dtype, np.floating) or leaf.dtype.name == "bfloat16"):
            leaf = leaf.astype(dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(fix, params)


def convert_dir(
    src_dir: str,
    out_dir: str,
    family=None,
    dtype: str = "float32",
    force: bool = False,
    allow_unused: bool = False,
    log=print,
) -> dict:
    """Converts the model in ``src_dir`` into ``out_dir``; returns the manifest written (or the
    existing one when ``out_dir`` already holds this very conversion).

    ``family``: a ``--family`` name, a family module, or None (auto-detect from ``config.json``).
    ``dtype``: output dtype of the floating params, ``"float32"`` or ``"bfloat16"``.
    ``allow_unused``: source tensors the family never read are an error unless this is set (a
    family lists tensors it deliberately drops as fnmatch patterns in an optional
    ``IGNORED(hf_config) -> iterable of str``, e.g. ``{"lm_head.*", "text_model.*"}``).
    """
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out_dir = os.path.abspath(out_dir)
    model_dir, fam = resolve_component(src_dir, family)
    mod = registry.get(fam)
    config_path = os.path.join(model_dir, CONFIG_FILE)
    hf_config = read_config(model_dir)
    if family is not None and not mod.matches(hf_config):
        raise ConvertError(
            f"{config_path}: this is not a {mod.NAME} checkpoint ({registry.config_summary(hf_config)}); "
            f"{mod.NAME} converts {mod.DESCRIPTION} -- pass the right --family or omit it to auto-detect"
        )
    mod.check(hf_config)
    target = mod.target(hf_config)
    src = TensorSource(model_dir)
    src.names()  # index completeness
    t0 = time.time()
    want = {
        "family": mod.NAME,
        "target": target,
        "dtype": dtype,
        "source_dir": model_dir,
        "source_config": hf_config,
        "source_files": _input_checksums(model_dir, src),
        "mmdit_version": mmdit_version(),
    }
    if os.path.exists(out_dir):
        if converted.is_converted(out_dir):
            have = converted.read_manifest(out_dir)
            if _same(have, want):
                log(f"{out_dir}: already converted from these files ({mod.NAME}, {dtype}); nothing to do")
                return have
            if not force:
                raise ConvertError(
                    f"{out_dir} holds a different converted checkpoint ({have.get('family')}, {have.get('dtype')}, "
                    f"from {have.get('source_dir')}); choose another --to or pass --force to replace it"
                )
        elif not os.path.isdir(out_dir) or os.listdir(out_dir):  # never replaced, even with --force
            raise ConvertError(
                f"{out_dir} exists and is not a converted checkpoint (nor an empty directory); choose another --to"
            )
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    _clean_stale_tmp(out_dir)
    log(f"converting {model_dir} as {mod.NAME} -> {out_dir} ({dtype})")
    params = mod.convert(src, hf_config, np_dtype(dtype))
    ignored = list(getattr(mod, "IGNORED", lambda _c: ())(hf_config))
    left = unused(src, ignored)
    if left and not allow_unused:
        raise ConvertError(
            f"{model_dir}: {len(left)} tensor(s) were not converted (e.g. {', '.join(left[:3])}); the checkpoint has parts "
            f"the {mod.NAME} converter does not know -- a newer/different variant of the model (check {config_path})"
        )
    params = _finalise(params, np_dtype(dtype))
    want["convert_seconds"] = round(time.time() - t0, 2)
    tmp = out_dir + TMP_MARK + str(os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        manifest = converted.save(tmp, params, want)
        del params
        files.fsync_path(tmp)
        if os.path.exists(out_dir):  # force: move the old one aside, then swap
            old = out_dir + ".old" + TMP_MARK + str(os.getpid())
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        files.fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out_dir}: {manifest['n_params']:,} params ({dtype})")
    return manifest
