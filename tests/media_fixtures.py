"""Media files the ingest tests make from the synthetic world: talking-video MP4s (H.264/AAC through
PyAV) with sidecar captions, and audio-only WAV + transcript pairs -- the inputs of ``mmdit data ingest``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np

from mmdit.data import media
from mmdit.data.synthetic import SyntheticWorld, WorldConfig


def world_of(cfg, seconds: float) -> SyntheticWorld:
    """The config's synthetic world (``cfg.world``: frame size, fps, sample rate, identities) rendering
    clips of exactly ``seconds`` (rounded to whole frames by the world)."""
    w = {**dict(cfg.world), "min_seconds": float(seconds), "max_seconds": float(seconds)}
    return SyntheticWorld(WorldConfig(seed=int(cfg.seed), **w))


def espeak_wave(text: str, path: str, sample_rate: int) -> np.ndarray | None:
    """espeak-ng speech of ``text`` as float32 ``[T]`` at ``sample_rate`` Hz (written via ``path``), or None
    when espeak-ng is not installed."""
    if not shutil.which("espeak-ng"):
        return None
    import librosa

    subprocess.run(["espeak-ng", "-w", path, text], check=True, capture_output=True)
    wave, _ = librosa.load(path, sr=sample_rate, mono=True)
    return wave.astype(np.float32)


def write_caption(stem: str, text: str, caption: str = "txt") -> None:
    """The sidecar caption of the media file ``stem.*``: ``stem.txt`` (``caption="txt"``) or ``stem.json``
    ``{"text": ...}`` (``"json"``)."""
    if caption == "json":
        with open(stem + ".json", "w", encoding="utf-8") as f:
            json.dump({"text": text}, f)
    elif caption == "txt":
        with open(stem + ".txt", "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        raise ValueError(f"caption={caption!r}: choose 'txt' or 'json'")


def write_talking_mp4(d, name: str, clip, *, audio: np.ndarray | None = None, caption: str | None = "txt") -> str:
    """``d/name.mp4``: the clip's frames at its fps with ``audio`` (default the clip's own, float32 ``[T]``
    at its sample rate) as the AAC track, plus its transcript as the sidecar caption (None: no caption).
    Returns the MP4's path."""
    path = os.path.join(str(d), f"{name}.mp4")
    os.makedirs(str(d), exist_ok=True)
    media.write_mp4(path, clip.video, clip.fps, clip.audio if audio is None else audio, clip.sample_rate)
    if caption is not None:
        write_caption(os.path.join(str(d), name), clip.text, caption)
    return path


def write_audio_only(d, name: str, clip) -> str:
    """``d/name.wav`` (the clip's audio at its sample rate) + ``d/name.txt`` (its transcript): an
    audio-only source. Returns the WAV's path."""
    import soundfile

    path = os.path.join(str(d), f"{name}.wav")
    os.makedirs(str(d), exist_ok=True)
    soundfile.write(path, clip.audio, clip.sample_rate)
    write_caption(os.path.join(str(d), name), clip.text, "txt")
    return path
