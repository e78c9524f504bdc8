"""Streaming output: a fragmented MP4 that is playable while it grows, and raw per-chunk files.

:class:`FragmentedMP4Writer` writes H.264 + AAC with ``movflags=frag_keyframe+delay_moov+default_base_moof``:
a ``moov`` without samples, then one ``moof``+``mdat`` fragment per chunk (every :meth:`write` starts with a
forced IDR keyframe, and a fragment starts at each keyframe). A fragment reaches the file when the next one
starts, so after ``write`` number ``k`` the first ``k - 1`` chunks are on disk and decodable by any player or
PyAV while the writer is still open; a writer that is killed (no :meth:`close`) leaves exactly those.
``close`` writes the rest. ``delay_moov`` rather than ``empty_moov``: the ``moov`` is written with the first
fragment (no later than with ``empty_moov``, as that fragment is the first readable data either way), once
the AAC encoder's first packet is known, so its edit list hides the 1024 priming samples; with
``empty_moov`` they stay in and the audio plays 64 ms late at 16 kHz. x264 runs with ``tune=zerolatency`` (no B-frames, no lookahead), so a frame's
packet leaves the encoder as soon as the frame goes in.

Audio: mono ``float32`` in [-1, 1], fed to AAC in whole encoder frames (1024 samples); the remainder is
buffered across writes and flushed (as one short last frame) by ``close``. Timestamps count frames /
samples written, so video and audio stay on one timeline however the chunks split them.

:class:`RawChunkWriter` writes ``chunk_000123.npz`` (``frames``, ``audio``, ``latents/<stream>`` arrays) per
chunk and a constant-size ``manifest.json``, each atomically (temp file + fsync + rename): a reader never sees
a torn chunk, and the manifest names only chunks that are complete.

Conventions as :mod:`mmdit.data.media`: frames ``uint8 [n, H, W, 3]`` RGB, ``fps`` frames/s, ``sample_rate``
Hz (an AAC rate).
"""

from __future__ import annotations

import fractions
import os
import tempfile

import av
import numpy as np

from mmdit.data.media import AAC_FRAME, AAC_RATES, _fps_fraction
from mmdit.util.files import chmod_as_umask, fsync_path, write_json_atomic

MOVFLAGS = "frag_keyframe+delay_moov+default_base_moof"


