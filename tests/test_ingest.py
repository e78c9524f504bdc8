"""MP4 directory → records ingest with tiny fake codecs (mmdit.data.ingest)."""

import numpy as np
import pytest

from mmdit.data import ingest, media
from mmdit.data.records import SKIP_CORRUPT, SKIP_LENGTH, SKIP_NO_AUDIO, SKIP_SCHEMA, SKIP_SILENT, SKIP_TOO_SHORT, open_dataset

SRC_FPS, SRC_SR = 25, 22050


class MinimalVideoCodec:
    """The ingest interface only; causal 4x temporal / 8x spatial average pool: frame 0 alone,
    then groups of 4 (trailing frames and pixels dropped)."""

    fps = 12.0

    @staticmethod
    def latent_frames(n: int) -> int:
        return 1 + (n - 1) // 4

    def encode(self, frames):  # [B, N, H, W, 3] in [-1, 1] -> [B, F, H/8, W/8, 3]
        b, n, h, w, c = frames.shape
        assert frames.dtype == np.float32 and -1 <= frames.min() and frames.max() <= 1
        rest = frames[:, 1 : 1 + 4 * ((n - 1) // 4)].reshape(b, -1, 4, h, w, c).mean(2)
        x = np.concatenate([frames[:, :1], rest], 1)[:, :, : h // 8 * 8, : w // 8 * 8]
        return x.reshape(b, -1, h // 8, 8, w // 8, 8, c).mean((3, 5))


class FakeVideoCodec(MinimalVideoCodec):
    """Plus the optional parts of mmdit.codecs.base.VideoCodec: strict 1 + 4k frames, 8 px cells."""

    spatial_compression = 8

    @staticmethod
    def valid_num_frames(n: int) -> int:
        return 1 + (n - 1) // 4 * 4

    def encode(self, frames):
        assert (frames.shape[1] - 1) % 4 == 0 and frames.shape[2] % 8 == frames.shape[3] % 8 == 0
        return super().encode(frames)


class FakeAudioCodec:
    """Per-hop RMS and mean: [B, T] -> [B, T // 640, 2] at 25 latents/s."""

    sample_rate, hop = 16000, 640
    latent_rate = sample_rate / hop

    def encode(self, wave):
        b, t = wave.shape
        x = wave[:, : t // self.hop * self.hop].reshape(b, -1, self.hop)
        return np.stack([np.sqrt((x**2).mean(-1)), x.mean(-1)], -1)


def _write_clip(path, seconds=1.2, audio_seconds=None, silent=False, audio=True, size=(32, 48)):
    n = int(round(seconds * SRC_FPS))
    rng = np.random.default_rng(len(str(path)))
    frames = rng.integers(0, 256, (n,) + size + (3,)).astype(np.uint8)
    t = np.arange(int(SRC_SR * (audio_seconds or seconds))) / SRC_SR
    wave = (0.2 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    if silent:
        wave[:] = 0
    media.write_mp4(str(path), frames, SRC_FPS, wave if audio else None, SRC_SR)


@pytest.fixture()
def clip_dir(tmp_path):
    d = tmp_path / "clips"
    (d / "speaker_b").mkdir(parents=True)
    _write_clip(d / "a_good.mp4")
    (d / "a_good.txt").write_text("hello there\n", encoding="utf-8")
    _write_clip(d / "speaker_b" / "b_good.mp4", seconds=2.0, size=(38, 52))  # cropped to 32x48
    _write_clip(d / "c_silent.mp4", silent=True)
    _write_clip(d / "d_mismatch.mp4", seconds=1.0, audio_seconds=2.0)
    _write_clip(d / "e_no_audio.mp4", audio=False)
    _write_clip(d / "f_short.mp4", seconds=0.2)
    (d / "g_corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    good = (d / "a_good.mp4").read_bytes()
    (d / "h_truncated.mp4").write_bytes(good[: len(good) // 3])
    (d / ".hidden.mp4").write_bytes(b"ignored")
    return d


def test_ingest_counts_skips_and_writes_latents(clip_dir, tmp_path):
    out = tmp_path / "records"
    vc, ac = FakeVideoCodec(), FakeAudioCodec()
    manifest = ingest.ingest_mp4_dir(
        str(clip_dir), str(out), vc, ac, examples_per_shard=1, identity_from=lambda p: 1 if "speaker_b" in p else 0
    )
    assert manifest["num_examples"] == 2
    assert manifest["skipped"] == {SKIP_CORRUPT: 2, SKIP_LENGTH: 1, SKIP_NO_AUDIO: 1, SKIP_SILENT: 1, SKIP_TOO_SHORT: 1}
    by_source = {s["source"]: s["reason"] for s in manifest["skipped_sources"]}
    assert by_source == {
        "c_silent.mp4": SKIP_SILENT,
        "d_mismatch.mp4": SKIP_LENGTH,
        "e_no_audio.mp4": SKIP_NO_AUDIO,
        "f_short.mp4": SKIP_TOO_SHORT,
        "g_corrupt.mp4": SKIP_CORRUPT,
        "h_truncated.mp4": SKIP_CORRUPT,
    }
    assert "g_corrupt.mp4" in next(s["detail"] for s in manifest["skipped_sources"] if s["source"] == "g_corrupt.mp4")
    assert manifest["metadata"]["video_fps"] == 12.0
    assert manifest["metadata"]["audio_sample_rate"] == 16000

    ds = open_dataset(
        str(out),
        expected_schema={
            "video_latents": {"kind": "array", "dtype": "float16", "shape": [None, 4, 6, 3]},
            "audio_latents": {"kind": "array", "dtype": "float16", "shape": [None, 2]},
        },
    )
    examples = {ex["source"]: ex for ex in (ds[i] for i in range(len(ds)))}
    assert sorted(examples) == ["a_good.mp4", "speaker_b/b_good.mp4"]
    a, b = examples["a_good.mp4"], examples["speaker_b/b_good.mp4"]
    assert a["text"] == "hello there" and b["text"] == ""
    assert (a["identity"], b["identity"]) == (0, 1)
    for ex, seconds in ((a, 1.2), (b, 2.0)):
        n_frames = vc.valid_num_frames(int(np.floor(seconds * vc.fps + 1e-6)))  # 25 -> 12 fps
        assert ex["duration_s"] == pytest.approx(n_frames / 12.0)
        assert ex["video_latents"].shape[0] == vc.latent_frames(n_frames)
        assert ex["audio_latents"].shape[0] == int(round(n_frames / 12.0 * 16000)) // 640
        hop_rms = ex["audio_latents"][:, 0].astype(np.float32)
        rms = np.sqrt(np.mean(hop_rms**2))  # the AM tone's RMS: 0.2·√0.5·√1.5
        assert rms == pytest.approx(0.2 * np.sqrt(0.75), abs=0.02)


def test_ingest_latents_match_direct_encoding(clip_dir, tmp_path):
    vc, ac = MinimalVideoCodec(), FakeAudioCodec()  # no valid_num_frames: any frame count
    path = str(clip_dir / "a_good.mp4")
    frames, wave = ingest.prepare_clip(path, vc, ac, ingest.ExampleSchema())
    assert frames.shape == (14, 32, 48, 3) and len(wave) == int(round(14 / 12 * 16000))
    video, audio = ingest.encode_clip(frames, wave, vc, ac, np.float32)
    ingest.ingest_mp4_dir(str(clip_dir), str(tmp_path / "r"), vc, ac, latent_dtype=np.float32, text_from="filename")
    ds = open_dataset(str(tmp_path / "r"))
    ex = next(ds[i] for i in range(len(ds)) if ds[i]["source"] == "a_good.mp4")
    np.testing.assert_array_equal(ex["video_latents"], video)
    np.testing.assert_array_equal(ex["audio_latents"], audio)
    assert ex["text"] == "a good"


def test_ingest_schema_fields_checked_on_latents(clip_dir, tmp_path):
    vc, ac = FakeVideoCodec(), FakeAudioCodec()
    ok = ingest.ExampleSchema(fields={"video_latents": {"kind": "array", "dtype": "float16", "shape": [None, 4, 6, 3]}})
    m = ingest.ingest_mp4_dir(str(clip_dir), str(tmp_path / "ok"), vc, ac, schema=ok)
    assert m["num_examples"] == 2
    wrong = ingest.ExampleSchema(fields={"video_latents": {"kind": "array", "shape": [None, 4, 6, 16]}})
    m = ingest.ingest_mp4_dir(str(clip_dir), str(tmp_path / "wrong"), vc, ac, schema=wrong)
    assert m["num_examples"] == 0 and m["skipped"][SKIP_SCHEMA] == 2
    details = [s["detail"] for s in m["skipped_sources"] if s["reason"] == SKIP_SCHEMA]
    assert len(details) == 2 and all("expected [None, 4, 6, 16]" in d for d in details)
    assert len(open_dataset(str(tmp_path / "wrong"))) == 0  # an empty, committed dataset


def test_resampling_and_resizing_helpers():
    frames = np.arange(25, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 6, 3), np.uint8)
    out = ingest.resample_frames(frames, 25, 12)
    assert len(out) == 12 and out[:, 0, 0, 0].tolist() == [int(k * 25 / 12) for k in range(12)]
    assert ingest.resample_frames(frames, 25, 25) is frames
    assert len(ingest.resample_frames(frames[:10], 10, 30)) == 30  # upsampling repeats frames
    assert ingest.resize_frames(frames[:2], (8, 10)).shape == (2, 8, 10, 3)


def test_ingest_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest.ingest_mp4_dir(str(tmp_path / "nope"), str(tmp_path / "o"), FakeVideoCodec(), FakeAudioCodec())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \*\.mp4 files"):
        ingest.ingest_mp4_dir(str(tmp_path / "empty"), str(tmp_path / "o"), FakeVideoCodec(), FakeAudioCodec())


KILL_INGEST = """
import os, signal, sys
sys.path.insert(0, sys.argv[3])
from test_ingest import FakeAudioCodec, FakeVideoCodec
from mmdit.data import ingest, records
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[4] == "commit":  # new shards renamed into place, the manifest not yet replaced
    records.write_json_atomic = die
else:  # mid-write: the first tmp shard written, not yet closed
    records.ShardWriter._finish_shard = die
ingest.ingest_mp4_dir(sys.argv[1], sys.argv[2], FakeVideoCodec(), FakeAudioCodec(), examples_per_shard=1, overwrite=True,
                      text_from="filename")
"""


@pytest.mark.parametrize("where", ["commit", "write"])
def test_sigkill_during_ingest_keeps_the_previous_dataset_and_the_next_run_cleans_up(clip_dir, tmp_path, where):
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "r"
    first = ingest.ingest_mp4_dir(str(clip_dir), str(out), FakeVideoCodec(), FakeAudioCodec(), examples_per_shard=2)
    before = (out / "manifest.json").read_text()
    res = subprocess.run(
        [sys.executable, "-c", KILL_INGEST, str(clip_dir), str(out), os.path.dirname(__file__), where],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert (out / "manifest.json").read_text() == before
    ds = open_dataset(str(out), verify_checksums=True)  # the previous dataset, whole
    assert len(ds) == first["num_examples"] == 2 and ds[0]["text"] == "hello there"
    listed = {s["file"] for s in first["shards"]}
    assert [n for n in os.listdir(out) if n.startswith("train-") and n not in listed]  # leftovers, never read
    m = ingest.ingest_mp4_dir(str(clip_dir), str(out), FakeVideoCodec(), FakeAudioCodec(), examples_per_shard=1, overwrite=True)
    assert sorted(n for n in os.listdir(out) if n.startswith("train-")) == sorted(s["file"] for s in m["shards"])


def test_a_second_ingest_into_the_same_directory_is_refused(clip_dir, tmp_path):
    import os

    from mmdit.util.lock import DirLock, LockHeld

    with DirLock(str(tmp_path / "r"), command="another ingest"):
        with pytest.raises(LockHeld, match=rf"in use by pid {os.getpid()} .*another ingest"):
            ingest.ingest_mp4_dir(str(clip_dir), str(tmp_path / "r"), FakeVideoCodec(), FakeAudioCodec())
    assert not (tmp_path / "r" / "manifest.json").exists()
