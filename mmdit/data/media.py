"""MP4 I/O with PyAV: H.264 video + AAC audio in one file, written atomically.

Conventions: frames are ``uint8 [N, H, W, 3]`` RGB; audio is ``float32 [T]`` mono in full scale
[-1, 1]; ``fps`` in frames per second, ``sample_rate`` in Hz. RGB ↔ YUV 4:2:0 uses swscale's
default (BT.601, limited range) both ways, so a round trip is close but lossy (H.264 ``crf``).

AAC timing: the encoder adds ~1024 priming samples which the MP4 edit list hides again on decode,
and pads the tail to a whole frame (1024 samples), which :func:`read_mp4` trims using the stream
duration; decoded audio is within one AAC frame of the input length (exact for our own files).
Durations reported by :func:`probe` follow the container.
"""

from __future__ import annotations

import fractions
import os
import tempfile
from typing import Any

import av
import numpy as np

AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
AAC_FRAME = 1024  # samples per AAC frame


def _check_exists(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (check the path; mp4 inputs must be files)")


def _decode_error(path: str, err: Exception) -> ValueError:
    return ValueError(
        f"{path}: cannot decode ({type(err).__name__}: {err}); the file is corrupt, "
        "truncated or not a media file: re-export it or remove it from the inputs"
    )


def _fps_fraction(fps: float) -> fractions.Fraction:
    if not np.isfinite(fps) or fps <= 0 or fps > 1000:
        raise ValueError(f"fps must be in (0, 1000], got {fps}")
    return fractions.Fraction(fps).limit_denominator(10_000)  # 29.97 → 2997/100, 24 → 24


def _even_frames(frames: np.ndarray, odd_size: str) -> np.ndarray:
    n, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if not (ph or pw):
        return frames
    if odd_size == "error":
        raise ValueError(
            f"frame size {h}x{w} must be even for H.264 yuv420p; crop or pad the "
            "frames, or pass odd_size='pad' (replicates the last row/column)"
        )
    return np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")


def write_mp4(
    path: str,
    frames: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int | None = None,
    *,
    crf: int = 18,
    preset: str = "veryfast",
    audio_bitrate: int = 128_000,
    odd_size: str = "pad",
) -> None:
    """Writes ``frames`` (+ optional mono ``audio``) as an H.264/AAC MP4, atomically.

    Args:
      path: output file; written as a hidden temp file in the same directory, fsynced, then
        ``os.replace``-d, so a crash never leaves a half-written ``path``.
      frames: ``uint8 [N, H, W, 3]`` RGB, ``N >= 1``.
      fps: frames per second (float; 29.97 is stored as 2997/100).
      audio: ``float32 [T]`` mono in [-1, 1] (clipped) or None for a video-only file.
      sample_rate: audio rate in Hz, one of ``AAC_RATES``.
      crf / preset: libx264 quality (0 lossless … 51) and speed.
      audio_bitrate: AAC bit rate in bits/s.
      odd_size: ``"pad"`` odd H/W by one edge row/column (yuv420p needs even sizes) or
        ``"error"``.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(
            f"frames must be uint8 [N>=1, H, W, 3] RGB, got {frames.dtype} "
            f"{frames.shape}; convert with np.clip(x*255, 0, 255).astype(np.uint8)"
        )
    if odd_size not in ("pad", "error"):
        raise ValueError(f"odd_size must be 'pad' or 'error', got {odd_size!r}")
    frames = _even_frames(frames, odd_size)
    rate = _fps_fraction(fps)
    if audio is not None:
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1:
            raise ValueError(f"audio must be mono float32 [T], got shape {audio.shape}; average the channels first")
        if sample_rate not in AAC_RATES:
            raise ValueError(
                f"sample_rate {sample_rate} Hz is not an AAC rate; resample to one of {AAC_RATES} (e.g. 16000, 24000 or 48000)"
            )
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"{out_dir}: output directory does not exist; create it first")
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            vs = container.add_stream("libx264", rate=rate)
            vs.width, vs.height = frames.shape[2], frames.shape[1]
            vs.pix_fmt = "yuv420p"
            vs.options = {"crf": str(crf), "preset": preset}
            astream = None
            if audio is not None:
                astream = container.add_stream("aac", rate=sample_rate)
                astream.layout = "mono"
                astream.bit_rate = audio_bitrate
            for i, img in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                frame.pts = i
                frame.time_base = 1 / rate
                container.mux(vs.encode(frame))
            container.mux(vs.encode(None))
            if astream is not None:
                clipped = np.clip(audio, -1.0, 1.0)
                for start in range(0, len(clipped), AAC_FRAME):
                    chunk = clipped[start : start + AAC_FRAME][None]
                    af = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
                    af.sample_rate = sample_rate
                    af.pts = start
                    af.time_base = fractions.Fraction(1, sample_rate)
                    container.mux(astream.encode(af))
                container.mux(astream.encode(None))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_mp4(path: str, *, sample_rate: int | None = None) -> tuple[np.ndarray, float, np.ndarray | None, int | None]:
    """Decodes the first video stream and the first audio stream of a media file.

    Args:
      path: the file.
      sample_rate: resample the audio to this rate in Hz (``av.AudioResampler``); None keeps the
        file's rate.

    Returns:
      ``(frames uint8 [N, H, W, 3] RGB, fps, audio float32 [T] mono or None, sample_rate or
      None)``; audio is None when the file has no audio stream (channels are averaged to mono).

    Raises:
      FileNotFoundError: no such file. ValueError: no video stream, undecodable/corrupt data,
      or an unusable ``sample_rate``.
    """
    _check_exists(path)
    if sample_rate is not None and not (isinstance(sample_rate, (int, np.integer)) and 1000 <= sample_rate <= 384_000):
        raise ValueError(f"sample_rate must be an integer in [1000, 384000] Hz, got {sample_rate}")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(
                    f"{path}: has no video stream (streams: {[s.type for s in container.streams]}); it is not a video clip"
                )
            vs = container.streams.video[0]
            rate = vs.average_rate or vs.guessed_rate or vs.base_rate
            if not rate:
                raise ValueError(f"{path}: video stream has no frame rate; re-mux it with one")
            streams = [vs]
            astream = container.streams.audio[0] if container.streams.audio else None
            if astream is not None:
                streams.append(astream)
                out_rate = int(sample_rate or astream.rate)
                resampler = av.AudioResampler(format="flt", layout="mono", rate=out_rate)
            frames, chunks = [], []
            for packet in container.demux(*streams):
                for frame in packet.decode():
                    if packet.stream.type == "video":
                        frames.append(frame.to_ndarray(format="rgb24"))
                    else:
                        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            if astream is not None:
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
                # The last AAC frame is zero-padded; the stream duration says where audio ends.
                keep = (
                    round(float(astream.duration * astream.time_base) * out_rate)
                    if astream.duration and astream.time_base
                    else None
                )
    except av.FFmpegError as e:
        raise _decode_error(path, e) from e
    if not frames:
        raise ValueError(
            f"{path}: the video stream decoded to no frames; the file is truncated "
            "or corrupt: re-export it or remove it from the inputs"
        )
    audio = None
    if astream is not None:
        audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
        audio = audio[:keep] if keep else audio
    return np.stack(frames), float(rate), audio, (out_rate if astream is not None else None)


def probe(path: str) -> dict[str, Any]:
    """Container and stream facts without decoding.

    Returns:
      ``{"path", "format", "duration_s", "bit_rate", "streams": [{"index", "type", "codec",
      "duration_s", "frames", and for video "fps", "width", "height", "pix_fmt", for audio
      "sample_rate", "channels"}]}``; durations are None where the container does not say.
    """
    _check_exists(path)
    try:
        with av.open(path) as c:
            info = {
                "path": path,
                "format": c.format.name,
                "duration_s": None if c.duration is None else c.duration / av.time_base,
                "bit_rate": c.bit_rate,
                "streams": [],
            }
            for s in c.streams:
                d = {
                    "index": s.index,
                    "type": s.type,
                    "codec": s.codec_context.name if s.codec_context else None,
                    "duration_s": (float(s.duration * s.time_base) if s.duration is not None and s.time_base else None),
                    "frames": int(s.frames),
                }
                if s.type == "video":
                    rate = s.average_rate or s.guessed_rate
                    d.update(
                        fps=float(rate) if rate else None,
                        width=s.codec_context.width,
                        height=s.codec_context.height,
                        pix_fmt=s.codec_context.pix_fmt,
                    )
                elif s.type == "audio":
                    d.update(sample_rate=s.codec_context.sample_rate, channels=s.codec_context.channels)
                info["streams"].append(d)
            return info
    except av.FFmpegError as e:
        raise _decode_error(path, e) from e
