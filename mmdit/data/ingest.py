"""Ingest real media: a directory of MP4 clips (+ transcripts) → latents in ArrayRecord shards.

This is the codec-level library function (any duck-typed codecs, whole clips, ``text`` as a string).
The records a config's model trains on (its input schema, clip-length windows, face boxes, speaking
labels, per-host and resumable) come from ``mmdit data ingest`` (:mod:`mmdit.data.media_ingest`).

For each ``*.mp4`` under ``in_dir`` (sorted, so runs are reproducible):

1. decode video + audio (:func:`mmdit.data.media.read_mp4`), resampling audio to
   ``audio_codec.sample_rate`` (PyAV ``AudioResampler``) and video to ``video_codec.fps``
   (nearest-frame: frames are dropped or repeated), optionally resizing frames to ``frame_size``;
2. check the source (:func:`mmdit.data.records.validate_example`): audio/video durations agree
   within ``schema.max_av_mismatch_s``, audio not silent, no NaNs;
3. trim both streams to their common duration: whole video frames (``1 + t·k`` of them when the
   codec has ``valid_num_frames``), audio to the same instant; centre-crop frames to a multiple of
   ``video_codec.spatial_compression`` when the codec has one;
4. encode with the frozen codecs (batch of one clip) and check the latents (finite, schema);
5. write the example with :class:`mmdit.data.records.ShardWriter`.

Bad inputs never stop the run: a corrupt/undecodable file, a clip without audio, a length
mismatch, silence, a clip shorter than ``min_seconds`` or non-finite latents is a *counted skip*
(``manifest.json``: ``skipped: {reason: count}`` and ``skipped_sources`` with the file names).
Exceptions raised by the codecs themselves are bugs and propagate.

Codec interface (duck-typed; see ``mmdit/codecs``):
``video_codec.encode(frames float32 [B, N, H, W, 3] in [-1, 1]) -> [B, F, h, w, C]``,
``video_codec.fps``, ``video_codec.latent_frames(n) -> F``;
``audio_codec.encode(wave float32 [B, T]) -> [B, L, C]``, ``audio_codec.sample_rate`` (Hz),
``audio_codec.latent_rate`` (latents per second). Optional, used when present:
``video_codec.valid_num_frames(n)`` and ``video_codec.spatial_compression``
(``mmdit.codecs.base.VideoCodec`` has both).

Example keys written: ``video_latents [F, h, w, C]``, ``audio_latents [L, C]`` (``latent_dtype``),
``text`` str, ``source`` str (path relative to ``in_dir``), ``duration_s`` float, and
``identity`` int when ``identity_from`` is given.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import av
import numpy as np

from mmdit.data import media
from mmdit.util.lock import DirLock
from mmdit.data.records import (
    SKIP_CORRUPT,
    SKIP_NO_AUDIO,
    SKIP_TOO_SHORT,
    ExampleSchema,
    ShardWriter,
    SkipExample,
    validate_example,
)

log = logging.getLogger(__name__)


def _text_for(path: str, text_from: str | Callable[[str], str] | None) -> str:
    """The transcript for ``path``: ``"txt"`` reads ``<stem>.txt`` beside it ("" if absent),
    ``"filename"`` uses the stem (``_`` → space), a callable maps the path, None gives ""."""
    if text_from is None:
        return ""
    if callable(text_from):
        return str(text_from(path))
    stem = os.path.splitext(path)[0]
    if text_from == "txt":
        if os.path.exists(stem + ".txt"):
            with open(stem + ".txt", encoding="utf-8") as f:
                return f.read().strip()
        return ""
    if text_from == "filename":
        return os.path.basename(stem).replace("_", " ")
    raise ValueError(f"text_from must be 'txt', 'filename', None or a callable, got {text_from!r}")


def resample_frames(frames: np.ndarray, src_fps: float, dst_fps: float) -> np.ndarray:
    """Nearest-frame rate conversion of ``[N, H, W, 3]``: output frame ``k`` (time ``k/dst_fps``)
    is the source frame shown at that time; the output spans ``floor(N·dst/src)`` frames."""
    if abs(src_fps - dst_fps) < 1e-6 * dst_fps:
        return frames
    n_out = int(np.floor(len(frames) * dst_fps / src_fps + 1e-6))
    idx = np.minimum(np.floor(np.arange(n_out) * src_fps / dst_fps + 1e-6).astype(int), len(frames) - 1)
    return frames[idx]


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes ``uint8 [N, H, W, 3]`` to ``[N, size[0], size[1], 3]`` (swscale bicubic)."""
    h, w = size
    if frames.shape[1:3] == (h, w):
        return frames
    return np.stack(
        [
            av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            .reformat(width=w, height=h, format="rgb24")
            .to_ndarray()
            for f in frames
        ]
    )


