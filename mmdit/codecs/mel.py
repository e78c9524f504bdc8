"""A weight-free audio codec: stacked, normalised log-mel frames; Griffin-Lim decode.

The embedded default's audio "VAE" (numpy + librosa, offline only: encode at ingest, decode after
sampling; jax arrays are accepted and converted, numpy is returned).

Encode (waveform ``float32 [B, T]`` in [-1, 1] at 16 kHz):

1. STFT with a 1024-point (64 ms) Hann window and hop 320 (20 ms, 50 frames/s), centred (librosa's
   ``center=True``: frame ``i`` is centred at ``320 i`` samples).
2. Power mel spectrogram, ``n_mels=64`` HTK-mel bands over 0..8 kHz (27 Hz apart at the bottom,
   fine enough to resolve the harmonics of a 95 Hz voice), ``log(max(mel, 1e-5))``.
3. ``stack=2`` consecutive frames become one latent: latent ``j`` = frames ``2j, 2j+1`` (centred at
   ``40 j`` and ``40 j + 20`` ms), channel ``slot * n_mels + band``. So
   **latent_rate = sample_rate / (hop * stack) = 16000 / 640 = 25.0 latents per second exactly** (one
   per video frame at 25 fps; 6.25 audio latents per 4-frame video latent), ``latent_channels =
   n_mels * stack = 128``, and ``L = T // 640`` (trailing samples that do not fill a latent are
   dropped: a 2 s clip of 32000 samples gives ``[50, 128]``).
4. Normalised with fixed constants, ``(log_mel - (-7.0)) / 4.0``: on the synthetic world the latents
   then have mean ~-0.1 and std ~1.0, silence sits at -1.13 and the loudest bins near +2.9.

Decode: un-normalise, ``exp``, invert the mel filterbank with non-negative least squares
(``librosa.feature.inverse.mel_to_stft``), then 32 iterations of Griffin-Lim (``librosa.griffinlim``,
``random_state=0``: deterministic) -> ``[B, 640 L]`` samples. The energy envelope survives
(correlation > 0.99 on the synthetic world); the phase does not, and Griffin-Lim keeps a clear pitch
only for higher voices (~200 Hz and up) -- lower voices come back rough. Cost: ~0.5..1 s per 2 s clip
on one CPU core (the NNLS dominates), plus ~5 s for librosa's first import in a process.
"""

from __future__ import annotations

import numpy as np

from mmdit.codecs.base import AudioCodec, check_wave

_LOG_FLOOR = 1e-5  # floor of the mel power before the log
_LOG_MEAN = -7.0  # fixed normalisation: latent = (log_mel - _LOG_MEAN) / _LOG_STD
_LOG_STD = 4.0


