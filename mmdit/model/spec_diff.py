"""Which ``model.*`` fields of two configs build different models, compared on the *built* spec.

Two ``model`` sections can spell one model differently: a derived condition's ``dim`` left unset (taken
from its stream) or written out, ``model.time_reference`` unset or naming the stream it defaults to,
``joint_layers`` ``"all"`` or every index. :func:`model_differences` builds both sections with
:func:`mmdit.model.spec.build_spec` and compares the resulting :class:`~mmdit.model.spec.ModelSpec`
field by field (:func:`spec_fields`), so such configs are equal, while every real difference is
named by its config path (``model.conditions.first_frame.dim``). The ``model.*`` fields the spec does
not read (``text_encoder``, ``roles``) are compared as written.

Used where a saved config meets a new one: resuming a workdir (:func:`mmdit.train.checkpoint.check_config_matches`)
and a distillation teacher against its student (:mod:`mmdit.distill.teacher`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import jax.numpy as jnp
from mmdit.model.spec import ModelSpec, build_spec
from mmdit.util.plain import config_from_json

# model.* keys that build_spec reads: compared on the built spec; any other key is compared as written.
SPEC_KEYS = (
    "streams",
    "conditions",
    "num_layers",
    "heads",
    "head_dim",
    "joint_layers",
    "mask",
    "chunk_frames",
    "rope_theta",
    "freq_dim",
    "eps",
    "dtype",
    "param_dtype",
    "remat",
    "scan",
    "attention",
    "sequence_parallel",
    "time_reference",
    "joint_guidance",
    "prediction",
)


def spec_fields(spec: ModelSpec) -> dict:
    """The built model as a plain nested dict keyed like the config (``streams.<s>.shape``,
    ``conditions.<c>.dim``, ``mask``...), every default and derived value filled in. Per-token
    times and the reference rate are left out: they follow from the stream fields and
    ``time_reference``, which are in."""
    streams = {}
    for a in spec.streams:
        g = a.geometry
        streams[a.name] = {
            "kind": g.kind,
            "channels": g.channels,
            "shape": list(g.shape),
            "patch": list(g.patch),
            "rate": g.rate,
            "condition": g.condition,
            "dim": a.dim,
            "ffn": a.ffn,
            "cross": list(a.cross),
            "time_factor": a.time_factor,
            "concat": list(a.concat),
            "key_frame_embedding": a.key_frame_embedding,
        }
    conditions = {
        c.name: {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "name"} for c in spec.conditions
    }
    return {
        "streams": streams,
        "conditions": conditions,
        "num_layers": spec.num_layers,
        "heads": spec.heads,
        "head_dim": spec.head_dim,
        "joint_layers": list(spec.joint_layers),
        "mask": str(spec.rule),
        "chunk_frames": spec.chunk_frames,
        "rope_theta": spec.rope_theta,
        "freq_dim": spec.freq_dim,
        "eps": spec.eps,
        "dtype": jnp.dtype(spec.dtype).name,
        "param_dtype": jnp.dtype(spec.param_dtype).name,
        "remat": spec.remat,
        "scan": spec.scan,
        "attention": dataclasses.asdict(spec.attention),
        "sequence_parallel": spec.sequence_parallel,
        "time_reference": spec.time_reference,
        "joint_guidance": spec.joint_guidance,
        "prediction": spec.prediction,
    }


def _diff(a, b, path: str, skip: set, say: Callable[[str, object, object], str]) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if f"{path}.{k}" not in skip:
                out += _diff(a.get(k), b.get(k), f"{path}.{k}", skip, say)
        return out
    norm = lambda v: list(v) if isinstance(v, tuple) else v
    return [] if norm(a) == norm(b) else [say(path, a, b)]


def was_now(path: str, before, after) -> str:
    """The default wording of one difference: ``model.heads was 2, now 4``."""
    return f"{path} was {before!r}, now {after!r}"


def model_differences(
    before: dict, after: dict, *, ignore: Iterable[str] = (), say: Callable[[str, object, object], str] = was_now
) -> list[str]:
    """One line per ``model.*`` field in which the models of two ``model`` sections differ.

    Args:
      before: the saved section (a plain JSON dict: a workdir's ``config.json["model"]``).
      after: the new section (a plain JSON dict, ``json.loads(config_lib.to_json(cfg))["model"]``).
      ignore: top-level ``model.*`` keys never compared (execution choices: ``attention``, ``remat``...).
      say: ``(path, before value, after value) -> line``.

    Fields :func:`mmdit.model.spec.build_spec` reads are compared on the built specs
    (:func:`spec_fields`); the others as written. ``after`` must build (its errors name the field and
    pass through); a saved section that no longer builds (a config of an older version) is compared
    as written throughout.
    """
    skip = {f"model.{k}" for k in ignore}
    new = spec_fields(build_spec(config_from_json(after)))
    try:
        old = spec_fields(build_spec(config_from_json(before)))
    except (ValueError, KeyError, TypeError, AttributeError):
        return _diff(before, after, "model", skip, say)
    rest = lambda m: {k: v for k, v in m.items() if k not in SPEC_KEYS}
    return sorted(_diff(old, new, "model", skip, say) + _diff(rest(before), rest(after), "model", skip, say))
