"""``mmdit data ingest`` end to end on MP4s the test makes: the synthetic world written with PyAV
(espeak-ng speech muxed in when installed), sidecar captions, an audio-only WAV, bad inputs; records
checked against the model's input schema, face boxes against the rendered face, speaking labels
against the utterance timing; resume after SIGKILL; per-host shares; 2 training steps on the result."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from mmdit.cli import data as data_cli
from mmdit.data import media
from mmdit.data.records import SKIP_CORRUPT, SKIP_NO_AUDIO, SKIP_TOO_SHORT, open_dataset
from mmdit.data.synthetic import SyntheticWorld, WorldConfig
from media_fixtures import espeak_wave, write_audio_only, write_talking_mp4

CONFIG = "configs/demo.py:tiny"  # windows of 17 frames at 25 fps = 0.68 s; 32x32 frames
SIZE, FPS, SR = 64, 25, 16000
NUM_TALKING = 6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _world():
    return SyntheticWorld(
        WorldConfig(video_size=SIZE, fps=FPS, sample_rate=SR, min_seconds=0.8, max_seconds=1.5, num_identities=16)
    )


def make_clips(d, num=NUM_TALKING):
    """Writes the test inputs into ``d``; returns ``{name: clip}`` of the synthetic talking clips."""
    d.mkdir(parents=True, exist_ok=True)
    world, clips = _world(), {}
    for i in range(num):
        c = world.clip(i)
        name = f"talk{i:02d}"
        audio = c.audio
        if i == 0:  # real speech when the machine has espeak-ng (the synthetic voice otherwise)
            speech = espeak_wave(c.text, str(d / "espeak.wav.tmp"), SR)
            if speech is not None:
                audio = np.pad(speech, (0, max(0, len(c.audio) - len(speech))))[: len(c.audio)] * 0.7
        write_talking_mp4(d, name, c, audio=audio, caption="json" if i == 1 else "txt")
        clips[name] = c
    # A listening clip: the face, but only faint room noise (not silence: -50 dBFS).
    c = world.clip(100)
    noise = (0.003 * np.random.default_rng(0).standard_normal(len(c.audio))).astype(np.float32)
    media.write_mp4(str(d / "listen.mp4"), c.video, FPS, noise, SR)
    write_audio_only(d, "voice", world.clip(101))  # audio only: a WAV + transcript
    # Bad inputs: corrupt, no audio stream, shorter than one window.
    (d / "x_corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    media.write_mp4(str(d / "x_mute.mp4"), world.clip(102).video, FPS, None)
    s = world.clip(103)
    media.write_mp4(str(d / "x_short.mp4"), s.video[:10], FPS, s.audio[: 10 * SR // FPS], SR)
    return clips


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ingest") / "clips"
    return d, make_clips(d)


@pytest.fixture(scope="module")
def ingested(clips_dir, tmp_path_factory):
    d, clips = clips_dir
    out = tmp_path_factory.mktemp("ingest_out") / "records"
    rc = data_cli.main(
        ["ingest", "--config", CONFIG, "--in", str(d), "--out", str(out), "--clips-per-shard", "3", "--no-progress"]
    )
    assert rc == 0
    return out, clips


def _records(out):
    ds = open_dataset(str(out), verify_checksums=True)
    return [ds[i] for i in range(len(ds))]


def _windows(seconds: float, window_s: float = 17 / 25) -> int:
    return int(np.floor(seconds / window_s + 1e-6))


def test_records_hold_exactly_the_model_schema(ingested):
    from mmdit import config_lib
    from mmdit.model.diffusion import DiffusionModel

    out, clips = ingested
    m = json.loads((out / "manifest.json").read_text())
    assert m["skipped"] == {SKIP_CORRUPT: 1, SKIP_NO_AUDIO: 1, SKIP_TOO_SHORT: 1}
    assert {s["source"] for s in m["skipped_sources"]} == {"x_corrupt.mp4", "x_mute.mp4", "x_short.mp4"}
    talking = sum(_windows(c.seconds) for c in clips.values())
    counts = m["metadata"]["counts"]
    assert counts["sources"] == NUM_TALKING + 2 + 3 and counts["audio_only"] == _windows(_world().clip(101).seconds)
    assert m["num_examples"] == counts["records"] == talking + _windows(_world().clip(100).seconds) + counts["audio_only"]

    model = DiffusionModel.from_config(config_lib.load(CONFIG))
    for f in model.input_spec().record_fields:  # every field the train step reads, exact shape and dtype
        assert m["schema"][f.name]["shape"] == list(f.shape) and m["schema"][f.name]["dtype"] == np.dtype(f.dtype).name
        assert not m["schema"][f.name]["optional"]
    recs = _records(out)
    by_source = {}
    for r in recs:
        by_source.setdefault(r["source"], []).append(r)
    for name, c in clips.items():
        rs = by_source[f"{name}.mp4"]
        assert [r["window_start_s"] for r in rs] == pytest.approx([k * 0.68 for k in range(_windows(c.seconds))])
        assert all(r["text"] == c.text and int(r["has_video"]) == 1 for r in rs)  # .txt and .json captions
        from mmdit.codecs.text import ByteTokenizer

        assert ByteTokenizer().decode(rs[0]["text_tokens"]) == c.text[:22]
    voice = by_source["voice.wav"]
    assert all(int(r["has_video"]) == 0 and not r["video_latents"].any() and r["audio_latents"].any() for r in voice)
    assert voice[0]["text"] == _world().clip(101).text


def test_face_boxes_land_on_the_rendered_face(ingested):
    out, clips = ingested
    world = _world()
    found = 0
    for r in _records(out):
        name = r["source"][:-4]
        if name not in clips or not int(r["face_found"]):
            continue
        found += 1
        ident = world.identity_params(clips[name].identity)
        x0, y0, x1, y1 = r["face_box"]
        assert abs((x0 + x1) / 2 - ident.cx / SIZE) < 0.08 and abs((y0 + y1) / 2 - ident.cy / SIZE) < 0.1
        assert 0.8 < (x1 - x0) / (2 * ident.face_rx / SIZE) < 1.8  # the cascade's box is a bit larger than the skin
    assert found >= 3
    m = json.loads((out / "manifest.json").read_text())
    fallback = [r for r in _records(out) if int(r["has_video"]) and not int(r["face_found"])]
    assert m["metadata"]["counts"]["no_face"] == len(fallback)
    assert all(r["face_box"].tolist() == [0.25, 0.25, 0.75, 0.75] for r in fallback)


def test_speaking_labels_follow_the_utterance(ingested):
    """Frames inside a vowel are speaking; frames whose whole span (+-0.15 s) lies in a pause are not;
    the listening clip is silent throughout."""
    out, clips = ingested
    agree, total = 0, 0
    for r in _records(out):
        name = r["source"][:-4]
        if name == "listen":
            assert int(r["speaking"]) == 0 and not r["speaking_frames"].any()
        if name not in clips or (name == "talk00" and shutil.which("espeak-ng")):
            continue
        phones = clips[name].phones
        for f, label in enumerate(r["speaking_frames"]):
            t0 = r["window_start_s"] + f / FPS
            t1 = t0 + 1 / FPS
            mid = (t0 + t1) / 2
            in_vowel = any(p in "aeiou" and s <= mid < e for p, s, e in phones)
            in_pause = any(p == "_" and s <= t0 - 0.15 and t1 + 0.15 <= e for p, s, e in phones)
            if in_vowel or in_pause:
                total += 1
                agree += int(label == int(in_vowel))
    assert total > 50 and agree / total > 0.95


def test_bad_arguments_name_the_flag(clips_dir, tmp_path, capsys):
    d, _ = clips_dir
    assert data_cli.main(["ingest", "--config", CONFIG, "--in", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "--in" in capsys.readouterr().err
    args = ["ingest", "--config", CONFIG, "--in", str(d), "--out", str(tmp_path / "o"), "--no-progress"]
    assert data_cli.main(args + ["--process-index", "2", "--process-count", "2"]) == 2
    assert "--process-index" in capsys.readouterr().err


KILL_DURING_SECOND_SHARD = """
import os, signal, sys
from mmdit.cli import data as data_cli
from mmdit.data import media_ingest
where = sys.argv[1]
real_commit, real_shard, calls = media_ingest.write_json_atomic, media_ingest._write_shard, []
def commit(path, obj):  # "renamed": chunk 1's shard renamed into place, its done-list entry not written
    calls.append(path)
    if where == "renamed" and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real_commit(path, obj)