def _find_mp4s(in_dir: str) -> list[str]:
    if not os.path.isdir(in_dir):
        raise FileNotFoundError(f"{in_dir}: input directory does not exist")
    paths = sorted(
        os.path.join(root, f)
        for root, _, files in os.walk(in_dir)
        for f in files
        if f.lower().endswith(".mp4") and not f.startswith(".")
    )
    if not paths:
        raise ValueError(f"{in_dir}: no *.mp4 files found (hidden files are ignored); point in_dir at the clips")
    return paths


def read_checked_mp4(path: str, schema: ExampleSchema, fps: float, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """``(frames uint8 [N, H, W, 3] resampled to fps, wave float32 [T] at sample_rate)`` of an MP4, after
    the schema's length/silence checks (its record fields are checked later, after encoding).

    Raises:
      SkipExample: corrupt file, no audio stream, length mismatch, silence.
    """
    try:
        frames, src_fps, wave, _ = media.read_mp4(path, sample_rate=sample_rate)
    except ValueError as e:
        raise SkipExample(SKIP_CORRUPT, str(e)) from e
    if wave is None:
        raise SkipExample(SKIP_NO_AUDIO, "the clip has no audio stream")
    validate_example(
        {},
        dataclasses.replace(schema, fields={}),
        video_seconds=len(frames) / src_fps,
        audio_seconds=len(wave) / sample_rate,
        waveform=wave,
    )
    return resample_frames(frames, src_fps, fps), wave


def prepare_clip(
    path: str,
    video_codec,
    audio_codec,
    schema: ExampleSchema,
    *,
    frame_size: tuple[int, int] | None = None,
    min_seconds: float = 0.5,
    max_seconds: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes, resamples, checks and trims one clip.

    Returns:
      ``(frames uint8 [N, H, W, 3] at video_codec.fps, wave float32 [T] at
      audio_codec.sample_rate)`` covering the same ``N / fps`` seconds (``T = round(N/fps·sr)``);
      ``N`` and ``H, W`` as the codec needs them (module docstring, step 3).

    Raises:
      SkipExample: corrupt file, no audio stream, length mismatch, silence, too short.
    """
    fps, sr = float(video_codec.fps), int(audio_codec.sample_rate)
    frames, wave = read_checked_mp4(path, schema, fps, sr)
    seconds = min(len(frames) / fps, len(wave) / sr, max_seconds or np.inf)
    n_frames = int(np.floor(seconds * fps + 1e-6))
    if n_frames < max(1, min_seconds * fps):
        raise SkipExample(SKIP_TOO_SHORT, f"{seconds:.3f}s < min_seconds={min_seconds}")
    if hasattr(video_codec, "valid_num_frames"):  # causal codecs take 1 + t·k frames
        n_frames = int(video_codec.valid_num_frames(n_frames))
    n_samples = min(len(wave), int(round(n_frames / fps * sr)))
    frames = frames[:n_frames]
    if frame_size is not None:
        frames = resize_frames(frames, frame_size)
    s = int(getattr(video_codec, "spatial_compression", 1))
    h, w = frames.shape[1] // s * s, frames.shape[2] // s * s
    if not (h and w):
        raise SkipExample(SKIP_TOO_SHORT, f"frames {frames.shape[1]}x{frames.shape[2]} are smaller than one latent cell ({s}px)")
    top, left = (frames.shape[1] - h) // 2, (frames.shape[2] - w) // 2
    frames = frames[:, top : top + h, left : left + w]  # centre crop to a multiple of the cell
    return frames, np.ascontiguousarray(wave[:n_samples], np.float32)


def encode_clip(
    frames: np.ndarray, wave: np.ndarray, video_codec, audio_codec, latent_dtype=np.float16
) -> tuple[np.ndarray, np.ndarray]:
    """Encodes one clip: ``(video_latents [F, h, w, C], audio_latents [L, C])`` in
    ``latent_dtype``; ``RuntimeError`` if the video codec's frame count disagrees with
    ``video_codec.latent_frames``."""
    x = frames.astype(np.float32)[None] / 127.5 - 1.0  # [1, N, H, W, 3] in [-1, 1]
    video = np.asarray(video_codec.encode(x))[0]
    audio = np.asarray(audio_codec.encode(wave[None]))[0]
    expected = int(video_codec.latent_frames(len(frames)))
    if video.shape[0] != expected:
        raise RuntimeError(
            f"{type(video_codec).__name__}.encode gave {video.shape[0]} latent "
            f"frames for {len(frames)} frames but latent_frames() says {expected}"
        )
    return video.astype(latent_dtype), audio.astype(latent_dtype)


def ingest_mp4_dir(
    in_dir: str,
    out_dir: str,
    video_codec,
    audio_codec,
    *,
    text_from: str | Callable[[str], str] | None = "txt",
    identity_from: Callable[[str], int] | None = None,
    schema: ExampleSchema | None = None,
    frame_size: tuple[int, int] | None = None,
    min_seconds: float = 0.5,
    max_seconds: float | None = None,
    latent_dtype: Any = np.float16,
    prefix: str = "train",
    examples_per_shard: int = 64,
    overwrite: bool = False,
    encoders=None,
) -> dict[str, Any]:
    """Ingests every ``*.mp4`` under ``in_dir`` into a records dataset in ``out_dir``.

    Args:
      in_dir: directory searched recursively for ``*.mp4`` (hidden files ignored).
      out_dir: dataset directory (see :class:`mmdit.data.records.ShardWriter`).
      video_codec / audio_codec: frozen encoders (interface in the module docstring).
      text_from: transcript source, see :func:`_text_for` (default: ``<clip>.txt`` beside it).
      identity_from: optional ``path -> int`` speaker/identity id, stored as ``identity``.
      schema: thresholds and expected latent fields; default ``ExampleSchema()``.
      frame_size: ``(H, W)`` to resize frames to before encoding (before the centre crop), or
        None to keep them.
      min_seconds / max_seconds: skip shorter clips / truncate longer ones.
      latent_dtype: storage dtype of the latents (float16 halves the size of float32).
      prefix / examples_per_shard / overwrite: passed to ``ShardWriter``.
      encoders: frozen pretrained condition encoders (``mmdit.encoders.registry.ConditionEncoders``,
        e.g. ``mmdit.sample.inputs.condition_encoders(cfg, spec)``): their fields (UMT5 text features,
        wav2vec2 audio features, CLIP features of the first frame) are added to every example, floats
        in ``latent_dtype``; when they fill ``text``, the transcript is kept as ``transcript``.

    Returns:
      The committed manifest (``num_examples``, ``skipped``, ``skipped_sources``, ...).

    Holds ``out_dir``'s lock (:mod:`mmdit.util.lock`) while it writes: a second writer fails at once.
    """
    schema = schema or ExampleSchema()
    paths = _find_mp4s(in_dir)
    metadata = {
        "source_dir": os.path.abspath(in_dir),
        "video_fps": float(video_codec.fps),
        "audio_sample_rate": int(audio_codec.sample_rate),
        "audio_latent_rate": float(audio_codec.latent_rate),
        "video_codec": type(video_codec).__name__,
        "audio_codec": type(audio_codec).__name__,
        "frame_size": list(frame_size) if frame_size else None,
        "latent_dtype": np.dtype(latent_dtype).name,
    }
    with (
        DirLock(out_dir, command=f"mmdit.data.ingest.ingest_mp4_dir -> {os.path.abspath(out_dir)}"),
        ShardWriter(
            out_dir,
            prefix,
            examples_per_shard,
            overwrite=overwrite,
            producer=f"mmdit.data.ingest.ingest_mp4_dir({in_dir!r}, {out_dir!r}, ...)",
            metadata=metadata,
        ) as writer,
    ):
        for i, path in enumerate(paths):
            rel = os.path.relpath(path, in_dir)
            try:
                frames, wave = prepare_clip(
                    path,
                    video_codec,
                    audio_codec,
                    schema,
                    frame_size=frame_size,
                    min_seconds=min_seconds,
                    max_seconds=max_seconds,
                )
                video, audio = encode_clip(frames, wave, video_codec, audio_codec, latent_dtype)
                example = {
                    "video_latents": video,
                    "audio_latents": audio,
                    "text": _text_for(path, text_from),
                    "source": rel,
                    "duration_s": len(frames) / float(video_codec.fps),
                }
                if identity_from is not None:
                    example["identity"] = int(identity_from(path))
                if encoders:
                    extra = encoders.example_fields(
                        text=example["text"], wave=wave, sample_rate=int(audio_codec.sample_rate), frame=frames[0]
                    )
                    if "text" in extra:
                        example["transcript"] = example["text"]
                    example.update({k: v.astype(latent_dtype) if v.dtype.kind == "f" else v for k, v in extra.items()})
                validate_example(example, schema)
            except SkipExample as e:
                log.warning("skipping %s: %s", path, e)
                writer.skip(e, source=rel)
                continue
            writer.write(example)
            if (i + 1) % 100 == 0:
                log.info("ingested %d/%d clips (%d skipped)", i + 1, len(paths), sum(writer.skipped.values()))
        manifest = writer.close()
    log.info("wrote %d examples to %s; skipped %s", manifest["num_examples"], out_dir, manifest["skipped"])
    return manifest
