"""Reliability through the real entry points: bad values fail before any work with one line naming
the flag or file; corruption is detected before any sample or train step; one writer per directory;
a corrupt latest checkpoint falls back to the previous step; a SIGKILL during a checkpoint save, an
export or a dataset write leaves the previous complete state usable and nothing that looks complete
but is not.

One tiny trained workdir (``configs/demo.py:tiny``, 4 steps, checkpoints at 2 and 4) is shared by
the module; tests that change it work on copies.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

# most tests here read the run_dir fixture: one worker builds it once (pytest.ini's --dist loadgroup)
pytestmark = pytest.mark.xdist_group("cli_errors_run_dir")

CONFIG = "configs/demo.py:tiny"
TRAIN_SETS = [
    "train.checkpoint_every=2",
    "train.log_every=1",
    "train.global_batch_size=2",
    "train.sample_every=0",
    "train.async_checkpoint=False",
]
ERROR_LINE = re.compile(r"^mmdit[- ]?\w*: error: ")


def _sets(*extra):
    return sum([["--set", s] for s in [*TRAIN_SETS, *extra]], [])


def run(args, timeout=600, **kw):
    env = {**os.environ, "MMDIT_DEBUG": ""}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, **kw)


def assert_one_error_line(stderr: str, *needles: str) -> str:
    """Exactly one ``PROG: error: ...`` line, containing every needle; no traceback, no orbax noise."""
    lines = [line for line in stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "Event loop is closed" not in stderr, stderr[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def snapshot(root) -> dict:
    """{relative path: (size, mtime_ns)} of every file under ``root`` except lock files."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".lock"):
                p = os.path.join(d, f)
                st = os.stat(p)
                out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def flip_bit(path) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


