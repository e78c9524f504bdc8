"""The codec interfaces: what every frozen video / audio autoencoder in mmdit implements.

Codecs turn media into the latents the diffusion transformer works on, and back. They run offline at
ingest (encode) and after sampling (decode), never inside the jitted train step, so an implementation
may be numpy (the weight-free codecs), jax (the Wan VAE), or anything else; each implementation states
which array types it accepts and returns.

**Video** (:class:`VideoCodec`): frames ``float32 [B, N, H, W, 3]`` in [-1, 1] at ``fps`` frames per
second <-> latents ``[B, F, h, w, C]`` with ``h = H / spatial_compression``,
``w = W / spatial_compression`` and Wan's causal temporal layout: latent frame 0 holds frame 0 alone,
latent frame ``f >= 1`` holds frames ``t*(f-1)+1 .. t*f`` (``t = temporal_compression``), so
``N = 1 + t*(F-1)``. Latent frame ``f`` is *at* video frame ``t*f`` (time ``t*f / fps`` s): a sequence
stream aligned to video time uses the video latent rate ``fps / t`` latents per second.

**Audio** (:class:`AudioCodec`): waveform ``float32 [B, T]`` in [-1, 1] at ``sample_rate`` Hz <->
latents ``[B, L, C]`` at ``latent_rate`` latents per second (a float: MMAudio's 16 kHz VAE runs at
31.25 Hz), latent ``j`` covering time ``[j, j + 1) / latent_rate`` s.

Latents are meant to be roughly zero-mean, unit-scale (each codec normalises with fixed constants),
so the flow-matching noise ``N(0, 1)`` is on the same scale as the data.
"""

from __future__ import annotations

import abc

import numpy as np