class FragmentedMP4Writer:
    """Appends chunks of video (+ mono audio) to a fragmented MP4 at ``path`` (module docstring).

    Args:
      path: output file (created or truncated; its directory must exist).
      fps: frames per second.
      sample_rate: audio rate in Hz, one of ``AAC_RATES``; None writes video only.
      width, height: frame size in pixels (even: H.264 4:2:0).
      crf, preset: libx264 quality (0 lossless .. 51) and speed.
      audio_bitrate: AAC bit rate in bits/s.

    Use as a context manager or call :meth:`close`; ``frames_written`` / ``samples_written`` count what went in.
    """

    def __init__(
        self,
        path: str,
        fps: float,
        sample_rate: int | None,
        width: int,
        height: int,
        *,
        crf: int = 18,
        preset: str = "veryfast",
        audio_bitrate: int = 128_000,
    ):
        if width < 2 or height < 2 or width % 2 or height % 2:
            raise ValueError(f"frame size {width}x{height} must be even and >= 2 for H.264 4:2:0; crop or pad the frames")
        if sample_rate is not None and sample_rate not in AAC_RATES:
            raise ValueError(f"sample_rate {sample_rate} Hz is not an AAC rate; resample to one of {AAC_RATES}")
        out_dir = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(out_dir):
            raise FileNotFoundError(f"{out_dir}: output directory does not exist; create it first")
        self.path, self.width, self.height = path, int(width), int(height)
        self.sample_rate = None if sample_rate is None else int(sample_rate)
        self.rate = _fps_fraction(fps)
        self.frames_written = self.samples_written = 0
        self._pending = np.zeros(0, np.float32)  # audio not yet in a whole AAC frame
        # flush_packets: bytes reach the file as each packet is muxed, not when an I/O buffer fills.
        options = {"movflags": MOVFLAGS, "flush_packets": "1"}
        self._container = av.open(path, mode="w", format="mp4", options=options)
        try:
            self._video = self._container.add_stream("libx264", rate=self.rate)
            self._video.width, self._video.height = self.width, self.height
            self._video.pix_fmt = "yuv420p"
            # keyframes only where write() forces them (one per chunk): a long GOP, IDR on forced I frames
            gop = str(max(1, round(float(self.rate) * 3600)))
            self._video.options = {"crf": str(crf), "preset": preset, "tune": "zerolatency", "forced-idr": "1", "g": gop}
            self._audio = None
            if self.sample_rate is not None:
                self._audio = self._container.add_stream("aac", rate=self.sample_rate)
                self._audio.layout = "mono"
                self._audio.bit_rate = audio_bitrate
        except BaseException:
            self._container.close()
            raise

    def __enter__(self) -> "FragmentedMP4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._container is None

    def write(self, frames: np.ndarray | None, audio: np.ndarray | None = None) -> None:
        """Appends one chunk: ``frames uint8 [n, H, W, 3]`` (``n >= 0``; the first is a keyframe) and mono
        ``audio float32 [m]`` (clipped to [-1, 1]; only with a ``sample_rate``)."""
        if self._container is None:
            raise RuntimeError(f"{self.path}: write after close(); open a new FragmentedMP4Writer")
        if frames is not None:
            frames = np.asarray(frames)
            if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != np.uint8:
                raise ValueError(
                    f"frames must be uint8 [n, {self.height}, {self.width}, 3] RGB (the writer's height/width), got "
                    f"{frames.dtype} {frames.shape}; convert float frames in [-1, 1] with mmdit.codecs.clip.to_uint8"
                )
        if audio is not None:
            if self._audio is None:
                raise ValueError(f"{self.path}: audio given but the writer was opened with sample_rate=None")
            audio = np.asarray(audio, np.float32)
            if audio.ndim != 1:
                raise ValueError(f"audio must be mono float32 [m], got shape {audio.shape}; average the channels first")
        if frames is not None:
            for i, img in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                frame.pts, frame.time_base = self.frames_written, 1 / self.rate
                if i == 0:  # a keyframe per chunk: the fragment boundary
                    frame.pict_type = av.video.frame.PictureType.I
                self._container.mux(self._video.encode(frame))
                self.frames_written += 1
        if audio is not None and len(audio):
            self._pending = np.concatenate([self._pending, np.clip(audio, -1.0, 1.0)])
            whole = len(self._pending) // AAC_FRAME * AAC_FRAME
            self._encode_audio(self._pending[:whole])
            self._pending = self._pending[whole:]

    def _encode_audio(self, samples: np.ndarray) -> None:
        for start in range(0, len(samples), AAC_FRAME):
            chunk = np.ascontiguousarray(samples[start : start + AAC_FRAME][None])
            af = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            af.sample_rate, af.pts = self.sample_rate, self.samples_written
            af.time_base = fractions.Fraction(1, self.sample_rate)
            self._container.mux(self._audio.encode(af))
            self.samples_written += chunk.shape[1]

    def close(self) -> None:
        """Flushes the encoders (and the buffered audio) and closes the file; a second call does nothing."""
        if self._container is None:
            return
        try:
            self._container.mux(self._video.encode(None))
            if self._audio is not None:
                self._encode_audio(self._pending)
                self._pending = self._pending[:0]
                self._container.mux(self._audio.encode(None))
        finally:
            self._container.close()
            self._container = None
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())


