"""Speaking / silence labels from audio energy (the ingest's per-clip and per-frame ``speaking``).

**The rule.** The waveform is cut into 20 ms frames; a frame is *voiced* when its RMS level in dBFS
is above both an absolute floor (``floor_db``, default -45 dBFS: room noise and breath stay below)
and a level relative to the clip's loud parts (``percentile``-th percentile of the frame levels
minus ``relative_db``, default 95th - 30 dB: quiet consonants of a loud talker still count, a
talker's pauses do not). Voiced frames are dilated by ``hangover_s`` (100 ms) on each side, as VADs
do, so stop closures and short gaps inside words stay "speaking".

A *latent frame* (a span ``[start, end)`` in seconds, e.g. the video frames one latent frame holds)
is speaking when at least half of its 20 ms frames are; a clip is speaking when at least
``min_fraction`` (default 0.2) of its latent frames are.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SpeakingRule:
    """Thresholds of the energy rule (module docstring); levels in dBFS, times in seconds."""

    frame_s: float = 0.02
    floor_db: float = -45.0
    percentile: float = 95.0
    relative_db: float = 30.0
    hangover_s: float = 0.1
    min_fraction: float = 0.2

    def voiced(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """bool ``[n]``: the 20 ms frames of mono ``wave`` (float, full scale 1) that are speech
        (after the hangover); frame ``i`` covers ``[i, i + 1) * frame_s`` seconds."""
        hop = max(1, int(round(self.frame_s * sample_rate)))
        n = len(wave) // hop
        if n == 0:
            return np.zeros(0, bool)
        x = np.asarray(wave[: n * hop], np.float64).reshape(n, hop)
        level = 10 * np.log10(np.mean(x * x, axis=1) + 1e-12)  # dBFS
        threshold = max(self.floor_db, float(np.percentile(level, self.percentile)) - self.relative_db)
        voiced = level > threshold
        k = int(round(self.hangover_s / self.frame_s))
        if k and voiced.any():
            voiced = np.convolve(voiced.astype(np.int32), np.ones(2 * k + 1, np.int32), mode="same") > 0
        return voiced

    def frame_labels(self, wave: np.ndarray, sample_rate: int, spans: np.ndarray) -> np.ndarray:
        """int32 ``[F]``: 1 where latent frame ``f`` (``spans[f] = (start_s, end_s)``, relative to
        the start of ``wave``) is speaking, else 0."""
        voiced = self.voiced(wave, sample_rate)
        out = np.zeros(len(spans), np.int32)
        for f, (start, end) in enumerate(np.asarray(spans, np.float64)):
            lo, hi = int(np.floor(start / self.frame_s + 1e-9)), int(np.ceil(end / self.frame_s - 1e-9))
            part = voiced[max(lo, 0) : max(min(hi, len(voiced)), 0)]
            out[f] = int(part.size > 0 and part.mean() >= 0.5)
        return out

    def clip_label(self, frame_labels: np.ndarray) -> int:
        """1 when at least ``min_fraction`` of the latent frames are speaking, else 0."""
        return int(len(frame_labels) > 0 and float(np.mean(frame_labels)) >= self.min_fraction)


def latent_frame_spans(num_latent_frames: int, temporal: int, fps: float) -> np.ndarray:
    """float64 ``[F, 2]``: the ``[start, end)`` seconds of each latent frame of a causal video codec
    (latent frame 0 holds video frame 0 alone, frame ``f >= 1`` holds frames ``t(f-1)+1 .. tf``)."""
    f = np.arange(num_latent_frames)
    first = np.where(f == 0, 0, temporal * (f - 1) + 1)
    last = np.where(f == 0, 0, temporal * f)
    return np.stack([first / fps, (last + 1) / fps], axis=1)
