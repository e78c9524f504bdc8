"""README's main job, end to end on the tiny demo config: synth -> train -> sample -> eval.
Also checks the MP4s (one H.264 + one AAC stream of the right duration) and that TensorBoard's own
event reader sees the scalars, the sample video (GIF image) and its audio."""

import json
import os
import subprocess
import sys

import pytest

from mmdit.data import media


@pytest.mark.slow
def test_mmdit_demo_tiny_end_to_end(tmp_path):
    wd = tmp_path / "demo"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmdit.cli.main",
            "demo",
            "--config",
            "configs/demo.py:tiny",
            "--workdir",
            str(wd),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    for task in ("ground_truth", "t2av", "ti2av", "tv2a", "a2v"):
        assert task in out.stdout
    assert "tensorboard --logdir" in out.stdout

    result = json.loads((wd / "eval" / "eval.json").read_text())
    assert set(result["summary"]) == {"ground_truth", "t2av", "ti2av", "tv2a", "a2v"}
    assert result["summary"]["ground_truth"]["sync_corr_mean"] > 0.5  # the metric works on this world
    mp4s = sorted((wd / "eval").glob("*.mp4"))
    assert len(mp4s) == 4
    info = media.probe(str(mp4s[0]))
    kinds = sorted(s["type"] for s in info["streams"])
    assert kinds == ["audio", "video"], info
    video = next(s for s in info["streams"] if s["type"] == "video")
    audio = next(s for s in info["streams"] if s["type"] == "audio")
    assert video["codec"] == "h264" and audio["codec"] == "aac"
    assert abs(video["duration_s"] - 17 / 25) < 0.05 and abs(audio["duration_s"] - 17 / 25) < 0.1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(wd / "tensorboard"), size_guidance={"images": 0, "audio": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for scalar in ("loss", "loss/video", "loss/audio", "grad_norm", "lr", "steps_per_sec", "tokens_per_sec", "loss_task/t2av"):
        assert scalar in tags["scalars"], (scalar, tags["scalars"])
    assert any(t.startswith("samples/") for t in tags["images"]), tags["images"]
    assert any(t.startswith("samples/") for t in tags["audio"]), tags["audio"]
    assert os.path.exists(wd / "config.json")

    # mmdit-eval on the same workdir: one task, and the cross-stream probe (file + table).
    from mmdit.cli import eval as eval_cli

    rc = eval_cli.main(["--workdir", str(wd), "--tasks", "t2av", "--num", "2", "--probe", "--out", str(tmp_path / "eval2")])
    assert rc == 0
    probe = json.loads((tmp_path / "eval2" / "cross_stream_probe.json").read_text())
    assert set(probe) == {"video", "audio"}
    for per_sigma in probe.values():
        for r in per_sigma.values():
            assert r["right"] > 0 and r["ratio_other_clip"] > 0 and r["ratio_time_shifted"] > 0
    assert (tmp_path / "eval2" / "t2av_0.mp4").exists()
    assert eval_cli.main(["--workdir", str(tmp_path / "nope")]) == 2

    # the same workdir under other codecs: its records would be read as something else -> refused, nothing lost
    again = [sys.executable, "-m", "mmdit.cli.main", "demo", "--config", "configs/demo.py:tiny", "--workdir", str(wd)]
    out = subprocess.run(again + ["--set", "codecs.video.residual_gain=3.0"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "codecs.video.residual_gain" in out.stderr and "new --workdir" in out.stderr, out.stderr[
        -2000:
    ]
    assert (wd / "data" / "train" / "manifest.json").exists() and (wd / "eval" / "eval.json").exists()
