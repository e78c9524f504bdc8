"""Training end to end on the tiny demo config: SIGKILL after a checkpoint, rerun, identical losses."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from mmdit import config_lib
from mmdit.data.synth_records import synth

KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from mmdit import config_lib
    from mmdit.train.loop import train
    cfg = config_lib.override(config_lib.load(sys.argv[1]), sys.argv[4:])
    kill_at = int(sys.argv[3])
    def hook(step, state, writer):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    train(cfg, sys.argv[2], progress=False, sample_hook=hook)
    """
)

OVERRIDES = [
    "train.steps=6",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "train.sample_every=1",
    "train.async_checkpoint=False",
]


def losses(workdir):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec["loss"]
    return out


def run(args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, **kw)


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(tmp_path):
    cfg_path = "configs/demo.py:tiny"
    cfg = config_lib.load(cfg_path)
    for wd in ("a", "b"):
        synth(cfg, str(tmp_path / wd / "data"), num_eval=0, progress=False)  # no eval split: no TensorBoard sampling
    script = tmp_path / "kill_train.py"
    script.write_text(KILL_SCRIPT)

    full = run(
        [
            "-m",
            "mmdit.cli.train",
            "--config",
            cfg_path,
            "--workdir",
            str(tmp_path / "a"),
            "--no-progress",
            *sum([["--set", o] for o in OVERRIDES], []),
        ]
    )
    assert full.returncode == 0, full.stderr[-3000:]

    killed = run([str(script), cfg_path, str(tmp_path / "b"), "5", *OVERRIDES])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    before = losses(tmp_path / "b")
    assert max(before) == 5 and os.path.isdir(tmp_path / "b" / "checkpoints" / "4")

    resumed = run(
        [
            "-m",
            "mmdit.cli.train",
            "--config",
            cfg_path,
            "--workdir",
            str(tmp_path / "b"),
            "--no-progress",
            *sum([["--set", o] for o in OVERRIDES], []),
        ]
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 4" in resumed.stdout  # after the step-4 checkpoint, not from scratch
    assert "taking the lock over" in resumed.stderr  # the killed run's workdir lock
    with open(tmp_path / "b" / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 5 of the killed run trimmed, then logged again once

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert a[step] == b[step], (step, a[step], b[step])  # exact on CPU


@pytest.mark.slow
def test_resuming_with_a_different_model_is_refused(tmp_path):
    cfg_path = "configs/demo.py:tiny"
    synth(config_lib.load(cfg_path), str(tmp_path / "data"), progress=False)
    ok = run(
        ["-m", "mmdit.cli.train", "--config", cfg_path, "--workdir", str(tmp_path), "--no-progress", "--set", "train.steps=3"]
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = run(
        [
            "-m",
            "mmdit.cli.train",
            "--config",
            cfg_path,
            "--workdir",
            str(tmp_path),
            "--no-progress",
            "--set",
            "model.num_layers=3",
        ]
    )
    assert bad.returncode == 2
    assert "different model" in bad.stderr and "model.num_layers was 2, now 3" in bad.stderr
    assert os.path.isdir(tmp_path / "checkpoints" / "3")  # nothing lost


def test_missing_data_dir_is_a_clear_error(tmp_path):
    out = run(["-m", "mmdit.cli.train", "--config", "configs/demo.py:tiny", "--workdir", str(tmp_path), "--no-progress"])
    assert out.returncode == 2
    assert "mmdit-data synth" in out.stderr or "data" in out.stderr
