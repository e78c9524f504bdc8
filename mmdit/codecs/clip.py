"""Latents back to a playable clip: the video and audio codecs' decode, frames as uint8."""

from __future__ import annotations

import numpy as np

from mmdit.codecs.base import AudioCodec, VideoCodec
from mmdit.codecs.registry import make_audio_codec, make_video_codec


def to_uint8(frames) -> np.ndarray:
    """Frames in [-1, 1] -> uint8 in [0, 255] (rounded)."""
    return np.clip((np.asarray(frames, np.float32) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)


class ClipDecoder:
    """``decoder(video_latents [B, ...], audio_latents [B, ...]) -> (uint8 frames [B, N, H, W, 3], waves
    float32 [B, T])`` at ``decoder.fps`` frames/s and ``decoder.sample_rate`` Hz. Build it once (codecs
    may precompute filterbanks) and call it per batch."""

    def __init__(self, video_codec: VideoCodec, audio_codec: AudioCodec):
        self.video_codec, self.audio_codec = video_codec, audio_codec
        self.fps, self.sample_rate = float(video_codec.fps), int(audio_codec.sample_rate)

    @classmethod
    def from_config(cls, codecs_cfg) -> "ClipDecoder":
        """From ``config.codecs`` (``video`` and ``audio`` sections)."""
        return cls(make_video_codec(codecs_cfg.video), make_audio_codec(codecs_cfg.audio))

    def __call__(self, video_latents, audio_latents) -> tuple[np.ndarray, np.ndarray]:
        frames = to_uint8(self.video_codec.decode(np.asarray(video_latents, np.float32)))
        waves = np.asarray(self.audio_codec.decode(np.asarray(audio_latents, np.float32)), np.float32)
        return frames, waves
