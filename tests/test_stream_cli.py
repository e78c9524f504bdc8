"""``mmdit stream`` end to end on a tiny chunk-causal model (restore stubbed with random params):
a fragmented MP4 + raw chunks that hold exactly the streamed chunks, an A2V stream that ends with its
audio file, and input errors that name the flag."""

from __future__ import annotations

import json
import os

import av
import jax
import numpy as np
import pytest
import soundfile

from mmdit import config_lib
from mmdit.cli import stream as stream_cli
from mmdit.model.diffusion import DiffusionModel

CONFIG = "configs/demo_stream.py:tiny"


@pytest.fixture(scope="module")
def restored():
    cfg = config_lib.load(CONFIG)
    cfg.sample.steps = 2
    params = DiffusionModel.from_config(cfg).init(jax.random.key(0))
    return cfg, params


@pytest.fixture
def stub_restore(monkeypatch, restored):
    import mmdit.train.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "restore_inference_params", lambda workdir, step=None, verify=True: restored)


def _probe(path):
    with av.open(path) as c:
        frames = sum(1 for _ in c.decode(video=0))
    with av.open(path) as c:
        samples = sum(f.samples for f in c.decode(audio=0))
    return frames, samples


def test_t2av_stream_writes_fragmented_mp4_and_raw_chunks(tmp_path, stub_restore):
    out, raw = str(tmp_path / "talk.mp4"), str(tmp_path / "raw")
    argv = ["--workdir", "w", "--text", "hello", "--chunks", "5", "--out", out, "--raw", raw, "--no-progress"]
    assert stream_cli.main(argv) == 0
    frames, samples = _probe(out)
    assert frames == 5 * 6  # 5 chunks x 6 frames (tiny: 6 latent frames per chunk, one frame each)
    assert abs(samples / 16000 - 5 * 0.24) < 0.1
    with open(os.path.join(raw, "manifest.json")) as f:
        man = json.load(f)
    assert man["chunks"] == 5 and man["complete"] and man["frames"] == 30
    chunk = np.load(os.path.join(raw, "chunk_000004.npz"))
    assert chunk["frames"].shape == (6, 32, 32, 3)
    # the raw chunks hold every sample the MP4 has, the decoders' end-of-stream tail included
    pieces = [np.load(os.path.join(raw, f"chunk_{i:06d}.npz"))["audio"] for i in range(5)]
    if man["tail"] is not None:
        pieces.append(np.load(os.path.join(raw, man["tail"]))["audio"])
    assert man["samples"] == sum(p.shape[-1] for p in pieces)
    assert abs(man["samples"] - samples) <= 1024  # AAC frames pad the MP4's audio to 1024-sample frames


def test_stream_batch_flag_streams_the_same_chunks(tmp_path, stub_restore):
    """``--stream-batch`` (consecutive chunks' steps in one forward): the same frames as the sequential stream."""
    frames = {}
    for flag in ([], ["--stream-batch"]):
        raw = str(tmp_path / f"raw{len(flag)}")
        argv = ["--workdir", "w", "--text", "hi", "--chunks", "5", "--out", raw + ".mp4", "--raw", raw, "--no-progress"]
        assert stream_cli.main(argv + flag) == 0
        frames[len(flag)] = np.stack([np.load(os.path.join(raw, f"chunk_{i:06d}.npz"))["frames"] for i in range(5)])
    assert frames[1].shape == (5, 6, 32, 32, 3)
    # uint8 frames: batched matmuls may round a value across a grey level, rarely
    diff = np.abs(frames[1].astype(int) - frames[0].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_a2v_stream_ends_with_its_audio(tmp_path, stub_restore):
    wav = str(tmp_path / "speech.wav")
    t = np.arange(int(16000 * 0.24 * 2.5)) / 16000  # 2.5 chunks of audio
    soundfile.write(wav, (0.3 * np.sin(2 * np.pi * 220 * t) * (t % 0.2 < 0.1)).astype(np.float32), 16000)
    out = str(tmp_path / "a2v.mp4")
    assert stream_cli.main(["--workdir", "w", "--task", "a2v", "--audio", wav, "--out", out, "--no-progress"]) == 0
    frames, _ = _probe(out)
    assert frames == 2 * 6  # the partial third chunk is not generated; the file is complete and playable


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--task", "ti2av", "--chunks", "2", "--out", "x.mp4"], "--image"),
        (["--task", "a2v", "--out", "x.mp4"], "--audio"),
        (["--chunks", "2"], "--out"),
        (["--out", "x.mp4"], "--seconds or --chunks"),
        (["--task", "a2v", "--audio", "/nonexistent.wav", "--out", "x.mp4"], "--audio /nonexistent.wav"),
    ],
)
def test_input_errors_name_the_flag(argv, match, capsys, stub_restore, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert stream_cli.main(["--workdir", "w", "--no-progress"] + argv) != 0
    assert match in capsys.readouterr().err
