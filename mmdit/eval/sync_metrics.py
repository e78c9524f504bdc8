"""Strict lip-sync figures of one (mouth track, audio envelope) pair, and the chance-to-ceiling scale.

:func:`mmdit.eval.lipsync.sync_confidence` takes the *best* correlation over ±8 frame lags. Its chance
level is high (~0.4 on 49 frames: the maximum of 17 noisy correlations), so a score of 0.5 says little.
The strict figures here have chance level ~0:

* ``sync_corr_at_0`` -- Pearson correlation of the detrended tracks at lag 0 (no search over lags);
* ``change_corr`` -- Pearson correlation of the frame-to-frame *changes* ``mouth[n+1] - mouth[n]`` and
  ``env[n+1] - env[n]`` at lag 0. Differencing removes what every clip shares -- silent at both ends, a
  slow loudness contour -- and keeps the syllable-rate opening/closing that sync is about.

:func:`fraction_of_way` puts a score on the scale ``0 = chance, 1 = ground truth``:
``(score - chance) / (ceiling - chance)``.

Tracks are float ``[N]`` per video frame at 25 fps (see :mod:`mmdit.eval.lipsync`).
"""

from __future__ import annotations

import numpy as np

from mmdit.eval.lipsync import sync_curve

SYNC_METRICS = ("sync_corr", "sync_corr_at_0", "change_corr")  # lenient (best lag), strict, strict


def pearson(a, b) -> float:
    """Pearson correlation of two equal-length float arrays; 0.0 when either is constant."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if len(a) != len(b):
        raise ValueError(f"pearson: lengths differ ({len(a)} vs {len(b)}); pass tracks of the same clip")
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 1e-12 else 0.0


def change_correlation(mouth, envelope) -> float:
    """Pearson correlation of the frame-to-frame differences of ``mouth`` and ``envelope`` (both ``[N]``,
    ``N >= 3``) at lag 0. A shared slow envelope adds almost nothing to it; co-timed changes do."""
    m = np.asarray(mouth, np.float64).ravel()
    e = np.asarray(envelope, np.float64).ravel()
    if len(m) != len(e):
        raise ValueError(f"mouth ({len(m)} frames) and envelope ({len(e)} frames) differ in length")
    if len(m) < 3:
        raise ValueError(f"change_correlation needs >= 3 frames, got {len(m)}")
    return pearson(np.diff(m), np.diff(e))


def pair_metrics(mouth, envelope, max_offset: int = 8) -> dict[str, float]:
    """``{sync_corr, sync_corr_at_0, change_corr}`` of one pair: the best correlation over
    ±``max_offset`` lags, the lag-0 correlation (both on detrended tracks, as
    :func:`mmdit.eval.lipsync.sync_curve`), and :func:`change_correlation`."""
    offsets, corr = sync_curve(mouth, envelope, max_offset)
    return {
        "sync_corr": float(corr.max()),
        "sync_corr_at_0": float(corr[offsets == 0][0]),
        "change_corr": change_correlation(mouth, envelope),
    }


def block_shuffle(track, block: int, rng: np.random.Generator) -> np.ndarray:
    """``track [N]`` with its consecutive ``block``-frame pieces (the last one may be shorter) put in a
    random order: the same values and local texture, unrelated timing."""
    x = np.asarray(track)
    if block < 1:
        raise ValueError(f"block={block}: the shuffle block must be >= 1 frame")
    pieces = [x[i : i + block] for i in range(0, len(x), block)]
    return np.concatenate([pieces[i] for i in rng.permutation(len(pieces))])


def fraction_of_way(score: float | None, chance: float | None, ceiling: float | None) -> float | None:
    """``(score - chance) / (ceiling - chance)``: 0 at chance, 1 at the ground truth; None when any input
    is missing or the ceiling is not above chance (the metric cannot separate sync on this data)."""
    if score is None or chance is None or ceiling is None or not np.isfinite([score, chance, ceiling]).all():
        return None
    if ceiling - chance <= 1e-6:
        return None
    return float((score - chance) / (ceiling - chance))
