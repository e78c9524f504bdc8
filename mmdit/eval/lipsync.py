"""Lip-sync metrics: does the mouth in the frames move with the energy of the speech?

A SyncNet-style confidence/offset for the talking-portrait world, with no learned weights:

* :func:`mouth_opening_track` -- per frame, the integrated darkness of the lower-middle face
  relative to the skin (``mean(max(0, skin_luma - luma)) / skin_luma`` over the mouth region that
  :func:`~mmdit.eval.identity.locate_portrait` finds from pixels alone). Integrated darkness is
  linear in the pixels, so it survives blur, low-pass codecs and sub-pixel mouth openings.
* :func:`audio_envelope` -- RMS of the waveform in 40 ms windows centred on each frame's centre time
  ``(n + 0.5) / fps`` (at 25 fps: exactly samples ``[640 n, 640 (n + 1))`` at 16 kHz), log-compressed:
  ``log(rms + 0.03 * max(rms))`` (30 dB of dynamic range below the clip's loudest window, so a
  vocoder's noise floor does not dominate).
* :func:`sync_confidence` -- Pearson correlation of the two tracks at every lag in
  ``[-max_offset, max_offset]`` frames; returns the best correlation and its lag. **Sign convention:
  a positive offset means the audio leads** (a sound is heard ``offset`` frames before the mouth
  shows it): ``mouth[n]`` is compared with ``envelope[n - offset]``. Both tracks are first
  high-passed (minus a 13-frame = 0.52 s Hann moving average), so the score measures syllable-rate
  co-modulation rather than "the mouth is open while there is sound": every clip starts and ends
  silent, which without detrending makes *any* mouth correlate with *any* speech at ~0.3.
* :func:`evaluate_clip` -- all lip-sync and identity metrics of one clip as JSON-able floats.

Calibration on 2 s ground-truth synthetic clips: best correlation 0.76..0.95 (mean 0.85) at offset 0.
With another clip's audio the correlation at offset 0 averages ~0.03 (single clips scatter by ±0.3 by
chance) and the best over the 17 lags averages ~0.4 -- the chance level of a maximum over lags on 50
frames; audio shifted by 10 frames (outside the window) also scores ~0.4. Longer clips lower the chance
level. SyncNet's Sync-C / Sync-D (real video, learned embeddings) are on another scale: do not compare.
"""

from __future__ import annotations

import numpy as np

from mmdit.eval.identity import PortraitLayout, identity_metrics, locate_or_centre, locate_portrait, luma, to_unit_frames

FPS = 25
SAMPLE_RATE = 16000
_SILENCE_RMS = 1e-4  # -80 dBFS: a waveform whose loudest 40 ms window is below this is silent


def mouth_opening_track(frames, layout: PortraitLayout | None = None, name: str = "frames") -> np.ndarray:
    """Mouth opening score per frame, float32 ``[N]`` (arbitrary units, larger = more open).

    ``frames``: uint8 ``[N, H, W, 3]`` or float in [-1, 1]. ``layout`` defaults to
    ``locate_portrait(frames)`` (computed once per clip, so head sway of a pixel or two is tolerated).
    """
    x = to_unit_frames(frames, name)
    layout = layout or locate_portrait(x, name)
    top, bottom, left, right = layout.mouth
    region = luma(x[:, top:bottom, left:right])  # [N, h, w]
    skin = float(luma(layout.skin))
    if skin < 0.05:
        raise ValueError(
            f"{name}: the skin found is almost black (luma {skin:.3f}); the mouth cannot be measured by darkness against it"
        )
    return (np.maximum(skin - region, 0.0).mean(axis=(1, 2)) / skin).astype(np.float32)