class MelCodec(AudioCodec):
    """Log-mel audio codec (see the module docstring): ``[B, T]`` at 16 kHz <-> ``[B, T // 640, 128]``."""

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 1024,
        hop_length: int = 320,
        n_mels: int = 64,
        stack: int = 2,
        fmax: float | None = None,
        griffin_lim_iters: int = 32,
    ):
        if not 0 < hop_length <= n_fft:
            raise ValueError(f"MelCodec hop_length={hop_length} must be <= n_fft={n_fft}")
        if n_mels < 1 or stack < 1 or griffin_lim_iters < 1:
            raise ValueError(f"MelCodec needs n_mels, stack, griffin_lim_iters >= 1, got {n_mels}, {stack}, {griffin_lim_iters}")
        self.sample_rate = int(sample_rate)
        self.n_fft, self.hop_length, self.n_mels, self.stack = n_fft, hop_length, n_mels, stack
        self.fmax = float(fmax) if fmax is not None else self.sample_rate / 2
        self.griffin_lim_iters = griffin_lim_iters
        self.samples_per_latent = hop_length * stack
        self.latent_rate = self.sample_rate / self.samples_per_latent
        self.latent_channels = n_mels * stack

    def __repr__(self) -> str:
        return (
            f"MelCodec(sample_rate={self.sample_rate}, n_fft={self.n_fft}, hop_length={self.hop_length}, "
            f"n_mels={self.n_mels}, stack={self.stack}) -> {self.latent_rate:g} Hz x {self.latent_channels} ch"
        )

    def latent_length(self, num_samples: int) -> int:
        """``L = num_samples // (hop_length * stack)`` (640 at the defaults)."""
        return int(num_samples) // self.samples_per_latent

    def num_samples(self, latent_length: int) -> int:
        """``T = latent_length * hop_length * stack``."""
        return int(latent_length) * self.samples_per_latent

    def _mel_kwargs(self) -> dict:
        return dict(sr=self.sample_rate, n_fft=self.n_fft, htk=True, fmin=0.0, fmax=self.fmax)

    def encode(self, wave, sample_rate: int | None = None) -> np.ndarray:
        """Waveform ``float [B, T]`` in [-1, 1] -> latents ``float32 [B, T // 640, 128]`` (numpy)."""
        import librosa

        self.check_sample_rate(sample_rate)
        check_wave(wave)
        x = np.asarray(wave, np.float32)
        if not np.all(np.isfinite(x)):
            raise ValueError("wave contains NaN or inf; fix the audio before encoding")
        b, t = x.shape
        length = self.latent_length(t)
        if length < 1:
            raise ValueError(
                f"wave has {t} samples, shorter than one latent ({self.samples_per_latent} samples = "
                f"{1000 / self.latent_rate:g} ms at {self.sample_rate} Hz); pad or drop the clip"
            )
        mel = librosa.feature.melspectrogram(
            y=x,
            hop_length=self.hop_length,
            win_length=self.n_fft,
            power=2.0,
            n_mels=self.n_mels,
            center=True,
            **self._mel_kwargs(),
        )
        mel = mel[..., : length * self.stack]  # [B, n_mels, L * stack]
        z = (np.log(np.maximum(mel, _LOG_FLOOR)) - _LOG_MEAN) / _LOG_STD
        z = z.reshape(b, self.n_mels, length, self.stack).transpose(0, 2, 3, 1)  # [B, L, stack, n_mels]
        return np.ascontiguousarray(z.reshape(b, length, self.latent_channels), dtype=np.float32)

    def _mel_pinv(self) -> np.ndarray:
        if getattr(self, "_pinv", None) is None:
            import librosa

            basis = librosa.filters.mel(n_mels=self.n_mels, **self._mel_kwargs())
            self._pinv = np.linalg.pinv(basis).astype(np.float32)
        return self._pinv

    def stft_magnitude(self, latents) -> np.ndarray:
        """Latents ``float32 [B, L, 128]`` -> STFT magnitudes ``float32 [B, n_fft/2 + 1, L * stack]`` (frame ``i``
        centred at sample ``hop * i``), what Griffin-Lim inverts. Per frame: the latent's mel is un-normalised and
        mapped back through the mel filterbank's pseudo-inverse."""
        z = np.asarray(latents, np.float32)
        b, length, _ = z.shape
        log_mel = np.clip(z * _LOG_STD + _LOG_MEAN, np.log(_LOG_FLOOR), 10.0)
        mel = np.exp(log_mel).reshape(b, length, self.stack, self.n_mels).transpose(0, 3, 1, 2)
        mel = mel.reshape(b, self.n_mels, length * self.stack)
        # Pseudo-inverse of the mel filterbank (clipped at 0) rather than librosa's NNLS
        # ``mel_to_stft``: the same envelope, constant time, and no minutes-long solves on the
        # far-from-speech latents an early checkpoint produces.
        power = np.maximum(np.einsum("fm,bmt->bft", self._mel_pinv(), mel), 0.0)
        return np.sqrt(power)

    def decode(self, latents) -> np.ndarray:
        """Latents ``[B, L, 128]`` -> waveform ``float32 [B, 640 L]`` (numpy), clipped to [-1, 1]."""
        import librosa

        z = np.asarray(latents, np.float32)
        if z.ndim != 3 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"latents must be [B, L, {self.latent_channels}] for {self!r}, got shape {z.shape}")
        if not np.all(np.isfinite(z)):
            raise ValueError("latents contain NaN or inf; check the sampler output")
        length = z.shape[1]
        mag = self.stft_magnitude(z)
        # A centred STFT of T = L * stack * hop samples has one more frame than we store: repeat the last.
        mag = np.concatenate([mag, mag[..., -1:]], axis=-1)
        wave = librosa.griffinlim(
            mag,
            n_iter=self.griffin_lim_iters,
            hop_length=self.hop_length,
            win_length=self.n_fft,
            n_fft=self.n_fft,
            center=True,
            length=self.num_samples(length),
            random_state=0,
        )
        return np.clip(wave, -1.0, 1.0).astype(np.float32)

    def stream_decoder(self, batch: int, lookahead: int = 2):
        """Chunk-by-chunk streaming Griffin-Lim holding back ``lookahead`` latents
        (:class:`mmdit.codecs.streaming.MelStreamDecoder`, which states the tolerance)."""
        from mmdit.codecs.streaming import MelStreamDecoder

        return MelStreamDecoder(self, batch, lookahead=lookahead)
