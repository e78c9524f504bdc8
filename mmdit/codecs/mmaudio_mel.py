"""MMAudio's log-mel front end in jax: waveform ``[B, T]`` -> log-mel ``[B, N, M]``.

The spectrogram the MMAudio VAE was trained on (diffusers ``MMAudioMelSpectrogram``, from MMAudio's
``MelConverter``), computed step by step:

1. clamp the waveform to [-1, 1];
2. reflect-pad ``(n_fft - hop) // 2`` samples on both sides, then frame **without** centring
   (``center=False``): frame ``i`` covers padded samples ``[i*hop, i*hop + n_fft)``, so a waveform of
   ``hop * N`` samples gives exactly ``N`` frames (frame ``i`` is centred at sample ``i*hop + hop/2``);
3. periodic Hann window of ``n_fft`` points (``torch.hann_window``: ``0.5 - 0.5 cos(2 pi n / n_fft)``),
   one-sided unnormalised DFT, magnitude ``sqrt(re^2 + im^2 + 1e-9)`` (the epsilon is the reference's);
4. Slaney-scale mel filterbank with Slaney area normalisation over ``[f_min, f_max]`` (librosa's
   ``filters.mel`` defaults, ``htk=False, norm="slaney"``): ``mel = basis @ magnitude``;
5. ``log(max(mel, 1e-5))`` -- natural log in diffusers and MMAudio's 44.1 kHz model; MMAudio's
   **16 kHz** model was trained with ``log10`` (``log_base=10``).

Shapes: waveform ``float [B, T]`` at ``sample_rate`` Hz -> ``float32 [B, T // hop, num_mels]`` (frames on
axis 1, our ``[B, L, C]`` layout; the reference returns ``[B, num_mels, frames]``).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

MAGNITUDE_EPS = 1e-9  # added to |X|^2 before the square root
LOG_FLOOR = 1e-5  # mel magnitude floor before the log


def _hz_to_slaney_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic (ratio 6.4 per 27 mels) above."""
    linear_step, min_log_hz, log_step = 200.0 / 3.0, 1000.0, math.log(6.4) / 27.0
    freq = np.asarray(freq, np.float64)
    log_part = min_log_hz / linear_step + np.log(np.maximum(freq, 1e-12) / min_log_hz) / log_step
    return np.where(freq >= min_log_hz, log_part, freq / linear_step)


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    linear_step, min_log_hz, log_step = 200.0 / 3.0, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / linear_step
    mel = np.asarray(mel, np.float64)
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(log_step * (mel - min_log_mel)), linear_step * mel)


def mel_filterbank(sample_rate: int, n_fft: int, num_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """Slaney mel filterbank ``float32 [num_mels, n_fft // 2 + 1]``, Slaney area-normalised.

    Triangle ``m`` rises from mel edge ``m`` to ``m + 1`` and falls to ``m + 2`` (edges equally spaced on the
    Slaney mel scale from ``f_min`` to ``f_max``) and is scaled by ``2 / (f[m + 2] - f[m])`` so every band has
    unit area in Hz. Computed in float64, returned float32.
    """
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    lo, hi = _hz_to_slaney_mel(np.array([f_min, f_max]))
    edges = _slaney_mel_to_hz(np.linspace(lo, hi, num_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2 : num_mels + 2] - edges[:num_mels]))[:, None]
    return weights.astype(np.float32)


def hann_window(n_fft: int) -> np.ndarray:
    """Periodic Hann window ``float32 [n_fft]`` (``torch.hann_window(n_fft)``)."""
    n = np.arange(n_fft, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)).astype(np.float32)


