"""bench/distill_table.py end to end on a tiny teacher + a tiny exported student: every row and column is
filled, the teacher rows are exactly what ``mmdit-eval`` reports at those steps, bad flags are refused."""

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest

from mmdit import config_lib, config_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "distill_table.py")


def load_bench():
    if "distill_table" not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location("distill_table", SCRIPT)
        sys.modules["distill_table"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["distill_table"])
    return sys.modules["distill_table"]


def init_checkpoint(cfg, workdir):
    """A training workdir holding ``cfg`` and a step-0 checkpoint of freshly initialised params."""
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.train import checkpoint
    from mmdit.train.state import init_state, make_optimizer

    model = DiffusionModel.from_config(cfg)
    state = init_state(model, make_optimizer(config_spec.train_spec(cfg)), jax.random.key(0))
    config_lib.write_resolved(cfg, str(workdir))
    manager = checkpoint.make_manager(str(workdir), config_spec.train_spec(cfg))
    checkpoint.save(manager, 0, state)
    checkpoint.finish(manager)
    return state


def tiny_student(tmp_path, teacher):
    """A distill workdir whose ``student/`` is what ``mmdit distill`` exports (its config: the step list's
    length, no CFG), holding initialised params: the bench only needs a chunk-causal student to stream."""
    from mmdit.distill.loop import export_student
    from mmdit.distill.spec import distill_spec
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.train.state import init_state, make_optimizer

    cfg = config_lib.load("configs/demo_distill.py:tiny")
    cfg.distill.teacher = str(teacher)
    state = init_state(DiffusionModel.from_config(cfg), make_optimizer(config_spec.train_spec(cfg)), jax.random.key(1))
    export_student(cfg, distill_spec(cfg), str(tmp_path / "dist"), state, 0)
    return tmp_path / "dist"


@pytest.mark.slow
def test_distill_table_end_to_end(tmp_path, capsys):
    from mmdit.data.synth_records import synth
    from mmdit.eval.run import evaluate
    from mmdit.train.checkpoint import restore_inference_params

    teacher_cfg = config_lib.load("configs/demo.py:tiny,plain")  # 4 Euler steps, text CFG
    synth(teacher_cfg, str(tmp_path / "teacher" / "data"), num=2, num_eval=3, progress=False)
    init_checkpoint(teacher_cfg, tmp_path / "teacher")
    dist = tiny_student(tmp_path, tmp_path / "teacher")
    out = tmp_path / "table.json"
    bench = load_bench()
    argv = ["--teacher", str(tmp_path / "teacher"), "--student", f"s1={dist}", "--num", "3"]
    argv += ["--teacher-steps", "2", "--repeats", "1", "--fast-compile", "--batch", "2", "--out", str(out)]
    argv += ["--stream-batch", "--stream-chunks", "20"]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())

    assert list(res["rows"]) == ["teacher@2", "s1", "s1+sb", "untrained"]
    assert res["num_clips"] == 3 and res["machine"]["usable_cores"] >= 1 and len(res["load_avg_start"]) == 3
    student = res["rows"]["s1"]
    assert student["kind"] == "student" and student["steps"] == 2 and student["guidance"] == {}
    assert student["chunk_frames"] == 1.0 and student["chunks_per_clip"] == 17
    for name, row in res["rows"].items():
        for task in ("t2av", "a2v"):
            r = row["tasks"][task]
            assert r["num"] == 3
            for metric in ("sync_corr_at_0", "change_corr", "sync_corr"):
                figs = r["sync"][metric]
                assert figs["ceiling"] == res["ground_truth"]["sync"][metric]["score"]
                assert all(np.isfinite(figs[k]) for k in ("score", "chance_mismatched", "chance_shuffled"))
            assert np.isfinite(r["fd"]) and np.isfinite(r["fd_floor"]) and r["flicker"] >= 0
            assert 0 < r["identity_thumb_cos_mean"] <= 1.0001
            timing = row["timing"].get(task)
            if name == "untrained":
                assert timing is None
            else:
                assert timing["dit_s"]["median"] > 0 and len(timing["dit_s"]["runs"]) == 1
                assert timing["dit_s"]["min"] <= timing["dit_s"]["median"]
                assert timing["with_decode_s"]["median"] > 0
                assert timing["dit_per_media_s"] == pytest.approx(timing["dit_s"]["median"] / res["media_seconds_per_clip"])
                # --batch 2: the DiT timed on 2 clips per call, reported per clip
                assert timing["dit_b2_s"]["median"] > 0 and len(timing["dit_b2_s"]["runs"]) == 1
                want = timing["dit_b2_s"]["min"] / 2 / res["media_seconds_per_clip"]
                assert timing["dit_b2_per_media_min_s"] == pytest.approx(want)
            assert f"| {name} | {task} |" in printed
    assert "with_decode_overlapped_s" in student["timing"]["t2av"]
    # --stream-chunks 20: the students also timed on a 20-chunk stream, per second of its media
    t = student["timing"]["a2v"]
    assert t["stream20_per_media_min_s"] == pytest.approx(t["stream20_s"]["min"] / (20 * student["seconds_per_chunk"]))
    assert not any(k.startswith("stream") for k in res["rows"]["teacher@2"]["timing"]["t2av"])  # students only
    assert "s/s stream 20 chunks (min) |" in printed and "20-chunk stream:" in res["goals"][0]
    # --stream-batch: the same student streamed with sample.stream_batch samples the same clips
    sb = res["rows"]["s1+sb"]
    assert sb["stream_batch"] and not student["stream_batch"] and "stream20_s" in sb["timing"]["t2av"]
    for task in ("t2av", "a2v"):
        for key in ("fraction_at_0", "fd", "flicker"):
            assert sb["tasks"][task][key] == pytest.approx(student["tasks"][task][key], rel=1e-3, abs=1e-6), key
    assert res["batch"] == 2 and "s/s DiT b2 (min) |" in printed
    assert res["goals"] and res["goals"][0].startswith("s1 t2av: r@0")

    assert "| untrained | t2av |" in printed and "=teacher" in printed.split("| untrained | t2av |")[1].split("\n")[0]
    # --reuse keeps every row of the same teacher/data/clips/tasks instead of sampling again
    assert bench.main(argv + ["--reuse"]) == 0
    assert "s1: reused" in capsys.readouterr().err
    assert json.loads(out.read_text())["rows"] == res["rows"]

    # the teacher rows are mmdit-eval's figures at those steps (same clips, same seeds; the tolerance covers
    # --fast-compile's different float rounding, far below what another seed or sampler would change)
    cfg, params = restore_inference_params(str(tmp_path / "teacher"))
    cfg.sample.steps = 2
    ref = evaluate(cfg, params, str(tmp_path / "teacher" / "data" / "eval"), num=3, tasks=("t2av",), write_videos=False)
    mine = res["rows"]["teacher@2"]["tasks"]["t2av"]
    for key in ("sync_corr_mean", "fraction_at_0", "fd", "flicker", "identity_thumb_cos_mean"):
        assert mine[key] == pytest.approx(ref["t2av"][key], rel=1e-3, abs=1e-6), key
    assert res["rows"]["teacher@2"]["tasks"]["a2v"]["fd"] != pytest.approx(ref["t2av"]["fd"], rel=1e-3)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--student", "nameless"], "use NAME=WORKDIR"),
        (["--student", "x=/nonexistent/dist"], "/nonexistent/dist/student/config.json"),
        (["--tasks", "tv2a"], "subset of t2av,a2v"),
        (["--num", "1"], "at least 2"),
        (["--batch", "0"], "--batch 0"),
        (["--stream-chunks", "-1"], "--stream-chunks -1"),
    ],
)
def test_bad_flags_are_refused_by_name(args, words, capsys):
    with pytest.raises(SystemExit) as e:
        load_bench().main(["--teacher", "/nonexistent/teacher", *args])
    assert e.value.code == 2
    assert words in capsys.readouterr().err