def largest_file(directory) -> str:
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def steps_logged(workdir) -> list[int]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A trained tiny workdir: data (4 train + 2 eval clips), checkpoints at steps 2 and 4."""
    from mmdit import config_lib
    from mmdit.data.synth_records import synth

    wd = tmp_path_factory.mktemp("run")
    synth(config_lib.load(CONFIG), str(wd / "data"), num=4, num_eval=2, progress=False)
    out = run(["-m", "mmdit.cli.train", "--config", CONFIG, "--workdir", str(wd), "--no-progress", *_sets("train.steps=4")])
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4"]
    assert os.path.isfile(wd / "checkpoints" / "4" / "sha256.json")
    return wd


def copy_run(run_dir, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(run_dir, dst)
    return dst


# ------------------------------------------------------------------------------------------------
# Bad values: one line naming the flag/field/file, exit 2, before any work, nothing changed.

DRIVER = textwrap.dedent(
    """
    import contextlib, importlib, io, json, sys
    results = []
    for module, argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = importlib.import_module(module).main(argv)
            except SystemExit as e:
                rc = e.code
        results.append([rc, err.getvalue()])
    print(json.dumps(results))
    """
)


def _cases(rd, fresh):
    """(module, argv, substrings of the error line)."""
    t, s, e, x = "mmdit.cli.train", "mmdit.cli.sample", "mmdit.cli.export", "mmdit.cli.eval"
    return [
        ("mmdit.cli.info", ["--config", "/nonexistent/dir/demo.py:tiny"], ["/nonexistent/dir/demo.py", "no file"]),
        (
            "mmdit.cli.info",
            ["--config", "configs/demo.py:tinyy"],
            ["'tinyy'", "valid variants: ", "plain", "e.g. configs/demo.py:tiny"],
        ),
        ("mmdit.cli.info", ["--config", "README.md"], ["README.md", "not a Python config"]),
        ("mmdit.cli.info", ["--config", "no_such_preset"], ["no_such_preset", "presets"]),
        ("mmdit.cli.info", ["--config", CONFIG, "--batch", "-4"], ["--batch -4"]),
        ("mmdit.cli.info", ["--config", CONFIG, "--set", "train.global_batch_size=0"], ["train.global_batch_size=0"]),
        ("mmdit.cli.info", ["--config", CONFIG, "--set", "train.stepz=3"], ["train.stepz", "train.steps"]),
        (t, ["--config", CONFIG, "--workdir", fresh, "--set", "train.steps=-5"], ["train.steps=-5"]),
        (t, ["--config", CONFIG, "--workdir", fresh, "--set", "train.steps=0"], ["train.steps=0"]),
        (t, ["--config", CONFIG, "--workdir", fresh, "--data", fresh + "/nodata"], ["nodata", "manifest.json"]),
        (t, ["--config", CONFIG, "--workdir", rd, "--set", "model.num_layers=3"], ["different model", "model.num_layers"]),
        (
            t,
            ["--config", CONFIG, "--workdir", fresh, "--data", rd + "/data/train", "--set", "codecs.video.residual_gain=3.0"],
            ["data/train", "other codecs", "codecs.video.residual_gain"],
        ),
        ("mmdit.cli.data", ["synth", "--config", CONFIG, "--out", fresh, "--num", "0"], ["--num 0"]),
        (x, ["--workdir", rd, "--num", "0"], ["--num 0"]),
        (x, ["--workdir", fresh + "/nope"], ["nope", "no such directory"]),
        (e, ["--workdir", rd, "--out", fresh + "/bundle", "--platforms", "foo"], ["--platforms", "foo"]),
        (e, ["--workdir", rd, "--out", fresh + "/bundle", "--step", "7"], ["step 7", "[2, 4]", "--step"]),
        (s, ["--workdir", rd, "--shift", "-1"], ["--shift -1"]),
        (s, ["--workdir", rd, "--steps", "0"], ["--steps 0"]),
        (s, ["--workdir", rd, "--num", "0"], ["--num 0"]),
        (s, ["--workdir", rd, "--task", "a2v", "--audio", fresh + "/missing.wav"], ["--audio", "missing.wav"]),
        (s, ["--workdir", rd, "--text", "caf\udce9"], ["--text", "UTF-8"]),
        (s, ["--bundle", fresh + "/no_bundle", "--out", fresh + "/o"], ["no_bundle"]),
    ]


@pytest.mark.slow
def test_bad_values_fail_with_one_line_before_any_work(run_dir, tmp_path):
    fresh = str(tmp_path / "fresh")
    cases = _cases(str(run_dir), fresh)
    before = snapshot(run_dir)
    out = run(["-c", DRIVER, json.dumps([[m, a] for m, a, _ in cases])])
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for (module, argv, needles), (rc, stderr) in zip(cases, results):
        assert rc == 2, (module, argv, rc, stderr[-2000:])
        assert_one_error_line(stderr, *needles)
    assert snapshot(run_dir) == before  # nothing pre-existing changed
    assert not os.path.exists(os.path.join(fresh, "config.json"))  # config.json only after validation
    assert not os.path.exists(os.path.join(fresh, "bundle"))


@pytest.mark.slow
def test_program_failures_are_one_line_and_debug_shows_the_traceback(tmp_path):
    out = run(["-m", "mmdit.cli.info", "--config", "/nonexistent/dir/demo.py:tiny"])
    assert out.returncode == 2
    assert_one_error_line(out.stderr, "no file")
    out = run(["-m", "mmdit.cli.main", "info", "--config", "configs/demo.py:tiny", "--batch", "0", "--debug"])
    assert out.returncode == 1 and "Traceback" in out.stderr and "--batch 0" in out.stderr


@pytest.mark.slow
def test_sample_says_when_inputs_are_cut_or_come_from_eval_records(run_dir, tmp_path):
    import numpy as np
    import soundfile

    wav = tmp_path / "ten_seconds.wav"
    soundfile.write(str(wav), (0.1 * np.sin(np.arange(160000) / 10)).astype(np.float32), 16000)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")  # an output path that fails the preflight, after the inputs are gathered
    s, rd, out = "mmdit.cli.sample", str(run_dir), str(not_a_dir)
    cases = [
        [s, ["--workdir", rd, "--task", "a2v", "--text", "la " * 30000, "--audio", str(wav), "--out", out]],
        [s, ["--workdir", rd, "--task", "t2av", "--num", "1", "--out", out]],
    ]
    res = run(["-c", DRIVER, json.dumps(cases)])
    assert res.returncode == 0, res.stderr[-3000:]
    (rc_cut, err_cut), (rc_eval, err_eval) = json.loads(res.stdout.strip().splitlines()[-1])
    assert rc_cut == 2 and rc_eval == 2
    assert_one_error_line(err_cut, "is not a directory")
    assert "--text is 90000 bytes; the model reads only the first 22" in err_cut
    assert f"{wav} is 10.00 s; using its first 0.68 s" in err_cut
    assert "no --text: the transcripts come from the eval records" in err_eval


# ------------------------------------------------------------------------------------------------
# Corruption: detected before any sample/train step.


@pytest.mark.slow
def test_corrupt_checkpoint_step_is_named_before_sampling(run_dir, tmp_path):
    wd = copy_run(run_dir, tmp_path)
    flip_bit(largest_file(wd / "checkpoints" / "4" / "state"))
    out = run(["-m", "mmdit.cli.sample", "--workdir", str(wd), "--step", "4", "--no-progress"])
    assert out.returncode == 2
    assert_one_error_line(out.stderr, "step 4", "corrupt", "sha256", "--step")
    assert not os.path.exists(wd / "samples")  # nothing sampled

    # A deleted _METADATA with the check skipped: still "corrupt", not "does not match this model".
    (wd / "checkpoints" / "2" / "state" / "_METADATA").unlink()
    out = run(["-m", "mmdit.cli.export", "--workdir", str(wd), "--out", str(tmp_path / "b"), "--step", "2", "--no-verify"])
    assert out.returncode == 2
    line = assert_one_error_line(out.stderr, "step 2", "corrupt", "_METADATA")
    assert "does not match" not in line
    assert not os.path.exists(tmp_path / "b")


@pytest.mark.slow
def test_corrupt_data_shard_is_caught_by_verify_data(run_dir, tmp_path):
    wd = copy_run(run_dir, tmp_path)
    manifest_path = wd / "data" / "train" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["sha256"] = "0" * 64  # a wrong hash in the manifest
    manifest_path.write_text(json.dumps(manifest))
    before = snapshot(wd)
    out = run(["-m", "mmdit.cli.train", "--config", CONFIG, "--workdir", str(wd), "--no-progress", *_sets("train.steps=6")])
    assert out.returncode == 2
    assert_one_error_line(out.stderr, "sha256", manifest["shards"][0]["file"])
    assert snapshot(wd) == before  # no step trained, nothing written


# ------------------------------------------------------------------------------------------------
# One writer per workdir + a corrupt latest checkpoint falls back (one training run for both).


@pytest.mark.slow
def test_lock_refuses_a_second_writer_and_corrupt_latest_falls_back(run_dir, tmp_path):
    wd = copy_run(run_dir, tmp_path)
    flip_bit(largest_file(wd / "checkpoints" / "4" / "state"))
    # A lock file left by a killed run (its pid no longer holds the flock): taken over with a warning.
    (wd / ".mmdit.lock").write_text(json.dumps({"pid": 999999, "host": "gone", "command": "mmdit-train (killed)"}) + "\n")
    cmd = ["-m", "mmdit.cli.train", "--config", CONFIG, "--workdir", str(wd), "--no-progress", *_sets("train.steps=4")]
    env = {**os.environ, "MMDIT_DEBUG": ""}
    first = subprocess.Popen([sys.executable, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and f'"pid": {first.pid}' not in (wd / ".mmdit.lock").read_text():
        assert first.poll() is None, first.communicate()
        time.sleep(0.2)
    second = run(cmd)
    assert second.returncode == 2
    assert_one_error_line(second.stderr, f"pid {first.pid}", f"host {socket.gethostname()}", "in use")
    stdout, stderr = first.communicate(timeout=900)
    assert first.returncode == 0, stderr[-3000:]
    assert "pid 999999 on host gone" in stderr and "taking the lock over" in stderr
    assert "warning: checkpoint step 4 is corrupt" in stderr and "falling back to step 2" in stderr
    assert "resuming from step 2" in stdout
    moved = os.listdir(wd / "checkpoints_corrupt")
    assert len(moved) == 1 and moved[0].startswith("4-")  # kept, never deleted
    assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4"]
    assert steps_logged(wd) == [1, 2, 3, 4]  # metrics.jsonl trimmed to step 2 before steps 3-4 were redone
    assert (wd / ".mmdit.lock").read_text() == ""  # released cleanly

    again = run(cmd)  # the same command again: nothing to do
    assert again.returncode == 0 and "already at step 4" in again.stdout, again.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# SIGKILL during a checkpoint save, an export, a dataset write.

KILL_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import jax
    from mmdit.train import checkpoint
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.train.state import init_state, make_optimizer
    from mmdit import config_spec
    wd, where = sys.argv[1], sys.argv[2]
    cfg = checkpoint.load_config(wd)
    model = DiffusionModel.from_config(cfg)
    tx = make_optimizer(config_spec.train_spec(cfg))
    abstract = jax.eval_shape(lambda: init_state(model, tx, jax.random.key(0)))
    manager = checkpoint.make_manager(wd, config_spec.train_spec(cfg))
    state = checkpoint.restore(manager, abstract)
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "commit":  # all files written, the step directory not yet renamed into place
        from orbax.checkpoint._src.path import atomicity
        atomicity.AtomicRenameTemporaryPath.finalize = die
    else:  # committed by orbax, sha256.json not yet written
        checkpoint.record_checksums = die
    checkpoint.save(manager, 6, state)
    checkpoint.finish(manager)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["commit", "checksums"])
def test_sigkill_during_checkpoint_save_keeps_the_previous_step(run_dir, tmp_path, where):
    from mmdit.train import checkpoint

    wd = copy_run(run_dir, tmp_path)
    out = run(["-c", KILL_SAVE, str(wd), where])
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    steps = sorted(int(n) for n in os.listdir(wd / "checkpoints") if n.isdigit())
    cfg, params, step = checkpoint.restore_inference(str(wd))
    if where == "commit":
        assert steps == [2, 4] and step == 4  # the half-written step 6 is not a step
    else:
        assert steps == [4, 6] and step == 6  # complete (orbax rotated step 2 out), restored unverified
    for s in steps:  # nothing that looks complete but is not
        checkpoint.restore_inference(str(wd), step=s)


KILL_EXPORT = textwrap.dedent(
    """
    import os, signal, sys
    from mmdit.serve import export
    from mmdit.train.checkpoint import restore_inference
    wd, out, where = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg, params, step = restore_inference(wd)
    if where == "first":
        export.export_bundle(cfg, params, out, step=step, platforms=["cpu"])
        where = "params"
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "params":  # while writing the new bundle's params
        import orbax.checkpoint as ocp
        ocp.StandardCheckpointer.save = die
    else:  # between moving the old bundle aside and moving the new one in
        real = os.replace
        def replace(a, b):
            real(a, b)
            if ".old-" in str(b):
                die()
        os.replace = replace
    export.export_bundle(cfg, params, out, step=2, platforms=["cpu"])
    """
)


@pytest.mark.slow
def test_sigkill_during_export_keeps_the_previous_bundle(run_dir, tmp_path):
    from mmdit.serve import export

    out = str(tmp_path / "bundle")
    for where in ("first", "rename"):
        res = run(["-c", KILL_EXPORT, str(run_dir), out, where])
        assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
        leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".bundle.")]
        assert leftovers, os.listdir(tmp_path)
        if where == "rename":
            assert not os.path.exists(out)  # killed between the renames: only the moved-aside copy
        notes = export._recover_and_clean(out)  # what the next mmdit-export does first
        assert notes and not [n for n in os.listdir(tmp_path) if n.startswith(".bundle.") and not n.endswith(".lock")]
        b = export.load_bundle(out)
        assert b.manifest["step"] == 4  # the previous complete bundle (the killed export said step 2)


KILL_SYNTH = textwrap.dedent(
    """
    import os, signal, sys
    from mmdit import config_lib
    from mmdit.data import records
    from mmdit.data.synth_records import synth
    cfg = config_lib.override(config_lib.load(sys.argv[1]), ["seed=7"])
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    records.write_json_atomic = die  # the new shards are in place, the manifest not yet replaced
    synth(cfg, sys.argv[2], num=3, num_eval=0, progress=False)
    """
)


@pytest.mark.slow
def test_sigkill_while_synth_commits_keeps_the_previous_dataset(tmp_path):
    from mmdit import config_lib
    from mmdit.data import records
    from mmdit.data.synth_records import synth

    cfg = config_lib.load(CONFIG)
    out = tmp_path / "data"
    synth(cfg, str(out), num=2, num_eval=0, progress=False)
    before = (out / "train" / "manifest.json").read_text()
    res = run(["-c", KILL_SYNTH, CONFIG, str(out)])
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert (out / "train" / "manifest.json").read_text() == before
    ds = records.open_dataset(str(out / "train"), verify_checksums=True)  # the previous dataset, whole
    assert len(ds) == 2 and ds[1]["clip_index"] == 1
    orphans = [n for n in os.listdir(out / "train") if n.endswith(".array_record") and n not in before]
    assert orphans  # the killed writer's shards: never listed, so never read
    synth(cfg, str(out), num=3, num_eval=0, progress=False)  # the next writer commits and cleans up
    m = records.read_manifest(str(out / "train"))
    assert m["num_examples"] == 3
    assert sorted(n for n in os.listdir(out / "train") if n.endswith((".array_record", ".tmp"))) == sorted(
        s["file"] for s in m["shards"]
    )


# ------------------------------------------------------------------------------------------------
# Cheap unit checks (no subprocess training).


def test_lock_names_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    from mmdit.util.lock import DirLock, LockHeld

    held = DirLock(str(tmp_path), command="first").acquire()
    with pytest.raises(LockHeld, match=rf"pid {os.getpid()} on host {re.escape(socket.gethostname())} \(first"):
        DirLock(str(tmp_path), command="second").acquire()
    held.release()
    # A process killed while holding the lock: the kernel drops the flock, the file still names it.
    code = (
        f"from mmdit.util.lock import DirLock; import os, signal; DirLock({str(tmp_path)!r}).acquire(); os.kill(os.getpid(), 9)"
    )
    assert run(["-c", code]).returncode == -signal.SIGKILL
    warnings = []
    with DirLock(str(tmp_path), warn=warnings.append):
        pass
    assert len(warnings) == 1 and "ended without releasing it" in warnings[0]


def test_preflight_names_the_directory_when_space_is_short(tmp_path, monkeypatch):
    import errno
    import shutil as shutil_mod

    from mmdit.cli.errors import describe
    from mmdit.util import preflight

    preflight.check_output_dir(str(tmp_path / "new"), 1 << 20, "a test")
    assert os.path.isdir(tmp_path / "new") and os.listdir(tmp_path / "new") == []  # the probe file is gone
    monkeypatch.setattr(shutil_mod, "disk_usage", lambda p: shutil_mod._ntuple_diskusage(100, 100, 10))
    with pytest.raises(OSError) as e:
        preflight.check_output_dir(str(tmp_path), 1 << 30, "3 checkpoint(s)")
    assert e.value.errno == errno.ENOSPC
    msg = describe(e.value)
    assert str(tmp_path) in msg and "3 checkpoint(s)" in msg and "\n" not in msg
    ro = OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run")
    assert describe(ro) == "/mnt/ro/run: the filesystem is read-only: choose a writable output directory"


def test_trim_metrics_drops_steps_after_the_restored_one(tmp_path):
    from mmdit.train.loop import trim_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert trim_metrics(str(path), 3) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
