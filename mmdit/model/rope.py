"""Rotary position embeddings, temporally aligned across streams.

Wan's 3-D split of the head dim ``d`` (Wan 2.1/2.2, diffusers ``WanRotaryPosEmbed``): a temporal
band of ``d - 4*(d//6)`` dims and height/width bands of ``2*(d//6)`` dims each, each band with its
own frequencies ``theta ** (-2i / band)``, rotating *interleaved* pairs ``(x[2i], x[2i+1])``.

* grid (video) tokens rotate all three bands at (aligned time, h, w);
* sequence tokens (audio, motion, features) rotate only the temporal band, at their fractional
  aligned time, leaving the h/w bands unrotated (angle 0) -- UniTalking/Ovi's anisotropic RoPE.

Because every stream's temporal band uses the same frequencies and the same time unit (reference
latent frames), an audio token and the video frame at the same instant share their temporal phase,
and q.k scores depend only on time differences.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np


def band_dims(head_dim: int) -> tuple[int, int, int]:
    """(temporal, height, width) band sizes in dims (all even)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def band_frequencies(head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse frequencies per band: arrays of length band/2."""
    return tuple(1.0 / theta ** (np.arange(0, n, 2, dtype=np.float64) / n) for n in band_dims(head_dim))


def angles(t, h, w, head_dim: int, theta: float = 10000.0, rotate_hw=True):
    """Rotation angles ``[..., head_dim/2]`` for positions ``t, h, w`` (each ``[...]``, float).

    ``rotate_hw=False`` zeroes the spatial bands (sequence streams)."""
    ft, fh, fw = (jnp.asarray(f, jnp.float32) for f in band_frequencies(head_dim, theta))
    t = jnp.asarray(t, jnp.float32)
    h, w = (jnp.broadcast_to(jnp.asarray(p, jnp.float32), t.shape) for p in (h, w))
    t = t[..., None]
    parts = [t * ft]
    if rotate_hw:
        parts += [h[..., None] * fh, w[..., None] * fw]
    else:
        zeros = jnp.zeros(t.shape[:-1] + (fh.shape[0] + fw.shape[0],), jnp.float32)
        parts.append(zeros)
    return jnp.concatenate(parts, axis=-1)


def stream_angles(spec, aligned_time: np.ndarray, head_dim: int, theta: float = 10000.0):
    """Angles ``[S, head_dim/2]`` for one stream's tokens (see module docstring)."""
    pos = spec.positions()
    return angles(aligned_time, pos[:, 1], pos[:, 2], head_dim, theta, rotate_hw=spec.kind == "grid")


def joint_angles(streams: Mapping, times: Mapping[str, np.ndarray], head_dim: int, theta: float = 10000.0):
    """``{name: [S_name, head_dim/2]}`` for every stream."""
    return {name: stream_angles(spec, times[name], head_dim, theta) for name, spec in streams.items()}


def apply_rope(x, ang):
    """Rotates interleaved pairs of ``x [B, S, H, D]`` by ``ang [S, D/2]`` (or ``[B, S, D/2]``);
    computed in f32, returned in ``x.dtype``."""
    if ang.ndim == 2:
        ang = ang[None]
    # One elementwise pass, out = x * cos' + swap(x) * sin' with cos' = (c0, c0, c1, c1, ...),
    # sin' = (-s0, s0, -s1, s1, ...) and swap(x) = (x1, x0, x3, x2, ...): the pairs' rotation
    # (x0 c - x1 s, x0 s + x1 c) without stacking two halves (a concatenate, and a pad in the backward).
    cos = jnp.repeat(jnp.cos(ang), 2, axis=-1)[:, :, None, :]
    sin = jnp.sin(ang)
    sin = jnp.stack([-sin, sin], axis=-1).reshape(sin.shape[:-1] + (-1,))[:, :, None, :]
    xf = x.astype(jnp.float32)
    swapped = xf.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))[..., ::-1].reshape(x.shape)
    return (xf * cos + swapped * sin).astype(x.dtype)
