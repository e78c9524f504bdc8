"""Stream geometry: how a stream's latents become tokens, and where each token sits in time.

A stream is a named token sequence with its own weights. Two kinds:

* ``grid``: video latents ``[B, F, H, W, C]`` cut into 3-D patches ``(pt, ph, pw)``; tokens are
  frame-major ``(f, h, w)``; ``S = F/pt * H/ph * W/pw``; token dim ``C * pt * ph * pw``.
* ``sequence``: latents ``[B, T, C]`` (audio latents, motion keypoints, wav2vec2 features) cut into
  runs of ``patch`` steps; ``S = T / patch``.

Every token has an aligned time in units of the *time-reference* stream's latent frames (the video
stream unless configured): token ``j`` of a stream with latent rate ``r`` (latents/s) and patch
``p`` sits at ``j * p * r_ref / r``. See :mod:`mmdit.model.rope`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """Static description of one stream (derived from ``config.model.streams[name]``)."""

    name: str
    kind: str  # "grid" | "sequence"
    channels: int  # latent channels C
    shape: tuple[int, ...]  # latent shape without batch/channels: (F, H, W) or (T,)
    patch: tuple[int, ...]  # (pt, ph, pw) or (p,)
    rate: float  # latents per second along the time axis
    condition: bool = False  # always known, never noised or scored (Mirage's audio-feature stream)

    def __post_init__(self):
        field = f"model.streams.{self.name}"
        if self.kind not in ("grid", "sequence"):
            raise ValueError(f"{field}.kind={self.kind!r}: use 'grid' (video) or 'sequence' (audio, motion)")
        want = 3 if self.kind == "grid" else 1
        if len(self.shape) != want or len(self.patch) != want:
            raise ValueError(
                f"{field}: a {self.kind} stream needs a {want}-D latent shape and patch; "
                f"got shape={self.shape} patch={self.patch}"
            )
        for n, p, axis in zip(self.shape, self.patch, "FHW" if want == 3 else "T"):
            if p <= 0 or n % p:
                raise ValueError(
                    f"{field}: latent {axis}={n} is not divisible by patch {p}; change the clip size or {field}.patch"
                )
        if self.rate <= 0:
            raise ValueError(f"{field}.rate must be positive latents/second, got {self.rate}")

    @property
    def grid(self) -> tuple[int, ...]:
        """Token grid: ``(F/pt, H/ph, W/pw)`` or ``(T/p,)``."""
        return tuple(n // p for n, p in zip(self.shape, self.patch))

    @property
    def num_tokens(self) -> int:
        return int(np.prod(self.grid))

    @property
    def token_dim(self) -> int:
        return self.channels * int(np.prod(self.patch))

    @property
    def tokens_per_frame(self) -> int:
        """Tokens sharing one temporal position (``H/ph * W/pw`` for grids, 1 for sequences)."""
        return int(np.prod(self.grid[1:])) if self.kind == "grid" else 1

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.shape) + (self.channels,)

    def positions(self) -> np.ndarray:
        """Integer token positions ``[S, 3]`` as (t, h, w) token-grid indices (h = w = 0 for sequences)."""
        if self.kind == "grid":
            t, h, w = np.meshgrid(*[np.arange(n) for n in self.grid], indexing="ij")
            return np.stack([t.ravel(), h.ravel(), w.ravel()], -1)
        t = np.arange(self.grid[0])
        return np.stack([t, np.zeros_like(t), np.zeros_like(t)], -1)

    def aligned_time(self, reference_rate: float, factor: float | None = None) -> np.ndarray:
        """Aligned time of each token ``[S]`` in reference-latent-frame units (float32).

        ``factor`` (reference latents per own latent) overrides ``reference_rate / rate`` (Ovi ships
        a fixed 0.19676 for its audio stream)."""
        f = (reference_rate / self.rate) if factor is None else factor
        step = self.positions()[:, 0].astype(np.float64) * self.patch[0]
        return (step * f).astype(np.float32)

    # -- patchify ------------------------------------------------------------------------------

    def patchify(self, x):
        """Latents ``[B, *shape, C]`` -> tokens ``[B, S, C*prod(patch)]`` (channel-major within a
        patch, i.e. the flatten order of a Conv with kernel = stride = patch and weight [D, C, *patch])."""
        b = x.shape[0]
        if self.kind == "grid":
            (F, H, W), (pt, ph, pw) = self.shape, self.patch
            x = x.reshape(b, F // pt, pt, H // ph, ph, W // pw, pw, self.channels)
            x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)  # b f h w C pt ph pw
            return x.reshape(b, self.num_tokens, self.token_dim)
        (T,), (p,) = self.shape, self.patch
        x = x.reshape(b, T // p, p, self.channels).transpose(0, 1, 3, 2)
        return x.reshape(b, self.num_tokens, self.token_dim)

    def unpatchify(self, tokens):
        """Inverse of :meth:`patchify`: ``[B, S, C*prod(patch)]`` -> ``[B, *shape, C]``."""
        b = tokens.shape[0]
        if self.kind == "grid":
            (F, H, W), (pt, ph, pw) = self.shape, self.patch
            x = tokens.reshape(b, F // pt, H // ph, W // pw, self.channels, pt, ph, pw)
            x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)
            return x.reshape(b, F, H, W, self.channels)
        (T,), (p,) = self.shape, self.patch
        x = tokens.reshape(b, T // p, self.channels, p).transpose(0, 1, 3, 2)
        return x.reshape(b, T, self.channels)

    def frame_values_to_tokens(self, values):
        """Per-temporal-token values ``[B, S_t]`` -> per-token ``[B, S]`` (repeat over h, w)."""
        return jnp.repeat(values, self.tokens_per_frame, axis=1)

    def token_frames(self) -> int:
        """Number of temporal token positions ``S_t`` (``F/pt`` or ``T/p``)."""
        return self.grid[0]


def build_streams(model_cfg) -> dict[str, StreamSpec]:
    """``config.model.streams`` -> ordered ``{name: StreamSpec}``."""
    out = {}
    for name, s in model_cfg.streams.items():
        out[name] = StreamSpec(
            name=name,
            kind=s.kind,
            channels=int(s.channels),
            shape=tuple(int(n) for n in s.shape),
            patch=tuple(int(p) for p in s.patch),
            rate=float(s.rate),
            condition=bool(s.get("condition", False)),
        )
    if not out:
        raise ValueError("model.streams is empty: declare at least one stream")
    return out


def time_reference(model_cfg, streams: Mapping[str, StreamSpec]) -> StreamSpec:
    """The stream whose latent frames are the unit of aligned time (``model.time_reference``,
    default: the first grid stream, else the first stream)."""
    name = model_cfg.get("time_reference", None)
    if name:
        if name not in streams:
            raise ValueError(f"model.time_reference={name!r} is not a stream; choose one of {list(streams)}")
        return streams[name]
    grids = [s for s in streams.values() if s.kind == "grid"]
    return grids[0] if grids else next(iter(streams.values()))


def aligned_times(model_cfg, streams: Mapping[str, StreamSpec]) -> dict[str, np.ndarray]:
    """``{name: [S] float32}`` aligned token times, honouring ``model.streams.<name>.time_factor``."""
    ref = time_reference(model_cfg, streams)
    out = {}
    for name, spec in streams.items():
        factor = model_cfg.streams[name].get("time_factor", None)
        out[name] = spec.aligned_time(ref.rate, factor)
    return out


def seconds_to_latents(seconds: float, rate: float) -> int:
    return int(math.floor(seconds * rate + 1e-6))


def wan_latent_frames(num_frames: int, temporal_compression: int = 4) -> int:
    """Wan's causal VAE layout: ``1 + 4k`` frames -> ``1 + k`` latent frames."""
    if (num_frames - 1) % temporal_compression:
        raise ValueError(
            f"{num_frames} frames do not fit Wan's 1 + {temporal_compression}k layout; "
            f"use {1 + (num_frames - 1) // temporal_compression * temporal_compression}"
        )
    return 1 + (num_frames - 1) // temporal_compression


def stream_names(streams: Mapping[str, StreamSpec] | Sequence[str]) -> tuple[str, ...]:
    return tuple(streams)