class MelFrontEnd:
    """Log-mel spectrogram of MMAudio's VAE (see the module docstring). Pure jnp: callable under ``jit``.

    Args:
      sample_rate: Hz (16000 for MMAudio's 16 kHz model, 44100 for the 44.1 kHz one).
      n_fft: FFT size = window length (1024 / 2048).
      hop_length: samples between frames (256 / 512).
      num_mels: mel bands (80 / 128).
      f_min, f_max: band edges in Hz (``f_max=None``: ``sample_rate / 2``, as the reference).
      log_base: ``"e"`` (diffusers, MMAudio 44.1 kHz) or ``"10"`` (MMAudio 16 kHz's ``log10``).
    """

    def __init__(
        self,
        sample_rate: int,
        n_fft: int,
        hop_length: int,
        num_mels: int,
        f_min: float = 0.0,
        f_max: float | None = None,
        log_base: str = "e",
    ):
        if not 0 < hop_length <= n_fft or (n_fft - hop_length) % 2:
            raise ValueError(
                f"mel front end: hop_length={hop_length} must be in (0, n_fft={n_fft}] with n_fft - hop_length even "
                "(the reference pads (n_fft - hop) // 2 on each side)"
            )
        if str(log_base) not in ("e", "10"):
            raise ValueError(f"mel front end: log_base={log_base!r}; use 'e' (diffusers, 44.1 kHz) or '10' (MMAudio 16 kHz)")
        self.sample_rate, self.n_fft, self.hop_length, self.num_mels = int(sample_rate), int(n_fft), int(hop_length), num_mels
        self.log_base = str(log_base)
        self.f_min, self.f_max = float(f_min), float(sample_rate / 2.0 if f_max is None else f_max)
        self.basis = mel_filterbank(sample_rate, n_fft, num_mels, self.f_min, self.f_max)
        self.window = hann_window(n_fft)

    def _key(self) -> tuple:
        return (self.sample_rate, self.n_fft, self.hop_length, self.num_mels, self.f_min, self.f_max, self.log_base)

    def __hash__(self) -> int:  # a static argument of jitted functions: equal settings share compilations
        return hash(self._key())

    def __eq__(self, other) -> bool:
        return isinstance(other, MelFrontEnd) and self._key() == other._key()

    @classmethod
    def from_target(cls, target: dict) -> "MelFrontEnd":
        """The front end of a converted VAE checkpoint's ``target`` (``mmdit.convert.mmaudio_vae.target``)."""
        return cls(
            int(target["sample_rate"]),
            int(target["n_fft"]),
            int(target["hop_length"]),
            int(target["mel_bins"]),
            log_base=str(target.get("log_base", "e")),
        )

    def num_frames(self, num_samples: int) -> int:
        """Frames ``N = (T + 2 pad - n_fft) // hop + 1`` (= ``T // hop`` for ``T`` a multiple of ``hop``)."""
        pad = (self.n_fft - self.hop_length) // 2
        return (int(num_samples) + 2 * pad - self.n_fft) // self.hop_length + 1

    def __call__(self, wave) -> jnp.ndarray:
        """``float [B, T]`` -> log-mel ``float32 [B, N, num_mels]``."""
        wave = jnp.clip(jnp.asarray(wave, jnp.float32), -1.0, 1.0)
        pad = (self.n_fft - self.hop_length) // 2
        if wave.shape[-1] <= pad:
            raise ValueError(f"waveform of {wave.shape[-1]} samples is too short for reflect padding of {pad}")
        wave = jnp.pad(wave, ((0, 0), (pad, pad)), mode="reflect")
        n = self.num_frames(wave.shape[-1] - 2 * pad)
        index = np.arange(n)[:, None] * self.hop_length + np.arange(self.n_fft)[None, :]
        frames = wave[:, index] * self.window  # [B, N, n_fft]
        spec = jnp.fft.rfft(frames, axis=-1)  # [B, N, n_fft // 2 + 1]
        magnitude = jnp.sqrt(jnp.real(spec) ** 2 + jnp.imag(spec) ** 2 + MAGNITUDE_EPS)
        mel = jnp.einsum("bnf,mf->bnm", magnitude, self.basis, precision="highest")
        mel = jnp.maximum(mel, LOG_FLOOR)
        return jnp.log10(mel) if self.log_base == "10" else jnp.log(mel)