def load_stream_chunk():
    load_bench()  # stream_chunk imports distill_table by name
    if "stream_chunk" not in sys.modules:
        spec = importlib.util.spec_from_file_location("stream_chunk", os.path.join(REPO, "bench", "stream_chunk.py"))
        sys.modules["stream_chunk"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["stream_chunk"])
    return sys.modules["stream_chunk"]


@pytest.mark.slow
def test_stream_chunk_bench_times_each_compile_option_and_checks_its_latents(tmp_path, capsys):
    from mmdit.data.synth_records import synth

    teacher_cfg = config_lib.load("configs/demo.py:tiny,plain")
    synth(teacher_cfg, str(tmp_path / "teacher" / "data"), num=2, num_eval=1, progress=False)
    init_checkpoint(teacher_cfg, tmp_path / "teacher")
    dist = tiny_student(tmp_path, tmp_path / "teacher")
    out = tmp_path / "chunk.json"
    options = ["{}", '{"xla_cpu_experimental_ynn_fusion_type": ""}']
    argv = ["--student", str(dist), "--teacher", str(tmp_path / "teacher"), "--rounds", "2", "--out", str(out)]
    assert load_stream_chunk().main(argv + ["--options", *options]) == 0
    res = json.loads(out.read_text())
    assert [o["options"] for o in res["options"]] == [{}, {"xla_cpu_experimental_ynn_fusion_type": ""}]
    for o in res["options"]:
        assert 0 < o["min_s"] <= o["median_s"] and o["max_abs_diff"] < 1e-4  # another library, the same latents
    assert res["options"][0]["max_abs_diff"] == 0.0 and res["machine"]["usable_cores"] >= 1
    assert "(1.00x the first)" in capsys.readouterr().out


def test_stream_chunk_sums_worker_thread_time_per_kernel_kind(tmp_path):
    """The trace reader: worker-thread kernels summed per kind (numbers stripped), per chunk; the executor's own
    events and other threads left out; the wait for completion is the wall time."""
    import gzip

    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    meta = lambda tid, name: {"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": name}}  # noqa: E731
    ev = lambda tid, name, dur: {"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": 0, "dur": dur}  # noqa: E731
    events = [meta(1, "tf_XLAEigen/1"), meta(2, "tf_XLAEigen/2"), meta(3, "python3")]
    events += [ev(1, "ynn_fusion.3", 30.0), ev(2, "ynn_fusion.17", 50.0), ev(1, "slice_bitcast_fusion.2", 20.0)]
    events += [ev(1, "ThunkExecutor::Execute", 500.0), ev(1, "end: ynn_fusion.3", 1.0), ev(3, "ynn_fusion.9", 99.0)]
    events += [ev(3, "ThunkExecutor::Execute (wait for completion)", 400.0)]
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    kinds = load_stream_chunk().thread_time_by_kind(str(tmp_path), chunks=2)
    assert kinds["ynn_fusion"] == {"ms_per_chunk": pytest.approx(0.04), "calls_per_chunk": 1.0}
    assert kinds["slice_bitcast_fusion"] == {"ms_per_chunk": pytest.approx(0.01), "calls_per_chunk": 0.5}
    assert kinds["_wall_ms_per_chunk"] == pytest.approx(0.2) and len(kinds) == 3
