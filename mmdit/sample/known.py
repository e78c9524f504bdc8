"""Known tokens of a sampling task: the clean tokens a sampler holds fixed or conditions on.

A task (``mmdit/tasks.py``) marks some tokens of the generated streams *known* (reference frame,
the given modality, inpainting context, already generated chunks); those are held at their clean
values with σ = 0 through the ODE. Condition streams are always fully known and only read. Both
come from the caller's clean latents ``{stream: [B, *latent_shape]}``, patchified to tokens
``[B, S_stream, C_stream]``. Shared by every sampler (bidirectional, streaming).
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

__all__ = ["known_tokens"]


def known_tokens(spec, task: str, known: Mapping, known_latents: Mapping | None, batch: int) -> tuple[dict, dict]:
    """Clean tokens of the generated streams (zeros where nothing is known) and of the condition
    streams, from ``known_latents``.

    Args:
      spec: the model spec (``DiffusionModel.spec``): its ``streams`` (name + geometry) and ``names``.
      task: the task name (for error messages only).
      known: ``{stream: bool [B, S_stream]}`` known-token masks of the task (``TaskMasks.known``).
      known_latents: ``{stream: float [B, *latent_shape]}`` clean latents (None: none given); needed
        for every condition stream and every generated stream with a known token.
      batch: ``B``.

    Returns:
      ``(held, cond)``: ``held`` ``{generated stream: float32 [B, S_s, C_s]}`` (all zeros for a
      stream with no known token) and ``cond`` ``{condition stream: float32 [B, S_s, C_s]}``.

    Raises ValueError naming the stream and the expected shape on a missing, unknown or mis-shaped
    entry of ``known_latents``.
    """
    known_latents = dict(known_latents or {})
    unknown = sorted(set(known_latents) - set(spec.names))
    if unknown:
        raise ValueError(f"known_latents names stream(s) {unknown}; streams are {list(spec.names)}")
    held, cond = {}, {}
    for a in spec.streams:
        n, ss = a.name, a.geometry
        needed = ss.condition or bool(np.any(np.asarray(known[n])))
        if not needed:
            held[n] = jnp.zeros((batch, ss.num_tokens, ss.token_dim), jnp.float32)
            continue
        if n not in known_latents:
            why = "is a condition stream" if ss.condition else "has known tokens in this task"
            raise ValueError(
                f"task {task!r}: stream {n!r} {why}; pass its clean latents as "
                f"known_latents[{n!r}] float [B={batch}, {', '.join(map(str, ss.latent_shape))}]"
            )
        lat = jnp.asarray(known_latents[n], jnp.float32)
        if tuple(lat.shape) != (batch,) + tuple(ss.latent_shape):
            raise ValueError(
                f"known_latents[{n!r}] has shape {tuple(lat.shape)}; task {task!r} with batch "
                f"{batch} needs {(batch,) + tuple(ss.latent_shape)} (model.streams.{n})"
            )
        (cond if ss.condition else held)[n] = ss.patchify(lat)
    return held, cond