class RawChunkWriter:
    """``DIR/chunk_000123.npz`` per chunk plus ``DIR/manifest.json``, each written atomically.

    A chunk file holds ``frames`` (as given: e.g. ``uint8 [B, n, H, W, 3]``), ``audio`` (e.g. ``float32
    [B, m]``) and ``latents/<stream>`` arrays, whichever were passed. The manifest is constant-size (it does
    not grow with the stream): ``{"format", "fps", "sample_rate", "pattern", "chunks": count, "first",
    "last", "frames", "samples", "tail", "complete", **meta}`` -- chunk ``i`` is ``pattern.format(i)`` for
    ``first <= i <= last``; ``tail`` is ``None`` or the file (``TAIL``) holding what the decoders released
    only when the stream ended (e.g. the mel vocoder's last samples: no latents), written by
    :meth:`write_tail`; ``frames``/``samples`` count it; ``complete`` turns true at :meth:`close`.
    """

    FORMAT = "mmdit-raw-chunks/1"
    PATTERN = "chunk_{:06d}.npz"
    TAIL = "tail.npz"

    def __init__(self, directory: str, *, fps: float, sample_rate: int | None, meta: dict | None = None):
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"{directory}: not writable; choose another output directory")
        self.directory = directory
        self.manifest = {
            "format": self.FORMAT,
            "fps": float(fps),
            "sample_rate": sample_rate,
            "pattern": self.PATTERN,
            "chunks": 0,
            "first": None,
            "last": None,
            "frames": 0,
            "samples": 0,
            "tail": None,
            "complete": False,
            **(meta or {}),
        }
        self._write_manifest()

    def _write_manifest(self) -> None:
        write_json_atomic(os.path.join(self.directory, "manifest.json"), self.manifest)

    def write(self, index: int, frames=None, audio=None, latents: dict | None = None) -> str:
        """Writes chunk ``index`` (strictly increasing) and updates the manifest; returns the chunk's path."""
        if self.manifest["complete"]:
            raise RuntimeError(f"{self.directory}: write after close()")
        last = self.manifest["last"]
        if last is not None and index <= last:
            raise ValueError(f"chunk index {index} is not after the last written chunk {last}")
        if self.manifest["tail"] is not None:
            raise RuntimeError(f"{self.directory}: chunk {index} written after the tail")
        arrays = {}
        if frames is not None:
            arrays["frames"] = np.asarray(frames)
        if audio is not None:
            arrays["audio"] = np.asarray(audio)
        for name, value in (latents or {}).items():
            arrays[f"latents/{name}"] = np.asarray(value)
        path = os.path.join(self.directory, self.PATTERN.format(index))
        self._save(path, arrays)
        m = self.manifest
        m["chunks"] += 1
        m["first"] = index if m["first"] is None else m["first"]
        m["last"] = index
        self._count(arrays)
        self._write_manifest()
        return path

    def write_tail(self, frames=None, audio=None) -> str | None:
        """Writes the decoders' end-of-stream remainder (``TAIL``) once, after the last chunk; returns its
        path, or None when both are absent or empty (nothing is written then)."""
        if self.manifest["complete"] or self.manifest["tail"] is not None:
            raise RuntimeError(f"{self.directory}: tail written twice or after close()")
        arrays = {k: np.asarray(v) for k, v in (("frames", frames), ("audio", audio)) if v is not None and np.size(v)}
        if not arrays:
            return None
        path = os.path.join(self.directory, self.TAIL)
        self._save(path, arrays)
        self.manifest["tail"] = self.TAIL
        self._count(arrays)
        self._write_manifest()
        return path

    def _count(self, arrays: dict) -> None:
        if "frames" in arrays:
            self.manifest["frames"] += int(arrays["frames"].shape[-4])
        if "audio" in arrays:
            self.manifest["samples"] += int(arrays["audio"].shape[-1])

    def _save(self, path: str, arrays: dict) -> None:
        """``np.savez`` to ``path`` atomically (temp file, fsync, rename, fsync the directory)."""
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".chunk.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            chmod_as_umask(tmp)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        fsync_path(self.directory)

    def close(self) -> None:
        """Marks the stream complete in the manifest (idempotent)."""
        if not self.manifest["complete"]:
            self.manifest["complete"] = True
            self._write_manifest()

    def __enter__(self) -> "RawChunkWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
