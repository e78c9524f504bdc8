"""``train.init_from`` / ``mmdit-train --init-from PATH``: start a fresh run from pretrained weights.

The source is one of

* a **converted checkpoint** (``mmdit convert``: ``manifest.json`` + ``params/``), e.g. the Wan2.1
  DiT converted as a video-only model;
* an mmdit **training workdir** (``checkpoints/<step>/state``: the latest step's EMA params);
* an mmdit **serving bundle** (``bundle.json`` + ``params/``).

Every source param is matched by its path to a param of this run's freshly initialised model
(``dit/params/blocks/video/attn/to_q/kernel`` ...). A source tree rooted at ``params/`` (a converted
DiT) is placed under ``dit/`` automatically. Then:

* same path, same shape -> **loaded** (cast to the master-weight dtype, read straight into the
  param's sharding: no host holds the full model per device);
* a param of the model with no source -> **fresh** (e.g. a new audio stream, new cross-attention);
* a source param with no counterpart, or with a different shape -> an **error** naming the path,
  unless it matches one of the fnmatch patterns in ``train.init_from_ignore`` (then **ignored**).

A report (counts and the paths, grouped) is printed; the EMA starts equal to the initialised params.
Only a run with no checkpoint of its own is initialised: a resumed run restores its checkpoint.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from mmdit.train import checkpoint
from mmdit.util import converted

BUNDLE_MANIFEST = "bundle.json"  # mmdit.serve.export.MANIFEST (serve is a higher layer: not imported)
TRAIN_SOURCE_TREE = "ema"  # which params of a training checkpoint initialise the run


@dataclasses.dataclass
class Source:
    """Where the params come from: ``orbax_dir`` (a PyTree checkpoint), ``root`` (the subtree of it
    holding the params, "" for all), ``spec`` ``{path under root: [shape, dtype]}``."""

    kind: str  # converted | workdir | bundle
    path: str
    orbax_dir: str
    root: str
    spec: dict
    note: str = ""


@dataclasses.dataclass
class Plan:
    """What :func:`plan` decided: target path -> source path for ``loaded``; the rest by name."""

    prefix: str
    loaded: dict[str, str]
    fresh: list[str]
    ignored: list[str]

    def report(self, source: Source, limit: int = 12) -> str:
        lines = [
            f"init_from {source.path} ({source.kind}{', ' + source.note if source.note else ''}): "
            f"{len(self.loaded)} loaded, {len(self.fresh)} fresh, {len(self.ignored)} ignored"
            + (f" (source placed under {self.prefix!r})" if self.prefix else "")
        ]
        for title, paths in (("loaded", list(self.loaded)), ("fresh", self.fresh), ("ignored", self.ignored)):
            for group, n in _groups(paths)[:limit]:
                lines.append(f"  {title:<8} {group} ({n})")
            if len(_groups(paths)) > limit:
                lines.append(f"  {title:<8} ... {len(_groups(paths)) - limit} more groups")
        return "\n".join(lines)


def _groups(paths: Iterable[str], depth: int = 4) -> list[tuple[str, int]]:
    """Paths grouped by their first ``depth`` components (``dit/params/blocks/audio``), with counts."""
    out: dict[str, int] = {}
    for p in paths:
        key = "/".join(p.split("/")[:depth])
        out[key] = out.get(key, 0) + 1
    return sorted(out.items())


def open_source(path: str) -> Source:
    """Recognises ``path`` (converted checkpoint, training workdir, serving bundle); reads metadata only."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"train.init_from={path!r} does not exist; give a converted checkpoint (mmdit convert --to), "
            "a training workdir or a serving bundle"
        )
    if os.path.isfile(os.path.join(path, converted.MANIFEST)):
        manifest = converted.read_manifest(path)
        note = f"family {manifest.get('family')}, {manifest.get('dtype')}"
        return Source("converted", path, os.path.join(path, converted.PARAMS_DIR), "", dict(manifest["params"]), note)
    if os.path.isfile(os.path.join(path, BUNDLE_MANIFEST)):
        d = os.path.join(path, "params")
        return Source("bundle", path, d, "", converted.tree_metadata(d))
    ckpt_root = os.path.join(path, "checkpoints")
    if os.path.isdir(ckpt_root):
        steps = sorted(int(s) for s in os.listdir(ckpt_root) if s.isdigit())
        for step in reversed(steps):
            d = os.path.join(ckpt_root, str(step), "state")
            if os.path.isdir(d) and os.path.isfile(os.path.join(d, "_METADATA")):
                full = converted.tree_metadata(d)
                root = TRAIN_SOURCE_TREE + "/"
                spec = {k[len(root) :]: v for k, v in full.items() if k.startswith(root)}
                if not spec:
                    raise ValueError(f"{d}: a training checkpoint without {TRAIN_SOURCE_TREE!r} params; is it an mmdit run?")
                return Source("workdir", path, d, TRAIN_SOURCE_TREE, spec, f"step {step} {TRAIN_SOURCE_TREE}")
        raise FileNotFoundError(f"train.init_from={path!r}: {ckpt_root} holds no complete checkpoint; train it first")
    raise FileNotFoundError(
        f"train.init_from={path!r} is not a converted checkpoint ({converted.MANIFEST} missing), a serving bundle "
        f"({BUNDLE_MANIFEST} missing) or a training workdir (checkpoints/ missing); convert it with `mmdit convert`"
    )


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def plan(source_spec: dict, target_spec: dict, ignore: Iterable[str] = (), source_name: str = "source") -> Plan:
    """Matches source params to target params by path (see module docstring); raises ValueError
    naming the first offending path(s) for an unmatched source param or a shape mismatch that no
    ``ignore`` pattern (fnmatch over the *source* path or the target path) allows."""
    ignore = tuple(ignore)
    prefix = ""
    roots = {k.split("/")[0] for k in source_spec}
    if not roots & {k.split("/")[0] for k in target_spec}:
        for cand in ("dit/",):  # a converted DiT is rooted at params/; the model's DiT lives under dit/
            if any(cand + k in target_spec for k in source_spec):
                prefix = cand
    loaded, ignored, unmatched, mismatched = {}, [], [], []
    for key, (shape, _dtype) in sorted(source_spec.items()):
        tgt = prefix + key
        if tgt in target_spec and list(target_spec[tgt][0]) == list(shape):
            loaded[tgt] = key
        elif _matches(key, ignore) or _matches(tgt, ignore):
            ignored.append(key)
        elif tgt in target_spec:
            mismatched.append(f"{tgt}: source {list(shape)}, model {list(target_spec[tgt][0])}")
        else:
            unmatched.append(key)
    if mismatched or unmatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched[:5]))
        if unmatched:
            parts.append(f"{len(unmatched)} {source_name} param(s) with no counterpart in the model: " + ", ".join(unmatched[:5]))
        raise ValueError(
            f"train.init_from ({source_name}): " + " | ".join(parts) + ". Fix model config to match the source, or allow "
            "them with train.init_from_ignore patterns (fnmatch, e.g. 'params/blocks/video/ffn/*')"
        )
    fresh = sorted(k for k in target_spec if k not in loaded)
    if not loaded:
        raise ValueError(f"train.init_from ({source_name}): no param of the source matches the model; wrong checkpoint?")
    return Plan(prefix, loaded, fresh, sorted(ignored))


