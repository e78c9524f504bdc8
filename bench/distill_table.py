"""TalkingMachines' Table 1 on the embedded world: distilled streaming students vs. their teacher.

    python3 bench/distill_table.py --teacher /tmp/demo_check \\
        --student c7s2=/tmp/dist_c7s2 --student c1s2=/tmp/dist_c1s2 [--num 16] [--tasks t2av,a2v]

Rows (each sampled on the same ``--num`` eval clips of the teacher's eval split, ``TEACHER/data/eval``
unless ``--data``, for every task of ``--tasks``):

* ``teacher@25``: the bidirectional teacher with its config's sampler (Euler, its ``sample.steps``, shift
  and CFG), the EMA params;
* ``teacher@4``, ``teacher@2``: the same sampler with fewer Euler steps (``--teacher-steps``): the
  undistilled few-step baseline that distillation has to beat;
* one row per ``--student NAME=WORKDIR`` (a distill workdir, whose ``student/`` is used, or the student
  workdir itself), sampled the way it is served: :class:`mmdit.sample.streaming.StreamingSampler`, chunk by
  chunk with its KV cache, the student config's steps, cache mode and positions, no CFG; with
  ``--stream-batch`` also ``NAME+sb``: the same student streamed with ``sample.stream_batch``
  (:mod:`mmdit.sample.stream_batch`: consecutive chunks' steps as row groups of one forward; same samples to
  float rounding, more throughput, ``steps - 1`` chunk calls more latency);
* ``untrained``: the teacher's config with freshly initialised params (seed ``cfg.seed``), teacher sampler.

Columns (the figures of ``mmdit-eval``, from :mod:`mmdit.eval.figures` / :mod:`mmdit.eval.chance` /
:mod:`mmdit.eval.lipsync`, ground truth = the same eval clips decoded from their true latents):

* lip-sync, strict: ``r@0`` (lag-0 correlation of mouth opening and audio log-energy) and ``rΔ`` (correlation
  of their frame-to-frame changes), each with its chance level as ``mismatched/shuffled`` (video of clip i
  with audio of clip j != i / audio cut into 4-frame blocks put in random order) and the ground-truth
  ceiling; ``frac`` = (score - mismatched chance) / (ceiling - mismatched chance); lenient ``best`` = the
  best correlation over +-8 frame lags (its chance level is high, for reference only);
* image quality: ``FD`` = Fréchet distance to ground-truth frames on :func:`mmdit.eval.image_quality.frame_features`
  (80 fixed features per frame: a 4x4 RGB thumbnail + log gradient-orientation histograms in a 2x2 grid;
  ``FDtex``: the 32 gradient features alone), generated clips of the first half vs ground truth of the second
  half, with the ground-truth-vs-ground-truth floor; background ``flicker`` (mean squared frame-to-frame change
  of the background) beside the ground truth's;
* identity over time: :func:`mmdit.eval.identity.identity_metrics` of every frame vs the clip's first frame
  (thumbnail cosine and colour-histogram intersection, means over frames and clips), ground truth beside;
* speed: seconds of sampling per generated second of media, one clip (batch 1), after a warm-up call that
  compiles, the median (and, in brackets, the minimum: the call least slowed by other processes on a shared
  machine) of ``--repeats`` calls, timed after all the sampling in round-robin (each round runs every row's
  every timed call twice in turn and times the second, so load that comes and goes slows every row alike): ``DiT`` (the sampler until its latents are ready; a student's
  stream includes its start: conditions encoded, cache allocated) and ``+dec`` (plus the codecs' decode to
  frames and waveform: the teacher decodes the whole clip after sampling, a student decodes chunk by chunk
  inline with the codecs' streaming decoders; ``with_decode_overlapped`` in the JSON: the decode overlapped on
  a worker thread, as ``mmdit stream`` serves); ``--batch N`` (N > 1) adds ``DiT bN``: the same DiT timing with N
  clips in one call, divided by N (serving throughput beside the batch-1 latency; JSON keys ``dit_bN_*``);
  ``--stream-chunks N`` adds, for students, one batch-1 stream of N chunks (a long stream's steady state, the
  given stream repeating the clip's; JSON ``streamN_*``; the teacher's cost per generated second does not
  depend on the length, so the goals compare it with teacher@N's clip).
  Every row runs in this one process with the same XLA thread settings;
  the JSON records the machine, the cores this process may use, ``XLA_FLAGS`` and the load average around
  each row. The untrained row runs the teacher@25 program and is not timed.

Writes ``--out`` (default ``bench/results/distill_table.json``): the command, the clip count, the machine,
every row's full ``mmdit-eval`` summary per task and its timings; prints the markdown table and, per
student, the issue's goals (lag-0 sync vs the teacher at its own steps and at the student's steps, speed-up).
``--reuse`` keeps the rows an earlier ``--out`` holds (students can be added as they finish; ``--retime``
times every row again in one load window).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mmdit import tasks as tasks_lib  # noqa: E402
from mmdit.eval.chance import sync_levels  # noqa: E402
from mmdit.eval.figures import ClipSet, task_figures  # noqa: E402
from mmdit.eval.lipsync import evaluate_clip  # noqa: E402
from mmdit.eval.run import ClipDecoder, eval_batch, summarize  # noqa: E402

TASKS = ("t2av", "a2v")
# a generated stream's given partner per task: the streaming sampler takes it chunk by chunk
GIVEN = {"t2av": None, "a2v": "audio"}

SampleFn = Callable[..., dict]  # (task, rng, batch, known, raw) -> {stream: latents [B, ...]}


@dataclasses.dataclass
class Row:
    """One model of the table: how it samples, what it is."""

    name: str
    kind: str  # "teacher", "student" or "untrained"
    steps: int
    sample: SampleFn
    timed: bool
    info: dict


# ----------------------------------------------------------------------------------------------
# samplers


def teacher_sampler(cfg, params, steps: int, compiler_options=None) -> SampleFn:
    """The bidirectional :class:`~mmdit.sample.sampler.Sampler` of ``cfg`` (its shift and CFG) at ``steps``."""
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.sample.sampler import Sampler

    sampler = Sampler(DiffusionModel.from_config(cfg), cfg, compiler_options=compiler_options)

    def sample(task, rng, batch, known, raw):
        return sampler.sample(params, rng, task=task, batch=batch, known_latents=known, raw_conds=raw, steps=steps)

    return sample


def streaming_sampler(cfg, params, compiler_options=None, stream_batch=None):
    """``(sample, StreamingSampler)``: ``sample`` streams the whole clip chunk by chunk without CFG and
    returns the chunks concatenated along time (``sample(..., decode_codecs=...)`` instead decodes every
    chunk as it arrives through :func:`mmdit.sample.stream_media.stream_media` and returns nothing;
    ``num_chunks=N`` streams N chunks instead of the clip's, a given stream repeating the clip's).
    ``stream_batch``: override ``sample.stream_batch`` (:mod:`mmdit.sample.stream_batch`)."""
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.sample.stream_media import stream_media
    from mmdit.sample.streaming import StreamingSampler, latent_chunks

    ss = StreamingSampler(DiffusionModel.from_config(cfg), cfg, compiler_options=compiler_options, stream_batch=stream_batch)
    roles = tasks_lib.roles(ss.full_model.spec, cfg.model)

    def sample(task, rng, batch, known, raw, decode_codecs=None, overlap=False, num_chunks=None):
        num_chunks = num_chunks or ss.layout.clip_chunks
        state = ss.start(params, rng, task=task, batch=batch, raw_conds=raw, guidance={})
        given = None
        if GIVEN[task] is not None:
            name = getattr(roles, GIVEN[task])
            lat = np.asarray(known[name])
            lat = np.concatenate([lat] * -(-num_chunks // ss.layout.clip_chunks), axis=1)
            given = ({name: c} for c in latent_chunks(lat, ss.layout.latents[name]))
        chunks = ss.stream(params, state, given=given, num_chunks=num_chunks)
        if decode_codecs is not None:
            for _ in stream_media(chunks, decode_codecs, overlap=overlap):
                pass
            return {}
        out = [jax.block_until_ready(c) for c in chunks]
        return {n: np.concatenate([np.asarray(c[n]) for c in out], axis=1) for n in out[0]}

    return sample, ss


# ----------------------------------------------------------------------------------------------
# scoring: exactly what mmdit.eval.run.evaluate does with a task's sampled latents


class Scorer:
    """The eval clips, their ground truth decoded and measured once, and :meth:`score` for sampled latents."""

    def __init__(self, cfg, data_dir: str, num: int):
        from mmdit.model.diffusion import DiffusionModel

        model = DiffusionModel.from_config(cfg)
        self.batch = eval_batch(data_dir, num)
        schema = model.input_spec()
        self.known, self.raw = schema.latents_of(self.batch), schema.conditions_of(self.batch)
        self.decode = ClipDecoder(cfg, model.spec, self.known, self.raw)
        gt_frames, gt_waves = self.decode(self.known)
        self.max_offset = 8 if gt_frames.shape[1] >= 40 else 4  # as mmdit.eval.run.evaluate
        self.media_seconds = gt_frames.shape[1] / self.decode.fps
        per_clip = [evaluate_clip(f, w, max_offset=self.max_offset) for f, w in zip(gt_frames, gt_waves)]
        self.truth = ClipSet.measure(gt_frames, gt_waves)
        self.truth_levels = sync_levels(self.truth.mouths, self.truth.envelopes, self.max_offset)
        self.ground_truth = summarize(per_clip)
        self.ground_truth.update(task_figures(self.truth, self.truth, self.truth_levels, None, self.max_offset))

    def one(self, i: int) -> tuple[dict, dict]:
        """Clip ``i``'s known latents and raw conditions with a batch axis of 1 (for timing)."""
        return self.first(1, i)

    def first(self, n: int, start: int = 0) -> tuple[dict, dict]:
        """Known latents and raw conditions of ``n`` clips from clip ``start`` (cycling through the eval
        clips when there are fewer), batch axis ``n`` (for timing at batch ``n``)."""
        rows = np.arange(start, start + n) % len(jax.tree.leaves(self.raw)[0])
        pick = lambda tree: jax.tree.map(lambda a: np.asarray(a)[rows], tree)  # noqa: E731
        return pick(self.known), pick(self.raw)

    def score(self, task: str, latents: dict) -> dict:
        frames, waves = self.decode(latents)
        per_clip = [evaluate_clip(f, w, max_offset=self.max_offset) for f, w in zip(frames, waves)]
        out = summarize(per_clip)
        out.update(task_figures(ClipSet.measure(frames, waves), self.truth, self.truth_levels, task, self.max_offset))
        return out


