"""Fragmented MP4 (playable while it grows, survives a killed writer) and raw chunk files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import av
import numpy as np
import pytest

from mmdit.data.fmp4 import FragmentedMP4Writer, RawChunkWriter

FPS, SR, H, W = 25.0, 16000, 32, 48
CHUNK_FRAMES, CHUNK_SAMPLES = 16, 10240  # 0.64 s of each: 10 AAC frames; audio is not a whole number of frames per chunk
CHUNK_SAMPLES_ODD = 10000


def chunk(i: int, n: int = CHUNK_FRAMES) -> np.ndarray:
    """Frames whose brightness encodes the chunk index (readable back through the lossy codec)."""
    return np.full((n, H, W, 3), 40 + 40 * i, np.uint8)


def tone(m: int) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 440 * np.arange(m) / SR)).astype(np.float32)


def read_what_decodes(path: str) -> tuple[np.ndarray, int, float | None]:
    """(frames, audio samples, container duration in s) of everything decodable, tolerating a torn tail."""
    frames, samples = [], 0
    if os.path.getsize(path) == 0:  # nothing written yet (the moov comes with the first fragment)
        return np.zeros((0, H, W, 3), np.uint8), 0, None
    with av.open(path) as c:
        streams = [s for s in (c.streams.video[:1] + c.streams.audio[:1])]
        try:
            for packet in c.demux(*streams):
                for f in packet.decode():
                    if packet.stream.type == "video":
                        frames.append(f.to_ndarray(format="rgb24"))
                    else:
                        samples += f.samples
        except av.FFmpegError:
            pass  # a fragment still being written
        duration = None if c.duration is None else c.duration / av.time_base
    return np.stack(frames) if frames else np.zeros((0, H, W, 3), np.uint8), samples, duration


def test_fragmented_mp4_readable_while_growing_and_after_close(tmp_path):
    path = str(tmp_path / "live.mp4")
    writer = FragmentedMP4Writer(path, FPS, SR, W, H)
    seen = []
    for i in range(4):
        writer.write(chunk(i), tone(CHUNK_SAMPLES_ODD))
        frames, samples, _ = read_what_decodes(path)  # the file is still open
        seen.append((len(frames), samples))
    # a chunk's fragment lands when the next one starts: after write k, chunks < k decode
    assert [s[0] for s in seen] == [0, CHUNK_FRAMES, 2 * CHUNK_FRAMES, 3 * CHUNK_FRAMES]
    frames, samples, _ = read_what_decodes(path)
    assert abs(float(frames[CHUNK_FRAMES + 3].mean()) - 80) < 4  # chunk 1's frames, in order
    assert samples >= 2 * CHUNK_SAMPLES_ODD - 2048  # audio of the flushed chunks is there too
    writer.close()
    writer.close()  # idempotent
    frames, samples, duration = read_what_decodes(path)
    assert len(frames) == 4 * CHUNK_FRAMES
    np.testing.assert_allclose([frames[i * CHUNK_FRAMES + 5].mean() for i in range(4)], [40, 80, 120, 160], atol=4)
    assert abs(samples - 4 * CHUNK_SAMPLES_ODD) <= 2048  # AAC priming / last-frame padding
    assert abs(duration - 4 * CHUNK_FRAMES / FPS) < 0.1
    with av.open(path) as c:  # a keyframe per chunk
        vs = c.streams.video[0]
        pts = [p.pts for p in c.demux(vs) if p.pts is not None]
    assert [round(p * vs.time_base * FPS) for p in pts] == list(range(4 * CHUNK_FRAMES))  # frame timing intact
    with av.open(path) as c:  # a keyframe per chunk
        vs = c.streams.video[0]
        keys = [round(p.pts * vs.time_base * FPS) for p in c.demux(vs) if p.is_keyframe]
    assert keys == [i * CHUNK_FRAMES for i in range(4)]


def test_audio_and_video_stay_in_sync(tmp_path):
    """A click at 0.25 s decodes at 0.25 s (AAC priming hidden by the edit list), frames keep their times."""
    from mmdit.data.media import read_mp4

    path = str(tmp_path / "sync.mp4")
    click = np.zeros(SR, np.float32)
    click[4000:4400] = 2 * tone(400)
    with FragmentedMP4Writer(path, FPS, SR, W, H) as w:
        for i in range(3):
            w.write(chunk(i, 25), click)
    frames, fps, audio, sr = read_mp4(path)
    assert (len(frames), fps, sr) == (75, FPS, SR) and abs(len(audio) - 3 * SR) <= 1024
    onsets = np.flatnonzero(np.abs(audio) > 0.2)
    assert abs(int(onsets[0]) - 4000) < 32 and abs(int(onsets[onsets > 20000][0]) - 20000) < 32


def test_killed_writer_leaves_decodable_fragments(tmp_path):
    path = str(tmp_path / "killed.mp4")
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        import numpy as np
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_fmp4 import chunk, tone, FPS, SR, W, H, CHUNK_SAMPLES
        from mmdit.data.fmp4 import FragmentedMP4Writer
        w = FragmentedMP4Writer({path!r}, FPS, SR, W, H)
        for i in range(3):
            w.write(chunk(i), tone(CHUNK_SAMPLES))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    frames, samples, _ = read_what_decodes(path)
    assert len(frames) == 2 * CHUNK_FRAMES  # the two fragments that were complete
    assert samples > 0


def test_fragmented_mp4_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="even"):
        FragmentedMP4Writer(str(tmp_path / "a.mp4"), FPS, SR, 33, 32)
    with pytest.raises(ValueError, match="AAC rate"):
        FragmentedMP4Writer(str(tmp_path / "a.mp4"), FPS, 12345, W, H)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FragmentedMP4Writer(str(tmp_path / "no" / "a.mp4"), FPS, SR, W, H)
    with FragmentedMP4Writer(str(tmp_path / "v.mp4"), FPS, None, W, H) as w:
        with pytest.raises(ValueError, match="uint8"):
            w.write(np.zeros((2, H, W, 3), np.float32))
        with pytest.raises(ValueError, match="sample_rate=None"):
            w.write(chunk(0), tone(100))
        w.write(chunk(0))
    with pytest.raises(RuntimeError, match="after close"):
        w.write(chunk(0))
    frames, samples, _ = read_what_decodes(str(tmp_path / "v.mp4"))
    assert len(frames) == CHUNK_FRAMES and samples == 0


def test_raw_chunk_writer(tmp_path):
    out = str(tmp_path / "raw")
    writer = RawChunkWriter(out, fps=FPS, sample_rate=SR, meta={"task": "t2av"})
    for i in range(3):
        writer.write(i, chunk(i)[None], tone(640)[None], {"video": np.full((1, 1, 2, 2, 4), i, np.float32)})
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert (m["chunks"], m["first"], m["last"], m["frames"], m["samples"], m["complete"]) == (3, 0, 2, 48, 1920, False)
    assert m["task"] == "t2av"
    with np.load(os.path.join(out, m["pattern"].format(2))) as z:
        assert z["frames"].shape == (1, CHUNK_FRAMES, H, W, 3) and z["audio"].shape == (1, 640)
        assert float(z["latents/video"].max()) == 2.0
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    with pytest.raises(ValueError, match="not after"):
        writer.write(2, chunk(0))
    writer.close()
    assert json.load(open(os.path.join(out, "manifest.json")))["complete"] is True
