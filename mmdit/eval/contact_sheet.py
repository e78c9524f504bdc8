"""Contact sheet: a few clips at a glance -- frames over time, with the audio's mel spectrogram and the
mouth/energy tracks under them (PIL only).

Layout per clip (one band per clip, top to bottom):
  * a caption line (the clip's label, e.g. its sync figures);
  * ``FRAMES_SHOWN`` frames taken evenly over the clip, each scaled by an integer factor to >= 64 px high;
  * the log-mel spectrogram of the waveform (40 Slaney bands 0..8 kHz, 32 ms Hann windows, 10 ms hop),
    low frequencies at the bottom, stretched to the width of the frame row (time runs left to right over
    the whole clip);
  * the tracks, each min-max scaled: audio log-energy per frame (cyan) and mouth opening (orange), with
    grey ticks at the frames shown above.
"""

from __future__ import annotations

import os

import numpy as np

from mmdit.codecs.mmaudio_mel import hann_window, mel_filterbank
from mmdit.eval.identity import to_unit_frames

FRAMES_SHOWN = 8
BAND_H = 32  # px: height of the mel image and of the track plot
CAPTION_H = 12  # px


def log_mel(wave, sample_rate: int = 16000, n_mels: int = 40) -> np.ndarray:
    """float32 ``[n_mels, T']`` log-mel of a mono float waveform ``[T]`` (100 frames per second)."""
    w = np.asarray(wave, np.float64).ravel()
    n_fft, hop = int(0.032 * sample_rate), int(0.010 * sample_rate)
    n_fft = 1 << (n_fft - 1).bit_length()
    w = np.pad(w, (n_fft // 2, n_fft // 2))
    count = max(1, 1 + (len(w) - n_fft) // hop)
    idx = np.arange(n_fft)[None] + hop * np.arange(count)[:, None]
    spec = np.abs(np.fft.rfft(w[idx] * hann_window(n_fft), axis=1)) ** 2  # [T', F]
    mel = mel_filterbank(sample_rate, n_fft, n_mels, 0.0, sample_rate / 2) @ spec.T
    return np.log(mel + 1e-8).astype(np.float32)


def _scaled(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 1e-12 else np.full_like(x, 0.5)


def render(frames_list, waves_list, mouths=None, envelopes=None, labels=None, sample_rate: int = 16000) -> np.ndarray:
    """uint8 ``[H, W, 3]`` contact sheet of clips ``frames_list[i]`` (``[N, h, w, 3]``, uint8 or float in
    [-1, 1]) with waveforms ``waves_list[i]`` (float ``[T]``); ``mouths`` / ``envelopes`` are the per-frame
    tracks (float ``[N]``) drawn under them, ``labels`` one caption per clip."""
    from PIL import Image, ImageDraw

    if not len(frames_list) or len(frames_list) != len(waves_list):
        raise ValueError(f"contact sheet: {len(frames_list)} clips vs {len(waves_list)} waveforms; pass one of each (>= 1)")
    clips = [to_unit_frames(f) for f in frames_list]
    h, w = clips[0].shape[1:3]
    scale = max(1, -(-64 // h))
    shown = min(FRAMES_SHOWN, min(len(c) for c in clips))
    row_w = shown * w * scale
    band = CAPTION_H + h * scale + 2 * BAND_H + 4
    sheet = Image.new("RGB", (row_w, band * len(clips)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i, clip in enumerate(clips):
        y0 = i * band
        draw.text((2, y0), (labels[i] if labels else f"clip {i}")[: row_w // 6], fill=(230, 230, 230))
        picks = np.linspace(0, len(clip) - 1, shown).round().astype(int)
        for k, n in enumerate(picks):
            img = Image.fromarray((clip[n] * 255).round().astype(np.uint8)).resize((w * scale, h * scale), Image.NEAREST)
            sheet.paste(img, (k * w * scale, y0 + CAPTION_H))
        y_mel = y0 + CAPTION_H + h * scale + 2
        mel = _scaled(log_mel(waves_list[i], sample_rate))[::-1]  # low bands at the bottom
        mel_rgb = np.stack([mel, mel**2, 0.4 + 0.6 * mel * (1 - mel)], axis=-1)
        mel_img = Image.fromarray((mel_rgb * 255).astype(np.uint8)).resize((row_w, BAND_H), Image.BILINEAR)
        sheet.paste(mel_img, (0, y_mel))
        y_tr = y_mel + BAND_H + 2
        draw.rectangle([0, y_tr, row_w - 1, y_tr + BAND_H - 1], fill=(0, 0, 0))
        n_frames = len(clip)
        x_of = lambda n: int(round((n + 0.5) / n_frames * (row_w - 1)))  # noqa: E731
        for n in picks:
            draw.line([(x_of(n), y_tr), (x_of(n), y_tr + BAND_H - 1)], fill=(70, 70, 70))
        for tracks, colour in ((envelopes, (80, 220, 255)), (mouths, (255, 150, 40))):
            if tracks is None:
                continue
            t = _scaled(tracks[i])
            pts = [(x_of(n), y_tr + BAND_H - 2 - int(round(v * (BAND_H - 4)))) for n, v in enumerate(t)]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=1)
    return np.asarray(sheet)


def write_png(path: str, sheet: np.ndarray) -> str:
    """Writes the uint8 ``[H, W, 3]`` sheet as a PNG (directories created); returns ``path``."""
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(np.asarray(sheet, np.uint8)).save(path, format="PNG")
    return path
