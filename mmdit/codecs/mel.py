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
   per video frame at 25 fps; 4 audio latents per 4-frame video latent), ``latent_channels =
   n_mels * stack = 128``, and ``L = T // 640`` (trailing samples that do not fill a latent are
   dropped: a 2 s clip of 32000 samples gives ``[50, 128]``).
4. Normalised with fixed constants, ``(log_mel - (-7.0)) / 4.0``: on the synthetic world the latents
   then have mean ~-0.1 and std ~1.0, silence sits at -1.13 and the loudest bins near +2.9.

5. Optional **Wan-style temporal grouping** (``temporal=t``, default 1 = off): the 25 Hz latents are
   grouped exactly as :class:`mmdit.codecs.pixels.PixelCodec` groups video frames (Wan's ``1 + tk``
   causal layout): latent 0 holds 25 Hz latent 0 copied into all ``t`` slots, latent ``g >= 1`` holds
   25 Hz latents ``t*(g-1)+1 .. t*g``, stacked into channels (channel ``slot * n_mels * stack + c``).
   At ``t=4`` an audio latent then covers exactly the frames of the same video latent frame (49 frames
   -> 13 latents on both sides, ``latent_rate = 6.25``), so aligned RoPE time and a ``local(1)`` mask
   match audio and video tokens one to one and the within-group timing travels in channels on both
   sides (``configs/demo.py:wan4``). A trailing 25 Hz remainder that does not fill a group is
   dropped; the first latent decodes as the mean of its ``t`` slots. No streaming decode.

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
        temporal: int = 1,
    ):
        if not 0 < hop_length <= n_fft:
            raise ValueError(f"MelCodec hop_length={hop_length} must be <= n_fft={n_fft}")
        if n_mels < 1 or stack < 1 or griffin_lim_iters < 1:
            raise ValueError(f"MelCodec needs n_mels, stack, griffin_lim_iters >= 1, got {n_mels}, {stack}, {griffin_lim_iters}")
        if temporal < 1:
            raise ValueError(f"MelCodec temporal={temporal} must be >= 1 (1: no grouping; 4: Wan's 1 + 4k layout)")
        self.sample_rate = int(sample_rate)
        self.n_fft, self.hop_length, self.n_mels, self.stack = n_fft, hop_length, n_mels, stack
        self.fmax = float(fmax) if fmax is not None else self.sample_rate / 2
        self.griffin_lim_iters = griffin_lim_iters
        self.temporal = int(temporal)
        self.samples_per_step = hop_length * stack  # one ungrouped (stacked) latent
        self.steps_per_second = self.sample_rate / self.samples_per_step
        self.samples_per_latent = self.samples_per_step * self.temporal  # every grouped latent but the first
        self.latent_rate = self.sample_rate / self.samples_per_latent
        self.step_channels = n_mels * stack
        self.latent_channels = self.step_channels * self.temporal

    def __repr__(self) -> str:
        grouping = f", temporal={self.temporal}" if self.temporal > 1 else ""
        return (
            f"MelCodec(sample_rate={self.sample_rate}, n_fft={self.n_fft}, hop_length={self.hop_length}, "
            f"n_mels={self.n_mels}, stack={self.stack}{grouping}) -> {self.latent_rate:g} Hz x {self.latent_channels} ch"
        )

    def latent_length(self, num_samples: int) -> int:
        """``L = num_samples // (hop_length * stack)`` (640 at the defaults); with ``temporal=t``,
        ``1 + (that - 1) // t`` (the remainder of an unfilled group is dropped)."""
        steps = int(num_samples) // self.samples_per_step
        return 1 + (steps - 1) // self.temporal if steps > 0 else 0

    def num_samples(self, latent_length: int) -> int:
        """``T = latent_length * hop_length * stack``; with ``temporal=t``, ``(1 + t*(L-1)) * hop * stack``."""
        length = int(latent_length)
        return (1 + self.temporal * (length - 1)) * self.samples_per_step if length > 0 else 0

    def group(self, steps: np.ndarray) -> np.ndarray:
        """Ungrouped latents ``[B, 1 + t*k (+ remainder), stack*n_mels]`` -> ``[B, 1 + k, t*stack*n_mels]``
        (the 1 + tk layout of the module docstring, step 5; identity at ``temporal=1``)."""
        t = self.temporal
        if t == 1:
            return steps
        b, n, c = steps.shape
        k = (n - 1) // t
        first = np.repeat(steps[:, :1], t, axis=1).reshape(b, 1, t * c)
        rest = steps[:, 1 : 1 + t * k].reshape(b, k, t * c)
        return np.concatenate([first, rest], axis=1)

    def ungroup(self, latents: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`group`: ``[B, L, t*C]`` -> ``[B, 1 + t*(L-1), C]``, latent 0 as the mean of its slots."""
        t = self.temporal
        if t == 1:
            return latents
        b, length, _ = latents.shape
        slots = latents.reshape(b, length, t, self.step_channels)
        first = slots[:, :1].mean(axis=2)
        return np.concatenate([first, slots[:, 1:].reshape(b, t * (length - 1), self.step_channels)], axis=1)

    def _mel_kwargs(self) -> dict:
        return dict(sr=self.sample_rate, n_fft=self.n_fft, htk=True, fmin=0.0, fmax=self.fmax)

    def encode(self, wave, sample_rate: int | None = None) -> np.ndarray:
        """Waveform ``float [B, T]`` in [-1, 1] -> latents ``float32 [B, T // 640, 128]`` (numpy; with
        ``temporal=t``, ``[B, latent_length(T), t*128]``)."""
        import librosa

        self.check_sample_rate(sample_rate)
        check_wave(wave)
        x = np.asarray(wave, np.float32)
        if not np.all(np.isfinite(x)):
            raise ValueError("wave contains NaN or inf; fix the audio before encoding")
        b, t = x.shape
        if self.latent_length(t) < 1:
            raise ValueError(
                f"wave has {t} samples, shorter than one latent ({self.samples_per_step} samples = "
                f"{1000 / self.steps_per_second:g} ms at {self.sample_rate} Hz); pad or drop the clip"
            )
        length = self.num_samples(self.latent_length(t)) // self.samples_per_step  # ungrouped latents kept
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
        z = self.group(z.reshape(b, length, self.step_channels))
        return np.ascontiguousarray(z, dtype=np.float32)

    def _mel_pinv(self) -> np.ndarray:
        if getattr(self, "_pinv", None) is None:
            import librosa

            basis = librosa.filters.mel(n_mels=self.n_mels, **self._mel_kwargs())
            self._pinv = np.linalg.pinv(basis).astype(np.float32)
        return self._pinv

    def stft_magnitude(self, latents) -> np.ndarray:
        """Ungrouped latents ``float32 [B, L, 128]`` (see :meth:`ungroup`) -> STFT magnitudes ``float32 [B, n_fft/2 + 1, L * stack]`` (frame ``i``
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
        """Latents ``[B, L, 128]`` -> waveform ``float32 [B, num_samples(L)]`` (``640 L``; numpy), clipped to [-1, 1]."""
        import librosa

        z = np.asarray(latents, np.float32)
        if z.ndim != 3 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"latents must be [B, L, {self.latent_channels}] for {self!r}, got shape {z.shape}")
        if not np.all(np.isfinite(z)):
            raise ValueError("latents contain NaN or inf; check the sampler output")
        length = z.shape[1]
        mag = self.stft_magnitude(self.ungroup(z))
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
        if self.temporal > 1:
            raise ValueError(
                f"{self!r} has no streaming decode (its first latent is grouped differently); stream with "
                "codecs.audio.temporal=1 (configs/demo_stream.py), or decode the whole clip with decode()"
            )
        from mmdit.codecs.streaming import MelStreamDecoder

        return MelStreamDecoder(self, batch, lookahead=lookahead)