def shard(out_dir, name, examples):  # "writing": chunk 1's shard half-written as *.tmp
    if where == "writing" and name.endswith("-00001.array_record"):
        with open(os.path.join(out_dir, name + ".tmp"), "wb") as f:
            f.write(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_shard(out_dir, name, examples)
media_ingest.write_json_atomic, media_ingest._write_shard = commit, shard
data_cli.main(sys.argv[2:])
"""


@pytest.mark.parametrize("where", ["renamed", "writing"])
def test_sigkilled_ingest_resumes_with_every_clip_once(ingested, clips_dir, tmp_path, where):
    d, _ = clips_dir
    out = tmp_path / "r"
    args = ["ingest", "--config", CONFIG, "--in", str(d), "--out", str(out), "--clips-per-shard", "3", "--no-progress"]
    res = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SECOND_SHARD, where, *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert not (out / "manifest.json").exists()
    state = json.loads((out / "ingest-p0of1.json").read_text())
    assert len(state["chunks"]) == 1 and not state["done"]
    leftover = "ingest-p0of1-00001.array_record" + (".tmp" if where == "writing" else "")
    assert (out / leftover).exists()  # on disk, but not in the done-list
    assert data_cli.main(args) == 0
    keys = sorted((r["source"], round(r["window_start_s"], 3)) for r in _records(out))
    assert len(keys) == len(set(keys))  # no duplicate
    reference = sorted((r["source"], round(r["window_start_s"], 3)) for r in _records(ingested[0]))
    assert keys == reference  # none lost
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert data_cli.main(args) == 0  # a finished ingest is a no-op
    assert data_cli.main(args + ["--long-clips", "first"]) == 2  # other settings: refused, --overwrite to start over


def test_hosts_ingest_their_share_and_the_last_one_commits(ingested, clips_dir, tmp_path):
    d, _ = clips_dir
    out = tmp_path / "r"
    base = ["ingest", "--config", CONFIG, "--in", str(d), "--out", str(out), "--no-progress", "--process-count", "2"]
    assert data_cli.main(base + ["--process-index", "1"]) == 0
    assert not (out / "manifest.json").exists()
    assert data_cli.main(base + ["--process-index", "0"]) == 0
    shards = sorted(n for n in os.listdir(out) if n.endswith(".array_record"))
    assert shards == ["ingest-p0of2-00000.array_record", "ingest-p1of2-00000.array_record"]
    keys = sorted((r["source"], round(r["window_start_s"], 3)) for r in _records(out))
    assert keys == sorted((r["source"], round(r["window_start_s"], 3)) for r in _records(ingested[0]))


@pytest.mark.slow
def test_training_runs_on_ingested_records(ingested, tmp_path):
    from mmdit.cli import train as train_cli

    out, _ = ingested
    wd = tmp_path / "run"
    rc = train_cli.main(["--config", CONFIG, "--workdir", str(wd), "--data", str(out), "--set", "train.steps=2", "--no-progress"])
    assert rc == 0
    lines = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 2 and np.isfinite(lines[-1]["loss"])


@pytest.mark.parametrize("preset", ["unitalking", "jamflow", "mirage", "talkingmachines"])
def test_every_preset_gets_its_schema(preset, tmp_path):
    """Reference audio (UniTalking), a motion stream (JAM-Flow), an audio-feature stream without an
    audio stream (Mirage), audio-feature conditions (TalkingMachines): exactly the schema's fields."""
    from mmdit import config_lib
    from mmdit.model.diffusion import DiffusionModel

    d = tmp_path / "clips"
    d.mkdir()
    world = SyntheticWorld(WorldConfig(video_size=SIZE, fps=FPS, sample_rate=SR, min_seconds=2.0, max_seconds=2.0))
    for i in range(2):
        write_talking_mp4(d, f"c{i}", world.clip(i), caption=None)
    config = f"configs/{preset}.py:tiny"
    assert data_cli.main(["ingest", "--config", config, "--in", str(d), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    recs = _records(tmp_path / "r")
    assert recs
    for f in DiffusionModel.from_config(config_lib.load(config)).input_spec().record_fields:
        for r in recs:
            assert np.shape(r[f.name]) == tuple(f.shape) and np.asarray(r[f.name]).dtype == np.dtype(f.dtype), f.name
    if preset == "unitalking":  # the neighbouring window's audio: the same voice, another utterance
        assert len(recs) >= 2 and not np.array_equal(recs[0]["ref_audio"], recs[1]["ref_audio"])