class VideoCodec(abc.ABC):
    """Frames ``[B, N, H, W, 3]`` in [-1, 1] <-> latents ``[B, F, h, w, C]`` (see the module docstring)."""

    latent_channels: int  # C
    temporal_compression: int  # frames per latent frame after the first (Wan: 4)
    spatial_compression: int  # pixels per latent cell along each of H and W (Wan2.1: 8, Wan2.2-5B: 16)
    fps: float  # frames per second of the video the codec is used at

    @property
    def latent_rate(self) -> float:
        """Latent frames per second (``fps / temporal_compression``); latent frame f is at time ``f / latent_rate``."""
        return self.fps / self.temporal_compression

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames ``F`` for ``num_frames`` video frames; ``num_frames`` must be ``1 + t*k``."""
        self.check_num_frames(num_frames)
        return 1 + (num_frames - 1) // self.temporal_compression

    def num_frames(self, latent_frames: int) -> int:
        """Video frames ``N = 1 + t*(F - 1)`` that ``latent_frames`` decode to."""
        if latent_frames < 1:
            raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
        return 1 + self.temporal_compression * (latent_frames - 1)

    def valid_num_frames(self, num_frames: int) -> int:
        """The largest ``1 + t*k <= num_frames``: how many frames survive trimming (50 -> 49 for t=4)."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        return 1 + ((num_frames - 1) // self.temporal_compression) * self.temporal_compression

    def check_num_frames(self, num_frames: int, name: str = "frames") -> None:
        t = self.temporal_compression
        if num_frames < 1 or (num_frames - 1) % t:
            raise ValueError(
                f"{name} has {num_frames} frames; {type(self).__name__} needs 1 + {t}k frames "
                f"(e.g. {self.valid_num_frames(max(num_frames, 1))}); trim the clip to that "
                f"(frames[:, :{self.valid_num_frames(max(num_frames, 1))}]) or pass trim=True"
            )

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(F, h, w, C)`` of one clip of ``num_frames x height x width`` (after no trimming)."""
        s = self.spatial_compression
        if height % s or width % s:
            raise ValueError(
                f"frame size {height}x{width} is not a multiple of spatial_compression={s}; "
                f"resize or crop to {height // s * s}x{width // s * s}"
            )
        return (self.latent_frames(num_frames), height // s, width // s, self.latent_channels)

    @abc.abstractmethod
    def encode(self, frames, trim: bool = False):
        """Frames ``float32 [B, N, H, W, 3]`` in [-1, 1] -> latents ``[B, F, h, w, C]``.

        ``N`` must be ``1 + t*k``; with ``trim=True`` other counts are cut to :meth:`valid_num_frames`
        (the trailing frames are dropped) instead of raising.
        """

    @abc.abstractmethod
    def decode(self, latents):
        """Latents ``[B, F, h, w, C]`` -> frames ``float32 [B, 1 + t*(F-1), H, W, 3]`` in [-1, 1]."""

    def stream_decoder(self, batch: int):
        """A :class:`mmdit.codecs.streaming.StreamDecoder` that decodes latent frames chunk by chunk, in time order."""
        raise NotImplementedError(
            f"{type(self).__name__} has no streaming decode; implement stream_decoder (mmdit/codecs/streaming.py)"
        )


class AudioCodec(abc.ABC):
    """Waveform ``[B, T]`` in [-1, 1] at ``sample_rate`` Hz <-> latents ``[B, L, C]`` at ``latent_rate`` Hz."""

    sample_rate: int  # Hz
    latent_rate: float  # latents per second
    latent_channels: int  # C

    @abc.abstractmethod
    def latent_length(self, num_samples: int) -> int:
        """Latents ``L`` produced for a waveform of ``num_samples`` samples."""

    @abc.abstractmethod
    def num_samples(self, latent_length: int) -> int:
        """Samples ``T`` that ``latent_length`` latents decode to."""

    @abc.abstractmethod
    def encode(self, wave, sample_rate: int | None = None):
        """Waveform ``float32 [B, T]`` in [-1, 1] -> latents ``[B, L, C]``.

        ``sample_rate``, when given, is checked against the codec's (a mismatch raises, naming the fix).
        """

    @abc.abstractmethod
    def decode(self, latents):
        """Latents ``[B, L, C]`` -> waveform ``float32 [B, num_samples(L)]``."""

    def stream_decoder(self, batch: int):
        """A :class:`mmdit.codecs.streaming.StreamDecoder` that decodes latents chunk by chunk, in time order."""
        raise NotImplementedError(
            f"{type(self).__name__} has no streaming decode; implement stream_decoder (mmdit/codecs/streaming.py)"
        )

    def check_sample_rate(self, sample_rate: int | None, name: str = "sample_rate") -> None:
        if sample_rate is not None and int(sample_rate) != int(self.sample_rate):
            raise ValueError(
                f"{name}={sample_rate} Hz but {type(self).__name__} runs at {self.sample_rate} Hz; resample first, "
                f"e.g. librosa.resample(wave, orig_sr={sample_rate}, target_sr={self.sample_rate})"
            )


def _is_float(dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or "float" in np.dtype(dtype).name  # bfloat16 included


def check_frames(frames, name: str = "frames") -> None:
    """Raises unless ``frames`` is ``[B, N, H, W, 3]`` floating point (values are not scanned)."""
    shape = tuple(np.shape(frames))
    if len(shape) != 5 or shape[-1] != 3:
        raise ValueError(
            f"{name} must be float [B, N, H, W, 3] RGB in [-1, 1], got shape {shape}; add a batch "
            "axis with frames[None] for a single clip"
        )
    dtype = np.dtype(getattr(frames, "dtype", np.float32))
    if not _is_float(dtype):
        raise ValueError(
            f"{name} has dtype {dtype}; codecs take float frames in [-1, 1]: "
            "use frames.astype(np.float32) / 127.5 - 1 for uint8 video"
        )


def check_wave(wave, name: str = "wave") -> None:
    """Raises unless ``wave`` is ``[B, T]`` floating point."""
    shape = tuple(np.shape(wave))
    if len(shape) != 2:
        raise ValueError(
            f"{name} must be float [B, T] mono waveforms, got shape {shape}; use wave[None] for one "
            "clip and average the channels of stereo audio"
        )
    dtype = np.dtype(getattr(wave, "dtype", np.float32))
    if not _is_float(dtype):
        raise ValueError(
            f"{name} has dtype {dtype}; codecs take float waveforms in [-1, 1] (int16 PCM: wave.astype(np.float32) / 32768)"
        )