# ----------------------------------------------------------------------------------------------
# timing


@dataclasses.dataclass
class Timer:
    """One timed call of one row and task: ``key`` (a JSON key ending in ``_s``), ``fn`` (the call), ``clips``
    (clips it samples: the figure is per clip) and ``media`` (seconds of media per clip)."""

    row: str
    task: str
    key: str
    fn: Callable[[], object]
    clips: int
    media: float


def timers(row: Row, scorer: Scorer, task: str, seed: int, batch: int = 1, stream_chunks: int = 0) -> list[Timer]:
    """The timed calls of one row and task: seconds per generated second of one clip, DiT only and with decode
    (module docstring); with ``batch`` > 1 also ``dit_b{batch}``: DiT on ``batch`` clips per call, per clip; with
    ``stream_chunks`` a student also ``stream{N}``: one stream of N chunks at batch 1 (the steady state of a long
    stream: its start and a stream batch's fill and drain spread over more chunks)."""
    known, raw = scorer.one(0)
    rng = jax.random.key(seed + 1000)
    clip = scorer.media_seconds
    out = [Timer(row.name, task, "dit_s", lambda: jax.block_until_ready(row.sample(task, rng, 1, known, raw)), 1, clip)]
    if row.kind == "student":
        codecs = row.info["codecs"]
        for key, overlap in (("with_decode_s", False), ("with_decode_overlapped_s", True)):
            fn = lambda o=overlap: row.sample(task, rng, 1, known, raw, codecs, o)  # noqa: E731
            out.append(Timer(row.name, task, key, fn, 1, clip))
        if stream_chunks:
            fn = lambda: row.sample(task, rng, 1, known, raw, num_chunks=stream_chunks)  # noqa: E731
            out.append(Timer(row.name, task, f"stream{stream_chunks}_s", fn, 1, stream_chunks * row.info["seconds_per_chunk"]))
    else:
        decode = ClipDecoder(row.info["cfg"], row.info["spec"], known, raw)
        out.append(Timer(row.name, task, "with_decode_s", lambda: decode(row.sample(task, rng, 1, known, raw)), 1, clip))
    if batch > 1:
        known_b, raw_b = scorer.first(batch)
        fn = lambda: jax.block_until_ready(row.sample(task, rng, batch, known_b, raw_b))  # noqa: E731
        out.append(Timer(row.name, task, f"dit_b{batch}_s", fn, batch, clip))
    return out