def load_params(source: Source, the_plan: Plan, target_params, shardings=None):
    """The model params with every ``loaded`` leaf replaced by the source's (read into the target
    leaf's sharding and cast to its dtype); other leaves kept (fresh init)."""
    flat_sh = {}
    if shardings is not None:
        flat_sh = {converted.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    by_source = {src: tgt for tgt, src in the_plan.loaded.items()}
    root = source.root + "/" if source.root else ""
    spec = {root + k: source.spec[k] for k in by_source}
    pick: Callable = lambda key, shape: flat_sh.get(by_source[key[len(root) :]])  # noqa: E731
    restored = converted.restore_tree(source.orbax_dir, spec, pick, partial=bool(root) or len(spec) < len(source.spec))
    got = {converted.path_str(p)[len(root) :]: x for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}

    def place(path, leaf):
        key = converted.path_str(path)
        src = the_plan.loaded.get(key)
        if src is None:
            return leaf
        x = got[src]
        if isinstance(x, np.ndarray):
            x = (
                jax.device_put(x.astype(leaf.dtype), flat_sh.get(key))
                if flat_sh.get(key) is not None
                else jnp.asarray(x, leaf.dtype)
            )
        return x.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(place, target_params)


def source_prediction(source: Source) -> str | None:
    """What ``source``'s output heads predict (``model.prediction``): ``velocity`` for a converted checkpoint
    (every ported family is a flow model with velocity heads), the saved config's for a training workdir or a
    bundle (``velocity`` when it predates the field), None when no config is found."""
    if source.kind == "converted":
        return "velocity"
    if not os.path.isfile(os.path.join(source.path, "config.json")):
        return None
    return checkpoint.load_config(source.path).get("model", {}).get("prediction", None) or "velocity"


def init_state_from(state, path: str, ignore: Iterable[str] = (), shardings=None, log=print, prediction: str | None = None):
    """``state`` (a fresh :class:`mmdit.train.state.TrainState`) with params and EMA initialised
    from ``path``; ``shardings``: the params' shardings (``run.state_shardings.params``). ``prediction``: the
    new model's ``model.prediction``; a note is logged when the source's heads were trained for the other one
    (the weights load, but the heads start out predicting the wrong quantity)."""
    source = open_source(path)
    target_spec = converted.tree_spec(state.params)
    the_plan = plan(source.spec, target_spec, ignore, source_name=path)
    log(the_plan.report(source))
    had = source_prediction(source)
    if prediction is not None and had is not None and had != prediction:
        log(
            f"note: train.init_from={path} was trained with {had} heads and this model predicts {prediction} "
            "(model.prediction): its output heads start out predicting the wrong quantity and must re-learn it"
        )
    params = load_params(source, the_plan, state.params, shardings)
    return state.replace(params=params, ema=jax.tree_util.tree_map(jnp.copy, params))
