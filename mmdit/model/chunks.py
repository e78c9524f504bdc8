"""Causal chunks in aligned time: how ``model.chunk_frames`` cuts every stream's tokens.

A chunk is ``model.chunk_frames`` reference latent frames (aligned-time units, see
:mod:`mmdit.model.streams`) of *every* stream: the video tokens of those frames plus the audio (and
any other stream's) tokens of the same time span, so all streams are cut at the same instants.

One temporal token position of stream ``s`` spans ``d_s = patch_t · f_s`` reference frames, where
``f_s`` is ``model.streams.<s>.time_factor`` or ``rate_ref / rate_s``. The chunking is valid when,
for every stream, ``chunk_frames / d_s`` is a whole number of token positions and the clip's
``F_s / patch_t`` positions are a whole number of chunks, the same number for every stream
(:func:`check_chunking`; a bad value is a ``ValueError`` naming the fields and values that fit).

Token ``j`` of a stream lies in chunk ``j_t // (chunk_frames / d_s)`` (``j_t`` its temporal token
index), which is what the model's ``floor(aligned_time / chunk_frames)`` gives for a valid chunking.
Without ``model.chunk_frames`` the whole clip is one chunk.
"""

from __future__ import annotations

import numpy as np

from mmdit.model.spec import ModelSpec, StreamArch

# Token counts within this of an integer count as whole (aligned times are float32).
_WHOLE_TOL = 1e-4
_MAX_SUGGESTIONS = 8


def token_frames(spec: ModelSpec, arch: StreamArch) -> float:
    """Reference latent frames one temporal token position of ``arch`` spans (``patch_t · f``)."""
    g = arch.geometry
    factor = arch.time_factor if arch.time_factor is not None else spec.reference_rate / g.rate
    return float(g.patch[0]) * float(factor)


def _whole(x: float) -> int | None:
    """``round(x)`` when ``x`` is a positive whole number (within tolerance), else None."""
    n = int(round(x))
    return n if n >= 1 and abs(x - n) <= _WHOLE_TOL else None


def _fits(spec: ModelSpec, chunk_frames: float) -> bool:
    """Whether ``chunk_frames`` cuts every stream into the same whole number of chunks."""
    counts = set()
    for a in spec.streams:
        n = _whole(chunk_frames / token_frames(spec, a))
        if n is None or a.geometry.token_frames() % n:
            return False
        counts.add(a.geometry.token_frames() // n)
    return len(counts) == 1


def fitting_chunk_frames(spec: ModelSpec) -> list[float]:
    """Every ``model.chunk_frames`` that cuts all of ``spec``'s streams into the same whole number of
    chunks, ascending (the divisors of the first stream's clip that also fit the others)."""
    first = spec.streams[0]
    d, total = token_frames(spec, first), first.geometry.token_frames()
    candidates = [n * d for n in range(1, total + 1) if total % n == 0]
    return [cf for cf in candidates if _fits(spec, cf)]


def _describe(spec: ModelSpec, arch: StreamArch) -> str:
    g, field = arch.geometry, f"model.streams.{arch.name}"
    tf = f", {field}.time_factor={arch.time_factor:g}" if arch.time_factor is not None else ""
    return f"{field}.shape={tuple(g.shape)}, {field}.patch={tuple(g.patch)}, {field}.rate={g.rate:g}{tf}"


def _suggest(spec: ModelSpec) -> str:
    fits = fitting_chunk_frames(spec)
    if not fits:
        return (
            "no chunk length fits: the streams do not cover the same time span; make model.streams.*.shape "
            "cover the same seconds at their rates"
        )
    cf = float(spec.chunk_frames)
    shown = sorted(fits, key=lambda v: (abs(v - cf), v))[:_MAX_SUGGESTIONS]
    return "chunk_frames values that fit every stream: " + ", ".join(f"{v:g}" for v in sorted(shown))


def check_chunking(spec: ModelSpec) -> None:
    """Raises ``ValueError`` unless ``model.chunk_frames`` (when set) cuts every stream into the same
    whole number of chunks of whole token positions (module docstring); the message names the
    stream's ``shape`` / ``patch`` / ``rate`` fields and chunk lengths that would fit."""
    cf = spec.chunk_frames
    if cf is None:
        return
    if not np.isfinite(float(cf)) or float(cf) <= 0:
        raise ValueError(f"model.chunk_frames={cf!r} must be a positive number of reference latent frames (or None)")
    cf = float(cf)
    counts = {}
    for a in spec.streams:
        d = token_frames(spec, a)
        n = _whole(cf / d)
        if n is None:
            raise ValueError(
                f"model.chunk_frames={cf:g} is not a whole number of stream {a.name!r} tokens: one token spans "
                f"{d:g} reference latent frames ({_describe(spec, a)}), so a chunk would hold {cf / d:g} tokens "
                f"in time; {_suggest(spec)}"
            )
        total = a.geometry.token_frames()
        if total % n:
            raise ValueError(
                f"model.chunk_frames={cf:g} does not cut stream {a.name!r} into whole chunks: its clip has {total} "
                f"token positions in time ({_describe(spec, a)}), chunks hold {n}; {_suggest(spec)}"
            )
        counts[a.name] = total // n
    if len(set(counts.values())) > 1:
        raise ValueError(
            f"model.chunk_frames={cf:g} cuts the streams into different numbers of chunks {counts}: they cover "
            f"different time spans ({'; '.join(_describe(spec, a) for a in spec.streams)}); {_suggest(spec)}"
        )


def chunk_token_frames(spec: ModelSpec) -> dict[str, int]:
    """``{stream: temporal token positions per chunk}`` (the whole clip's when unchunked)."""
    check_chunking(spec)
    if spec.chunk_frames is None:
        return {a.name: a.geometry.token_frames() for a in spec.streams}
    return {a.name: _whole(float(spec.chunk_frames) / token_frames(spec, a)) for a in spec.streams}


def chunk_tokens(spec: ModelSpec) -> dict[str, int]:
    """``{stream: tokens per chunk}``: temporal positions per chunk × tokens per position (``H/ph · W/pw``
    for grids, 1 for sequences)."""
    return {a.name: n * a.geometry.tokens_per_frame for a, n in zip(spec.streams, chunk_token_frames(spec).values())}


def num_chunks(spec: ModelSpec) -> int:
    """Chunks per clip (1 without ``model.chunk_frames``)."""
    a = spec.streams[0]
    return a.geometry.token_frames() // chunk_token_frames(spec)[a.name]


def token_chunks(spec: ModelSpec) -> dict[str, np.ndarray]:
    """``{stream: int32 [S_s]}``: the chunk index of every token (all 0 when unchunked), in token
    order (frame-major for grids)."""
    per = chunk_token_frames(spec)
    out = {}
    for a in spec.streams:
        t = a.geometry.positions()[:, 0]  # temporal token index of each token
        out[a.name] = (t // per[a.name]).astype(np.int32)
    return out
