"""MP4 I/O with PyAV (mmdit.data.media)."""

import json
import os
import shutil
import subprocess

import av
import numpy as np
import pytest

from mmdit.data import media

FPS, SR = 24, 16000


def _clip(n=30, h=35, w=50, seconds=None):
    """Smooth moving gradient frames uint8 [n, h, w, 3] and a 440 Hz tone float32 [T]."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.stack([np.stack([(xx * 4 + 3 * t) % 256, (yy * 6) % 256, np.full_like(xx, 40 + 5 * t)], -1) for t in range(n)])
    t = np.arange(int(SR * (seconds if seconds is not None else n / FPS))) / SR
    return frames.astype(np.uint8), (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def test_round_trip_both_streams(tmp_path):
    frames, audio = _clip()
    path = str(tmp_path / "clip.mp4")
    media.write_mp4(path, frames, FPS, audio, SR)
    assert os.listdir(tmp_path) == ["clip.mp4"]  # no temp file left behind
    out, fps, wave, sr = media.read_mp4(path)
    assert fps == FPS and sr == SR
    assert out.shape == (30, 36, 50, 3)  # odd height padded to even
    err = np.abs(out[:, :35].astype(int) - frames).mean()
    assert err < 4, err
    pad_err = np.abs(out[:, 35].astype(int) - frames[:, 34]).mean()  # edge row replicated
    assert pad_err < 4, pad_err
    assert abs(len(wave) - len(audio)) <= media.AAC_FRAME
    n = min(len(wave), len(audio))
    assert np.abs(wave[:n] - audio[:n]).mean() < 0.02  # aligned: no priming offset
    info = media.probe(path)
    kinds = {s["type"]: s for s in info["streams"]}
    assert set(kinds) == {"video", "audio"}
    assert kinds["video"]["codec"] == "h264" and kinds["video"]["pix_fmt"] == "yuv420p"
    assert kinds["video"]["frames"] == 30 and kinds["video"]["fps"] == FPS
    assert (kinds["video"]["width"], kinds["video"]["height"]) == (50, 36)
    assert kinds["audio"]["codec"] == "aac" and kinds["audio"]["sample_rate"] == SR
    assert kinds["audio"]["channels"] == 1
    assert kinds["video"]["duration_s"] == pytest.approx(30 / FPS, abs=1e-3)
    assert kinds["audio"]["duration_s"] == pytest.approx(len(audio) / SR, abs=media.AAC_FRAME / SR)
    assert info["duration_s"] == pytest.approx(30 / FPS, abs=media.AAC_FRAME / SR)


def test_read_resamples_audio_and_fractional_fps(tmp_path):
    frames, audio = _clip(n=30)
    path = str(tmp_path / "ntsc.mp4")
    media.write_mp4(path, frames, 29.97, audio[: int(SR * 30 / 29.97)], SR)
    out, fps, wave, sr = media.read_mp4(path, sample_rate=24000)
    assert len(out) == 30 and fps == pytest.approx(29.97, abs=1e-3)
    assert sr == 24000
    assert abs(len(wave) - 30 / 29.97 * 24000) <= 24000 * media.AAC_FRAME / SR
    spectrum = np.abs(np.fft.rfft(wave))
    assert np.argmax(spectrum) * 24000 / len(wave) == pytest.approx(440, abs=3)


def test_video_only_file(tmp_path):
    frames, _ = _clip(n=5, h=16, w=16)
    path = str(tmp_path / "silent_film.mp4")
    media.write_mp4(path, frames, FPS)
    out, fps, wave, sr = media.read_mp4(path)
    assert out.shape == (5, 16, 16, 3) and wave is None and sr is None
    assert [s["type"] for s in media.probe(path)["streams"]] == ["video"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    frames, audio = _clip(n=10)
    path = tmp_path / "out.mp4"
    path.write_bytes(b"previous complete output")
    real, calls = av.VideoFrame.from_ndarray, []

    def crash_after_three(*a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt("simulated crash mid-write")
        return real(*a, **k)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        media.write_mp4(str(path), frames, FPS, audio, SR)
    assert os.listdir(tmp_path) == ["out.mp4"]
    assert path.read_bytes() == b"previous complete output"


def test_clear_errors(tmp_path):
    frames, audio = _clip(n=4, h=16, w=16)
    with pytest.raises(FileNotFoundError, match="nope.mp4: no such file"):
        media.read_mp4(str(tmp_path / "nope.mp4"))
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        media.probe(str(tmp_path / "nope.mp4"))
    with pytest.raises(ValueError, match="12345 Hz is not an AAC rate"):
        media.write_mp4(str(tmp_path / "x.mp4"), frames, FPS, audio, 12345)
    with pytest.raises(ValueError, match="must be even"):
        media.write_mp4(str(tmp_path / "x.mp4"), frames[:, :15], FPS, odd_size="error")
    with pytest.raises(ValueError, match="uint8"):
        media.write_mp4(str(tmp_path / "x.mp4"), frames.astype(np.float32), FPS)
    with pytest.raises(ValueError, match="mono"):
        media.write_mp4(str(tmp_path / "x.mp4"), frames, FPS, np.stack([audio, audio], 1), SR)
    assert not os.listdir(tmp_path)
    media.write_mp4(str(tmp_path / "ok.mp4"), frames, FPS, audio, SR)
    with pytest.raises(ValueError, match="sample_rate must be"):
        media.read_mp4(str(tmp_path / "ok.mp4"), sample_rate=0)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(5000))
    with pytest.raises(ValueError, match="garbage.mp4: cannot decode .* corrupt"):
        media.read_mp4(str(garbage))
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes((tmp_path / "ok.mp4").read_bytes()[:3000])
    with pytest.raises(ValueError, match="truncated.mp4"):
        media.read_mp4(str(truncated))


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = str(tmp_path / "voice.m4a")
    with av.open(path, "w", format="mp4") as c:
        s = c.add_stream("aac", rate=SR)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = SR, 0
        c.mux(s.encode(frame))
        c.mux(s.encode(None))
    with pytest.raises(ValueError, match=r"voice.m4a: has no video stream \(streams: \['audio'\]"):
        media.read_mp4(path)


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe binary not installed")
def test_probe_agrees_with_ffprobe(tmp_path):
    frames, audio = _clip()
    path = str(tmp_path / "clip.mp4")
    media.write_mp4(path, frames, FPS, audio, SR)
    out = json.loads(
        subprocess.run(
            ["ffprobe", "-v", "error", "-print_format", "json", "-show_streams", "-show_format", path],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    ours = media.probe(path)
    assert [s["codec_name"] for s in out["streams"]] == [s["codec"] for s in ours["streams"]]
    for theirs, mine in zip(out["streams"], ours["streams"]):
        assert float(theirs["duration"]) == pytest.approx(mine["duration_s"], abs=1e-3)
        if mine["type"] == "video":
            assert int(theirs["nb_frames"]) == mine["frames"]
            assert (theirs["width"], theirs["height"]) == (mine["width"], mine["height"])
        else:
            assert int(theirs["sample_rate"]) == mine["sample_rate"]
    assert float(out["format"]["duration"]) == pytest.approx(ours["duration_s"], abs=1e-3)