def audio_envelope(
    wave, num_frames: int | None = None, fps: int = FPS, sample_rate: int = SAMPLE_RATE, name: str = "wave"
) -> np.ndarray:
    """Log RMS energy of ``wave`` (float ``[T]`` at ``sample_rate`` Hz) per video frame: float32 ``[N]``.

    ``N = num_frames`` or ``floor(T * fps / sample_rate)``. Windows are 40 ms long, centred on each frame's
    centre time; samples outside the waveform count as zeros. Raises if the waveform is silent.
    """
    w = np.asarray(wave, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(
            f"{name} must be a mono waveform [T], got shape {w.shape}; average the channels or pass one batch element"
        )
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name} contains NaN or inf; check the vocoder / codec output")
    n = int(num_frames) if num_frames is not None else int(len(w) * fps // sample_rate)
    if n < 1:
        raise ValueError(f"{name} of {len(w)} samples is shorter than one frame at {fps} fps / {sample_rate} Hz")
    half = int(round(0.02 * sample_rate))
    centres = np.round((np.arange(n) + 0.5) * sample_rate / fps).astype(np.int64)
    csum = np.concatenate([[0.0], np.cumsum(w * w)])
    lo, hi = np.clip(centres - half, 0, len(w)), np.clip(centres + half, 0, len(w))
    rms = np.sqrt((csum[hi] - csum[lo]) / (2 * half))
    if rms.max() < _SILENCE_RMS:
        raise ValueError(
            f"{name} is silent (loudest 40 ms window at {20 * np.log10(rms.max() + 1e-12):.0f} dBFS): "
            "lip sync needs speech; check the audio decode, or skip this clip's sync metric"
        )
    return np.log(rms + 0.03 * rms.max()).astype(np.float32)


def detrend(x: np.ndarray, width: int = 13) -> np.ndarray:
    """``x`` minus its ``width``-frame Hann moving average (edges padded by repetition): a high-pass."""
    x = np.asarray(x, np.float64)
    width = min(int(width), len(x))
    if width <= 1:
        return x
    kernel = np.hanning(width + 2)[1:-1]
    padded = np.pad(x, (width // 2, width - 1 - width // 2), mode="edge")
    return x - np.convolve(padded, kernel / kernel.sum(), mode="valid")


def sync_curve(mouth, envelope, max_offset: int = 8, detrend_frames: int = 13) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation at every lag: ``(offsets int [2M+1], corr float32 [2M+1])``.

    ``corr[d] = pearson(m[n], e[n - d])`` over the frames where both exist (positive ``d``: audio
    leads), with ``m, e`` the tracks after :func:`detrend` (``detrend_frames=0`` correlates the raw
    tracks). A constant track (a frozen mouth) correlates 0 at every lag.
    """
    m = np.asarray(mouth, np.float64).ravel()
    e = np.asarray(envelope, np.float64).ravel()
    if len(m) != len(e):
        raise ValueError(
            f"mouth ({len(m)} frames) and envelope ({len(e)} frames) differ in length; build the "
            "envelope with audio_envelope(wave, num_frames=len(mouth))"
        )
    if max_offset < 0:
        raise ValueError(f"max_offset must be >= 0, got {max_offset}")
    if len(m) < 2 * max_offset + 8:
        raise ValueError(
            f"a clip of {len(m)} frames is too short for max_offset={max_offset}: need >= "
            f"{2 * max_offset + 8} frames; pass a smaller max_offset or a longer clip"
        )
    m, e = detrend(m, detrend_frames), detrend(e, detrend_frames)
    offsets = np.arange(-max_offset, max_offset + 1)
    corr = np.zeros(len(offsets), np.float32)
    for i, d in enumerate(offsets):
        a, b = (m[d:], e[: len(e) - d]) if d >= 0 else (m[: len(m) + d], e[-d:])
        a, b = a - a.mean(), b - b.mean()
        denom = np.sqrt((a * a).sum() * (b * b).sum())
        corr[i] = (a * b).sum() / denom if denom > 1e-12 else 0.0
    return offsets, corr


def sync_confidence(mouth, envelope, max_offset: int = 8, detrend_frames: int = 13) -> tuple[float, int]:
    """``(best_corr, best_offset_frames)``: the highest Pearson correlation within ±``max_offset`` frames
    and its lag (positive = audio leads), as :func:`sync_curve` computes it. Ties go to the lag nearest 0."""
    offsets, corr = sync_curve(mouth, envelope, max_offset, detrend_frames)
    order = np.lexsort((np.abs(offsets), -corr))
    return float(corr[order[0]]), int(offsets[order[0]])


def clip_tracks(frames, wave, fps: int = FPS, sample_rate: int = SAMPLE_RATE):
    """``(x, mouth, envelope, layout)`` of one clip, as :func:`evaluate_clip` measures it: the frames as
    float ``[n, H, W, 3]`` in [0, 1] trimmed to the ``n`` frames both streams cover, the mouth opening and
    audio log-energy tracks (float32 ``[n]``) and the clip's :class:`PortraitLayout`. Arguments and errors
    as :func:`evaluate_clip`."""
    if fps != FPS:
        raise ValueError(f"fps={fps}: the lip-sync metric is defined at {FPS} fps; resample the video first")
    if sample_rate != SAMPLE_RATE:
        raise ValueError(
            f"sample_rate={sample_rate}: the lip-sync metric is defined at {SAMPLE_RATE} Hz; resample "
            f"first, e.g. librosa.resample(wave, orig_sr={sample_rate}, target_sr={SAMPLE_RATE})"
        )
    fps, sample_rate = int(FPS), int(SAMPLE_RATE)  # 25.0 == 25 passes the checks; slicing needs ints
    x = to_unit_frames(frames)
    w = np.asarray(wave, np.float32)
    audio_frames = len(w) * fps / sample_rate
    if abs(audio_frames - len(x)) > 2:
        raise ValueError(
            f"wave lasts {audio_frames:.1f} frames but frames has {len(x)}; pass the waveform of the same clip (within 2 frames)"
        )
    n = min(len(x), int(audio_frames))
    x = x[:n]
    layout = locate_or_centre(x)  # a generated clip without a face scores (near chance) instead of failing the eval
    mouth = mouth_opening_track(x, layout)
    env = audio_envelope(w[: n * sample_rate // fps], n, fps, sample_rate)
    return x, mouth, env, layout


def evaluate_clip(frames, wave, fps: int = FPS, sample_rate: int = SAMPLE_RATE, max_offset: int = 8) -> dict:
    """Every lip-sync and identity metric of one clip, as JSON-able floats.

    ``frames``: uint8 ``[N, H, W, 3]`` or float in [-1, 1] at 25 fps; ``wave``: float ``[T]`` at 16 kHz
    covering the same time (``T`` within two frames of ``N * 640``; the longer one is trimmed, so frames
    trimmed to ``1 + 4k`` by a codec still match the full waveform).

    Keys: ``sync_corr`` (best correlation), ``sync_offset`` (its lag in frames, + = audio leads),
    ``sync_corr_at_0``, ``sync_conf`` (best minus median correlation over the lags, like SyncNet's
    Sync-C), ``mouth_motion`` (std of the mouth track over its mean), ``speech_fraction`` (share of
    frames within 30 dB of the loudest), ``num_frames``, plus :func:`identity_metrics`.
    """
    x, mouth, env, layout = clip_tracks(frames, wave, fps, sample_rate)
    n = len(x)
    offsets, corr = sync_curve(mouth, env, max_offset)
    order = np.lexsort((np.abs(offsets), -corr))
    best, offset = float(corr[order[0]]), int(offsets[order[0]])
    rms_db = env / np.log(10) * 20
    out = {
        "sync_corr": best,
        "sync_offset": float(offset),
        "sync_corr_at_0": float(corr[offsets == 0][0]),
        "sync_conf": float(best - np.median(corr)),
        "mouth_motion": float(mouth.std() / (mouth.mean() + 1e-8)),
        "speech_fraction": float(np.mean(rms_db > rms_db.max() - 30)),
        "num_frames": float(n),
        "face_found": float(layout.found),
    }
    out.update(identity_metrics(x, layout))
    return out