def time_round_robin(all_timers: list[Timer], repeats: int) -> dict:
    """Calls every timer once (compile, warm up), then ``repeats`` rounds that each call every timer twice in
    turn and time the second call (the first re-warms caches after the previous timer's work), so a slow minute
    of a shared machine slows every row alike and the ratios between rows hold.
    Returns ``{(row, task): {key: {median, min, runs}, key_per_media_s, key_per_media_min_s, load_avg_before,
    load_avg_after}}`` (seconds; per media second divides by the timer's clips and media seconds)."""
    for t in all_timers:
        t.fn()
    load_before = os.getloadavg()
    runs = [[] for _ in all_timers]
    for _ in range(repeats):
        for t, r in zip(all_timers, runs):
            t.fn()  # untimed: re-warms caches and threads after the previous timer's (often much larger) work
            t0 = time.perf_counter()
            t.fn()
            r.append(time.perf_counter() - t0)
    load_after = os.getloadavg()
    out: dict = {}
    for t, r in zip(all_timers, runs):
        entry = out.setdefault((t.row, t.task), {"load_avg_before": load_before, "load_avg_after": load_after})
        entry[t.key] = {"median": statistics.median(r), "min": min(r), "runs": r}
        stem = t.key[: -len("_s")]
        entry[stem + "_per_media_s"] = statistics.median(r) / t.clips / t.media
        entry[stem + "_per_media_min_s"] = min(r) / t.clips / t.media
    return out


