"""Derived conditions: per-token condition features the model computes from its own input tokens.

A condition declared with ``model.conditions.<c>.derived`` is never read from records or sampler
inputs (it has no field in :mod:`mmdit.model.inputs`); :func:`derived_conditions` computes it from the
tokens the model is given, in :meth:`mmdit.model.diffusion.DiffusionModel.velocity` (training, the
bidirectional sampler, eval, an exported step) and in ``StreamingSampler.start`` (from the given image,
so every chunk sees it). It is dropped like any condition: ``cond_keep[c]`` False zeroes it, and the
task decides ``present[c]`` (:mod:`mmdit.tasks`).

Kinds:

* ``first_frame`` -- the video's identity reference (Wan2.1 I2V's image latents concatenated to the
  noisy latents along channels): the first latent frame of the (grid) stream that concatenates it
  (``model.streams.<video>.concat``), tiled over every latent frame, so each token sees the reference
  at its own spatial position. ``[B, S_v, C_v * prod(patch_v)]``; ``dim`` = the stream's token width,
  ``length`` = its tokens. Present exactly when the task gives that first frame clean (``ti2av``), so
  the value read from the (then known, σ = 0) first-frame tokens is the given image.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

FIRST_FRAME = "first_frame"
DERIVED_KINDS = (FIRST_FRAME,)


def source_stream(spec, name: str) -> str:
    """The stream a derived condition ``name`` is computed from: the one whose ``concat`` names it."""
    for a in spec.streams:
        if name in a.concat:
            return a.name
    raise KeyError(f"derived condition {name!r} is not in any model.streams.*.concat")


def first_frame_conditions(spec) -> dict[str, str]:
    """``{condition: source stream}`` of the ``first_frame`` conditions of a ``ModelSpec``."""
    return {c.name: source_stream(spec, c.name) for c in spec.conditions if c.derived == FIRST_FRAME}


def first_frame_condition(geometry, tokens: jax.Array) -> jax.Array:
    """The first latent frame of a grid stream tiled over its every latent frame.

    Args:
      geometry: the stream's ``StreamSpec`` (tokens are frame-major: the first ``tokens_per_frame``
        tokens are the first temporal token position).
      tokens: ``[B, S, D]`` that stream's tokens (``S = geometry.num_tokens``, ``D = geometry.token_dim``).

    Returns:
      ``[B, S, D]``: token ``t * P + p`` (``P`` tokens per frame) is token ``p`` of ``tokens``.
    """
    per_frame = geometry.tokens_per_frame
    first = tokens[:, :per_frame]
    return jnp.tile(first, (1, geometry.token_frames(), 1))


def derived_conditions(spec, tokens: Mapping[str, jax.Array]) -> dict:
    """``{c: [B, S_s, D_s]}`` for every derived condition of ``spec`` from the streams' ``tokens``
    (``{stream: [B, S_s, D_s]}``; a one-chunk spec in streaming gives one chunk's tokens)."""
    out = {}
    for name, stream in first_frame_conditions(spec).items():
        out[name] = first_frame_condition(spec.stream(stream).geometry, jnp.asarray(tokens[stream]))
    return out


def check_derived_conditions(model_cfg, conditions, streams) -> None:
    """Validates ``model.conditions.*.derived`` (``conditions``: ``ConditionArch`` list, ``streams``:
    ``{name: StreamSpec}``); ValueError naming the field and the expected value."""
    for c in conditions:
        if c.derived is None:
            continue
        field = f"model.conditions.{c.name}"
        if c.derived not in DERIVED_KINDS:
            raise ValueError(f"{field}.derived={c.derived!r}: choose one of {DERIVED_KINDS} (or leave it unset)")
        grids = [n for n, g in streams.items() if g.kind == "grid" and not g.condition]
        if not grids:
            raise ValueError(
                f"{field}.derived={c.derived!r} takes a video (grid) stream's first latent frame, but this model has no "
                f"generated grid stream (model.streams: {list(streams)}); remove {field}"
            )
        hosts = [n for n in streams if c.name in tuple(model_cfg.streams[n].get("concat", ()))]
        if len(hosts) != 1 or hosts[0] not in grids:
            raise ValueError(
                f"{field}.derived={c.derived!r}: the condition is computed from the video stream it is concatenated to; "
                f"name it in exactly one grid stream's concat, e.g. model.streams.{grids[0]}.concat = ({c.name!r},) "
                f"(now in: {hosts or 'none'})"
            )
        g = streams[hosts[0]]
        if c.dim != g.token_dim:
            raise ValueError(
                f"{field}.dim={c.dim}: a {c.derived} condition holds one {hosts[0]} token per token, so dim must be the "
                f"stream's token width {g.token_dim} (model.streams.{hosts[0]}.channels x prod(patch) = "
                f"{g.channels} x {'x'.join(map(str, g.patch))})"
            )
        extra = [k for k in ("rate", "window", "added_to") if getattr(c, k) is not None]
        extra += [k for k in ("silence_embedding", "face_local") if getattr(c, k)]
        if extra:
            raise ValueError(f"{field}: a derived condition is concatenated per token; remove {', '.join(extra)}")
