"""Silence labels on the synthetic world (issue 14): synth writes the world's own ``speaking_frames`` /
``speaking`` when a condition has ``silence_labels``, and ``configs/demo_talking.py:tiny`` trains and
runs ``bench/silence_mouth.py`` end to end."""

import json
import os
import sys

import numpy as np
import pytest

from mmdit import config_lib
from mmdit.data.synth_records import EVAL_INDEX_OFFSET, RecordMaker, utterance_frame_labels, world_from_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_utterance_frame_labels_need_half_a_frame_inside():
    spans = np.stack([np.arange(5) / 25, (np.arange(5) + 1) / 25], axis=1)  # 40 ms frames from 0 s
    np.testing.assert_array_equal(utterance_frame_labels((0.05, 0.13), spans), [0, 1, 1, 0, 0])  # 30/40, 40/40, 10/40 ms
    np.testing.assert_array_equal(utterance_frame_labels((0.06, 0.2), spans), [0, 1, 1, 1, 1])  # frame 1: exactly half
    np.testing.assert_array_equal(utterance_frame_labels(None, spans), [0] * 5)


def test_synth_writes_the_worlds_speaking_labels_only_when_the_model_needs_them():
    cfg = config_lib.load("configs/demo_talking.py:tiny")
    world = world_from_config(cfg)
    maker = RecordMaker(cfg, world)
    frames = cfg.model.streams.video.shape[0]
    for i in (0, 1, EVAL_INDEX_OFFSET):
        ex = maker.record(i)
        clip = world.clip(i)
        start, end = clip.utterance_span
        centres = (np.arange(frames) + 0.5) / clip.fps  # temporal=1: a latent frame is one 40 ms video frame
        assert ex["speaking_frames"].dtype == np.int32 and ex["speaking_frames"].shape == (frames,)
        np.testing.assert_array_equal(ex["speaking_frames"], ((centres >= start) & (centres < end)).astype(np.int32))
        assert ex["speaking_frames"][0] == 0  # every utterance starts with a pause: silence mode
        assert int(ex["speaking"]) == 1  # a clip that speaks (>= 20 % of its frames)
    demo = config_lib.load("configs/demo.py:tiny")  # no silence embedding: no labels
    ex = RecordMaker(demo, world_from_config(demo)).record(0)
    assert "speaking_frames" not in ex and "speaking" not in ex


@pytest.mark.slow
def test_demo_talking_tiny_trains_and_the_silence_bench_runs(tmp_path):
    from mmdit.data.synth_records import synth
    from mmdit.train.loop import train

    sys.path.insert(0, os.path.join(REPO, "bench"))
    import silence_mouth

    cfg = config_lib.load("configs/demo_talking.py:tiny")
    work = str(tmp_path / "run")
    synth(cfg, os.path.join(work, "data"), progress=False)
    train(cfg, work, progress=False, log=lambda *_: None)
    out = str(tmp_path / "silence_mouth.json")
    results = silence_mouth.main(["--workdir", work, "--num", "2", "--out", out])
    with open(out) as f:
        saved = json.load(f)
    assert saved["clips"] == 2 and saved["step"] == cfg.train.steps
    rows = results["openings"]
    assert set(rows) == {"ground_truth", "speaking", "silence", "listen_2nd_half", "untrained_speaking"}
    gt = rows["ground_truth"]
    assert gt["speech_frames"] > gt["silent_frames"] >= 0.0  # the world's mouths open when they speak
    assert all(np.isfinite(r["speech_frames"]) for r in rows.values())
    assert rows["speaking"]["speech_frames"] != rows["silence"]["speech_frames"]  # the mode reaches the output

    # the CLI samples in silence mode and records the spans it used in samples.json
    from mmdit.cli import sample as sample_cli

    out_dir = str(tmp_path / "samples")
    assert sample_cli.main(["--workdir", work, "--silence", "0:0.2", "--num", "1", "--out", out_dir, "--no-progress"]) == 0
    with open(os.path.join(out_dir, "samples.json")) as f:
        entry = json.load(f)["samples"][0]
    assert entry["inputs"]["speaking_frames"] == "--silence 0:0.2"