# ----------------------------------------------------------------------------------------------
# rows


def student_workdir(path: str) -> str:
    """A distill workdir's ``student/``, or ``path`` itself when it is the student's workdir."""
    sub = os.path.join(path, "student")
    if os.path.isfile(os.path.join(sub, "config.json")):
        return sub
    if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "checkpoints")):
        return path
    raise FileNotFoundError(
        f"--student {path}: neither {sub}/config.json nor {path}/checkpoints exist; pass a finished "
        "`mmdit distill` workdir (it writes student/ at its checkpoints) or its student/ directory"
    )


def parse_student(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--student {spec!r}: use NAME=WORKDIR, e.g. --student c7s2=/tmp/dist_c7s2")
    return name, path


def build_rows(args, teacher_cfg, teacher_params) -> list[Row]:
    import copy

    import flax.linen as nn

    from mmdit.codecs.registry import make_audio_codec, make_video_codec
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.train.checkpoint import restore_inference

    model = DiffusionModel.from_config(teacher_cfg)
    guidance = teacher_cfg.sample.guidance
    guidance = guidance.to_dict() if hasattr(guidance, "to_dict") else dict(guidance)
    info = {"cfg": teacher_cfg, "spec": model.spec, "guidance": guidance}
    own = int(teacher_cfg.sample.steps)
    steps = sorted({own if s == "config" else int(s) for s in args.teacher_steps.split(",")}, reverse=True)
    opts = {"xla_backend_optimization_level": 0} if args.fast_compile else None
    rows = [Row(f"teacher@{s}", "teacher", s, teacher_sampler(teacher_cfg, teacher_params, s, opts), True, info) for s in steps]
    students = [(name, path, None) for name, path in map(parse_student, args.student)]
    if args.stream_batch:
        students += [(name + "+sb", path, True) for name, path in map(parse_student, args.student)]
    for name, path, stream_batch in students:
        wd = student_workdir(path)
        cfg, params, step = restore_inference(wd)
        sample, ss = streaming_sampler(cfg, params, opts, stream_batch)
        roles = tasks_lib.roles(ss.full_model.spec, cfg.model)
        codecs = {roles.visual: make_video_codec(cfg.codecs.video)}
        if roles.audio is not None:
            codecs[roles.audio] = make_audio_codec(cfg.codecs.audio)
        meta = {
            "workdir": wd,
            "checkpoint_step": int(step),
            "chunk_frames": ss.layout.chunk_frames,
            "chunks_per_clip": ss.layout.clip_chunks,
            "mask": str(cfg.model.mask),
            "stream_cache": ss.cache_mode,
            "stream_positions": ss.positions,
            "stream_batch": ss.stream_batch,
            "seconds_per_chunk": ss.seconds_per_chunk,
            "shift": float(cfg.sample.shift),
            "guidance": {},
            "codecs": codecs,
        }
        rows.append(Row(name, "student", int(cfg.sample.steps), sample, True, meta))
    if not args.no_untrained:
        init = nn.unbox(model.init(jax.random.key(int(teacher_cfg.seed))))
        rows.append(Row("untrained", "untrained", own, teacher_sampler(copy.deepcopy(teacher_cfg), init, own, opts), False, info))
    return rows


# ----------------------------------------------------------------------------------------------
# the table


def _f(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _e(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def speed(timing: dict | None, what: str, kind: str = "untrained") -> str:
    """``median (min)`` seconds per generated second of ``timing[what]``; the untimed untrained row ran
    teacher@N's program, other untimed rows (``--no-timing``) show ``-``."""
    if not timing:
        return "=teacher" if kind == "untrained" else "-"
    if what + "_per_media_s" not in timing:  # a reused row timed without this batch size
        return "-"
    return f"{timing[what + '_per_media_s']:.3f} ({timing.get(what + '_per_media_min_s', float('nan')):.3f})"


def markdown(results: dict, tasks: tuple[str, ...]) -> str:
    gt = results["ground_truth"]
    batch = int(results.get("batch", 1))
    long = int(results.get("stream_chunks", 0) or 0)
    head = (
        "| model | task | steps | frac@0 | r@0 (chance mis/shuf, ceil) | fracΔ | rΔ (chance mis/shuf, ceil) | best-lag (chance) "
        "| FD (floor) | FDtex (floor) | flicker (gt) | id thumb-cos (gt) | id hist (gt) | s/s DiT (min) | s/s +dec (min) |"
    )
    if batch > 1:
        head += f" s/s DiT b{batch} (min) |"
    if long:
        head += f" s/s stream {long} chunks (min) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, row in results["rows"].items():
        for task in tasks:
            r = row["tasks"][task]
            sy = r["sync"]
            z, c, b = sy["sync_corr_at_0"], sy["change_corr"], sy["sync_corr"]
            t = row.get("timing", {}).get(task)
            lines.append(
                f"| {name} | {task} | {row['steps']} | {_f(r['fraction_at_0'])} "
                f"| {_f(z['score'])} ({_f(z['chance_mismatched'])}/{_f(z['chance_shuffled'])}, {_f(z['ceiling'])}) "
                f"| {_f(r['fraction_change'])} "
                f"| {_f(c['score'])} ({_f(c['chance_mismatched'])}/{_f(c['chance_shuffled'])}, {_f(c['ceiling'])}) "
                f"| {_f(b['score'])} ({_f(b['chance_mismatched'])}) "
                f"| {_f(r['fd'])} ({_f(r['fd_floor'])}) | {_f(r['fd_texture'])} ({_f(r['fd_texture_floor'])}) "
                f"| {_e(r['flicker'])} ({_e(r['flicker_gt'])}) "
                f"| {_f(r['identity_thumb_cos_mean'])} ({_f(gt['identity_thumb_cos_mean'])}) "
                f"| {_f(r['identity_hist_sim_mean'])} ({_f(gt['identity_hist_sim_mean'])}) "
                f"| {speed(t, 'dit', row['kind'])} | {speed(t, 'with_decode', row['kind'])} |"
                + (f" {speed(t, f'dit_b{batch}', row['kind'])} |" if batch > 1 else "")
                + (f" {speed(t, f'stream{long}', row['kind']) if row['kind'] == 'student' else '-'} |" if long else "")
            )
    return "\n".join(lines)


def goals(results: dict) -> list[str]:
    """The issue's goal per student: lag-0 sync within 0.05 of the teacher at its own steps, >= 10x faster per
    generated second (DiT), and better than the teacher at the same number of Euler steps."""
    rows = results["rows"]
    teachers = {r["steps"]: n for n, r in rows.items() if r["kind"] == "teacher"}
    ref = rows.get(f"teacher@{max(teachers)}") if teachers else None
    out = []
    for name, row in rows.items():
        if row["kind"] != "student" or ref is None:
            continue
        for task, r in row["tasks"].items():
            z, zt = r["sync"]["sync_corr_at_0"]["score"], ref["tasks"][task]["sync"]["sync_corr_at_0"]["score"]
            line = f"{name} {task}: r@0 {z:.3f} vs teacher@{ref['steps']} {zt:.3f} (diff {z - zt:+.3f})"
            same = teachers.get(row["steps"])
            if same:
                zs = rows[same]["tasks"][task]["sync"]["sync_corr_at_0"]["score"]
                line += f", vs {same} {zs:.3f} ({z - zs:+.3f})"
            t, tt = row.get("timing", {}).get(task), ref.get("timing", {}).get(task)
            if t and tt:
                line += f"; DiT speed-up vs teacher@{ref['steps']}: {tt['dit_per_media_s'] / t['dit_per_media_s']:.1f}x (medians)"
                if "dit_per_media_min_s" in t and "dit_per_media_min_s" in tt:
                    line += f", {tt['dit_per_media_min_s'] / t['dit_per_media_min_s']:.1f}x (minima)"
                long = [k[: -len("_per_media_s")] for k in t if k.startswith("stream") and k.endswith("_per_media_s")]
                for k in long:  # the teacher's cost per generated second does not depend on the stream's length
                    line += (
                        f"; {k[len('stream') :]}-chunk stream: {tt['dit_per_media_s'] / t[k + '_per_media_s']:.1f}x "
                        f"(minima {tt['dit_per_media_min_s'] / t[k + '_per_media_min_s']:.1f}x)"
                    )
            out.append(line)
    return out


def previous_rows(path: str, results: dict, tasks: tuple[str, ...]) -> dict:
    """The rows of an earlier run's JSON at ``path`` when it measured the same teacher checkpoint, data, clip
    count and tasks (else ``{}``, with a note)."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        old = json.load(f)
    same = old.get("teacher") == results["teacher"] and old.get("data") == results["data"]
    same = same and old.get("num_clips") == results["num_clips"] and old.get("tasks") == list(tasks)
    if not same:
        print(
            f"[distill_table] --reuse: {path} measured another teacher/data/clips/tasks; recomputing every row", file=sys.stderr
        )
        return {}
    return old["rows"]


def machine() -> dict:
    return {
        "host": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "device": jax.devices()[0].device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax": jax.__version__,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="bench/distill_table.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--teacher", required=True, help="the bidirectional teacher's training workdir (EMA params)")
    p.add_argument(
        "--student",
        action="append",
        default=[],
        metavar="NAME=WORKDIR",
        help="a distilled student: an `mmdit distill` workdir or its student/ (repeat for several)",
    )
    p.add_argument("--data", default=None, help="eval records (default TEACHER/data/eval)")
    p.add_argument("--num", type=int, default=16, help="eval clips per task (default 16: the demo's whole eval split)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument(
        "--teacher-steps",
        default="config,4,2",
        help="Euler step counts of the teacher rows; 'config' = the teacher config's sample.steps (default config,4,2)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row and task after the warm-up (median)")
    p.add_argument(
        "--batch",
        type=int,
        default=1,
        help="also time the DiT at this batch size, per clip (serving throughput; default 1: batch-1 latency only)",
    )
    p.add_argument(
        "--stream-chunks",
        type=int,
        default=0,
        help="also time each student on one stream of this many chunks at batch 1 (a long stream's steady state; default 0: off)",
    )
    p.add_argument(
        "--stream-batch",
        action="store_true",
        help="add a NAME+sb row per student streaming with sample.stream_batch (mmdit/sample/stream_batch.py)",
    )
    p.add_argument("--no-timing", action="store_true", help="skip the seconds-per-generated-second columns")
    p.add_argument("--no-untrained", action="store_true", help="leave out the untrained row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fast-compile",
        action="store_true",
        help="compile with XLA's backend optimisation off (tests: half the compile time; timings then not representative)",
    )
    p.add_argument(
        "--retime",
        action="store_true",
        help="with --reuse: time the reused rows again (all rows timed in one load window; their quality is kept)",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the rows an existing --out already holds for the same teacher, data, clips and tasks (add "
        "students as they finish without re-sampling the teacher; each row keeps the load average it was timed under)",
    )
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "distill_table.json"))
    args = p.parse_args(argv)

    tasks = tuple(t for t in args.tasks.split(",") if t)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        p.error(f"--tasks {args.tasks!r}: use a comma-separated subset of {','.join(TASKS)}")
    if args.num < 2:
        p.error(f"--num {args.num}: chance levels compare mismatched clips, pass at least 2")
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: time at least one call")
    if args.batch < 1:
        p.error(f"--batch {args.batch}: use a batch size >= 1")
    if args.stream_chunks < 0:
        p.error(f"--stream-chunks {args.stream_chunks}: use a chunk count >= 1 (or 0: off)")
    try:
        for s in args.student:
            student_workdir(parse_student(s)[1])
        [int(s) for s in args.teacher_steps.split(",") if s != "config"]
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))

    from mmdit.train.checkpoint import restore_inference

    teacher_cfg, teacher_params, teacher_step = restore_inference(args.teacher)
    data = args.data or os.path.join(args.teacher, "data", "eval")
    t_start = time.perf_counter()
    scorer = Scorer(teacher_cfg, data, args.num)
    rows = build_rows(args, teacher_cfg, teacher_params)
    results = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None else argv,
        "teacher": {"workdir": args.teacher, "checkpoint_step": int(teacher_step)},
        "data": data,
        "num_clips": args.num,
        "batch": args.batch,
        "stream_chunks": args.stream_chunks,
        "tasks": list(tasks),
        "media_seconds_per_clip": scorer.media_seconds,
        "machine": machine(),
        "load_avg_start": os.getloadavg(),
        "ground_truth": scorer.ground_truth,
        "rows": {},
    }
    old = previous_rows(args.out, results, tasks) if args.reuse else {}
    to_time = []
    for row in rows:
        if row.name in old:
            results["rows"][row.name] = entry = old[row.name]
            print(f"[distill_table] {row.name}: reused from {args.out}", file=sys.stderr, flush=True)
            if args.retime and row.timed and not args.no_timing:
                to_time.append(row)
                entry["retimed"] = True
            continue
        t0 = time.perf_counter()
        entry = {"kind": row.kind, "steps": row.steps, "tasks": {}, "timing": {}}
        entry.update({k: v for k, v in row.info.items() if k not in ("cfg", "spec", "codecs")})
        for i, task in enumerate(tasks):
            rng = jax.random.fold_in(jax.random.key(args.seed), i)  # as mmdit.eval.run.evaluate
            latents = row.sample(task, rng, args.num, scorer.known, scorer.raw)
            entry["tasks"][task] = scorer.score(task, latents)
        if row.timed and not args.no_timing:
            to_time.append(row)
        entry["wall_s"] = time.perf_counter() - t0
        entry["load_avg_after"] = os.getloadavg()
        results["rows"][row.name] = entry
        print(f"[distill_table] {row.name}: {entry['wall_s']:.0f} s", file=sys.stderr, flush=True)
    if to_time:  # every timed row in one round-robin (time_round_robin), after all the sampling
        t0 = time.perf_counter()
        calls = [
            t for row in to_time for task in tasks for t in timers(row, scorer, task, args.seed, args.batch, args.stream_chunks)
        ]
        for (name, task), timing in time_round_robin(calls, args.repeats).items():
            results["rows"][name].setdefault("timing", {})[task] = timing
        results["timing_wall_s"] = time.perf_counter() - t0
        print(f"[distill_table] timing {len(to_time)} rows: {results['timing_wall_s']:.0f} s", file=sys.stderr, flush=True)
    results["load_avg_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - t_start
    results["goals"] = goals(results)

    table = markdown(results, tasks)
    print(table)
    print(
        f"\n{args.num} eval clips of {data}, {scorer.media_seconds:.2f} s each; s/s = seconds of sampling per generated "
        f"second (batch 1{f'; DiT bN: batch {args.batch}, per clip' if args.batch > 1 else ''}, median (min) of "
        f"{args.repeats} round-robin rounds after a warm-up); chance mis/shuf = mismatched clips / time-shuffled "
        "audio; frac = (score - mismatched chance) / (ceiling - chance); FD on mmdit.eval.image_quality.frame_features "
        f"(80 dims: 4x4 RGB thumbnail + gradient-orientation histograms; FDtex: the 32 gradient ones). "
        f"Machine: {results['machine']['processor']}, {results['machine']['usable_cores']} usable cores, "
        f"load average {results['load_avg_start'][0]:.1f} -> {results['load_avg_end'][0]:.1f}."
    )
    for line in results["goals"]:
        print(line)
    results["table"] = table
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(results, f, indent=1, default=float)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
