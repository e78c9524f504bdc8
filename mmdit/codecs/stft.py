"""A short-time Fourier transform pair with the window made once, for Griffin-Lim's inner loop.

:class:`HannSTFT` computes what ``librosa.stft`` / ``librosa.istft`` compute with ``window="hann"``,
``win_length=n_fft``, ``center=True`` and ``pad_mode="constant"`` (the mel codec's convention), to float32
rounding (``tests/test_stft.py`` holds it to librosa). It exists for speed, not for another convention:
librosa rebuilds the window (through scipy) and the window's sum of squares on every call and validates and
pads its input, ~0.35 ms a call, which is most of a streamed chunk's audio decode when Griffin-Lim runs
32 STFT/ISTFT pairs over a window of a few frames (``MelStreamDecoder``). Here the window is a constant,
framing is a strided view, the transforms are ``numpy.fft.rfft`` / ``irfft`` and the overlap-add and its
normalisation (the window's sum of squares per output length) are cached per frame count. scipy's reusable
``scipy.signal.ShortTimeFFT`` was the library candidate; at the streaming decoder's size (1024-point frames, hop
640, 10 frames) it took 331 us per STFT against 53 us here (and 648 us per STFT+ISTFT against 101 us for
:meth:`HannSTFT.project`), so it would give back most of the gain.
"""

from __future__ import annotations

import numpy as np


class HannSTFT:
    """``stft(wave [..., T]) -> complex64 [..., n_fft/2 + 1, 1 + T // hop]`` (frame ``i`` centred at sample
    ``hop * i``, zero padding beyond the ends) and ``istft(spec, length) -> float32 [..., length]``, the
    least-squares inverse (overlap-add of windowed frames divided by the window's sum of squares)."""

    def __init__(self, n_fft: int, hop: int):
        if n_fft < 2 or n_fft % 2 or not 0 < hop <= n_fft:
            raise ValueError(f"HannSTFT needs an even n_fft >= 2 and 0 < hop <= n_fft, got n_fft={n_fft}, hop={hop}")
        self.n_fft, self.hop = int(n_fft), int(hop)
        # scipy's hann(n_fft, sym=False): the periodic window, as librosa's get_window(..., fftbins=True)
        self.window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)
        self._norm: dict[tuple[int, int], np.ndarray] = {}

    def stft(self, wave) -> np.ndarray:
        wave = np.asarray(wave, np.float32)
        half = self.n_fft // 2
        padded = np.zeros(wave.shape[:-1] + (wave.shape[-1] + 2 * half,), np.float32)
        padded[..., half : half + wave.shape[-1]] = wave
        return self._analyse(padded)

    def istft(self, spec, length: int) -> np.ndarray:
        half = self.n_fft // 2
        return self._synthesise(spec, length)[..., half : half + length]

    def project(self, spec, length: int) -> np.ndarray:
        """``stft(istft(spec, length))`` without the copies between: Griffin-Lim's projection of ``spec`` onto
        the spectrograms of a real signal of ``length`` samples."""
        return self._analyse(self._synthesise(spec, length))

    def _analyse(self, padded: np.ndarray) -> np.ndarray:
        """The STFT of a signal already padded by ``n_fft/2`` zeros at each end (contiguous float32)."""
        n_frames = 1 + (padded.shape[-1] - self.n_fft) // self.hop
        padded = np.ascontiguousarray(padded)
        step = padded.strides[-1]
        frames = np.lib.stride_tricks.as_strided(
            padded, padded.shape[:-1] + (n_frames, self.n_fft), padded.strides[:-1] + (self.hop * step, step), writeable=False
        )
        spec = np.fft.rfft(frames * self.window, axis=-1)  # [..., n_frames, bins]
        return np.swapaxes(spec, -1, -2).astype(np.complex64, copy=False)

    def _synthesise(self, spec, length: int) -> np.ndarray:
        """``float32 [..., length + n_fft]``: the inverse of ``spec`` (``length`` samples from the first frame's
        centre) with ``n_fft/2`` zeros at each end, the padding :meth:`stft` adds."""
        spec = np.asarray(spec)
        half, hop = self.n_fft // 2, self.hop
        n_frames = min(spec.shape[-1], -(-(length + 2 * half) // hop))  # frames that reach [0, length)
        frames = np.fft.irfft(np.swapaxes(spec[..., :n_frames], -1, -2), n=self.n_fft, axis=-1).astype(np.float32)
        frames *= self.window
        full = np.zeros(spec.shape[:-2] + (max(self.n_fft + hop * (n_frames - 1), length + 2 * half),), np.float32)
        for i in range(n_frames):
            full[..., i * hop : i * hop + self.n_fft] += frames[..., i, :]
        full = full[..., : length + 2 * half]
        full[..., :half] = 0.0
        full[..., half + length :] = 0.0
        full[..., half : half + length] *= self._inverse_norm(n_frames, length)
        return full

    def _inverse_norm(self, n_frames: int, length: int) -> np.ndarray:
        """``float32 [length]``: 1 / the window's sum of squares at each output sample (1 where it is ~0)."""
        key = (n_frames, length)
        if key not in self._norm:
            sq = np.zeros(self.n_fft + self.hop * (n_frames - 1), np.float32)
            for i in range(n_frames):
                sq[i * self.hop : i * self.hop + self.n_fft] += self.window**2
            sq = np.pad(sq[self.n_fft // 2 :], (0, max(0, length - len(sq) + self.n_fft // 2)))[:length]
            tiny = np.finfo(np.float32).tiny
            self._norm[key] = np.where(sq > tiny, 1.0 / np.where(sq > tiny, sq, 1.0), 1.0).astype(np.float32)
        return self._norm[key]
