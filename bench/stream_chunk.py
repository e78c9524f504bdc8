"""Where a streamed student's batch-1 chunk spends its time, and whether XLA CPU options move it.

Two measurements of one student (a ``mmdit distill`` workdir) in one process:

* **Compile options A/B**: one :class:`~mmdit.sample.streaming.StreamingSampler` per ``--options`` JSON (the
  chunk executable's XLA compile options; ``{}`` is the default), each checked against the first for its
  latents, then whole clips (``bench/distill_table.py``'s streamed sampling: start + every chunk, no CFG) timed
  alternately, the median and minimum of ``--rounds`` clips each. The default list tries Eigen dots instead
  of YNNPACK fusions and XLA's tree-reduction rewrite off (it splits every reduction over more than 32
  elements, e.g. each 128-wide norm, into two kernels).
* **Thread time per kernel kind** (``--trace``): ``--trace-chunks`` chunks of the default sampler under
  ``jax.profiler.trace`` with ``XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true`` (set by this script before jax
  loads), the XLA CPU thunks' durations summed per kind (the HLO name without its number: ``ynn_fusion`` =
  YNNPACK dot fusions, ``slice_bitcast_fusion`` = per-layer slices of the stacked scan params, ``while`` =
  the threefry draws' rolled loops, ...) per chunk, beside the chunk's wall time under the trace. Tracing
  inflates every kernel; compare kinds with each other, not with the untraced clip times.

    python3 bench/stream_chunk.py --student W --teacher T [--trace] [--options '{}' '{"xla_cpu_...": ""}']

JSON to ``--out`` (default ``bench/results/stream_chunk.json``).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

if "--trace" in sys.argv:  # the thunk executor emits per-kernel trace events only with this flag, read at jax load
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import distill_table as dt  # noqa: E402
from mmdit.train.checkpoint import restore_inference  # noqa: E402
from mmdit.util.files import write_json_atomic  # noqa: E402

DEFAULT_OPTIONS = (
    "{}",
    '{"xla_cpu_experimental_ynn_fusion_type": ""}',
    '{"xla_cpu_experimental_ynn_fusion_type": "", "xla_disable_hlo_passes": "tree_reduction_rewriter"}',
)


def thread_time_by_kind(trace_dir: str, chunks: int) -> dict:
    """``{kind: {"ms_per_chunk", "calls_per_chunk"}}`` of the XLA CPU worker threads' kernel events in the
    perfetto trace under ``trace_dir``, plus ``_wall_ms_per_chunk`` (the executor's wait for completion)."""
    path = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz"))[0]
    events = json.load(gzip.open(path))["traceEvents"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    total, calls, wall = collections.Counter(), collections.Counter(), 0.0
    for e in events:
        if e.get("ph") != "X":
            continue
        if e["name"] == "ThunkExecutor::Execute (wait for completion)":
            wall += e["dur"]
        if "Eigen" not in names.get((e["pid"], e["tid"]), "") or e["name"].startswith(("ThunkExecutor", "end: ")):
            continue
        kind = re.sub(r"[.\d]+$", "", e["name"])
        total[kind] += e["dur"]
        calls[kind] += 1
    out = {k: {"ms_per_chunk": v / 1e3 / chunks, "calls_per_chunk": calls[k] / chunks} for k, v in total.most_common()}
    out["_wall_ms_per_chunk"] = wall / 1e3 / chunks
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="a distill workdir (its student/) or a student workdir")
    p.add_argument("--teacher", required=True, help="the teacher's workdir (its data/eval gives the clip's conditions)")
    p.add_argument("--task", default="t2av")
    p.add_argument("--options", nargs="+", default=list(DEFAULT_OPTIONS), help="XLA compile options, one JSON object each")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--trace", action="store_true", help="also trace chunks of the default sampler (thread time per kernel kind)")
    p.add_argument("--trace-chunks", type=int, default=10)
    p.add_argument("--out", default="bench/results/stream_chunk.json")
    args = p.parse_args(argv)
    if args.trace and dt.GIVEN.get(args.task) is not None:
        p.error(f"--trace streams a task without a given stream (t2av), not {args.task!r}")
    cfg, params, _ = restore_inference(dt.student_workdir(args.student))
    tcfg, _, _ = restore_inference(args.teacher)
    known, raw = dt.Scorer(tcfg, os.path.join(args.teacher, "data", "eval"), 1).one(0)
    variants, outs, default = [], [], None
    for text in args.options:
        options = json.loads(text)
        sample, ss = dt.streaming_sampler(cfg, params, options or None)
        outs.append(sample(args.task, jax.random.key(1), 1, known, raw))
        variants.append((text, sample))
        default = ss if default is None and not options else default
    diffs = [max(float(np.abs(o[n] - outs[0][n]).max()) for n in o) for o in outs]
    times = [[] for _ in variants]
    for _ in range(args.rounds):
        for i, (_, sample) in enumerate(variants):
            t = time.perf_counter()
            sample(args.task, jax.random.key(1), 1, known, raw)
            times[i].append(time.perf_counter() - t)
    base = statistics.median(times[0])
    result = {"student": args.student, "task": args.task, "rounds": args.rounds, "machine": dt.machine(), "options": []}
    print(f"streamed {args.task} clip ({ss.layout.clip_chunks} chunks), batch 1, {args.rounds} rounds alternately:")
    for (text, _), ts, diff in zip(variants, times, diffs):
        med = statistics.median(ts)
        result["options"].append({"options": json.loads(text), "median_s": med, "min_s": min(ts), "max_abs_diff": diff})
        print(
            f"  {text}: median {med * 1e3:.1f} ms ({med / base:.2f}x the first), min {min(ts) * 1e3:.1f} ms, max |diff| {diff:.1e}"
        )
    if args.trace:
        ss = default or dt.streaming_sampler(cfg, params)[1]  # the default options' sampler, compiled above
        state = ss.start(params, jax.random.key(1), task=args.task, batch=1, raw_conds=raw, guidance={})
        for _ in range(3):  # compile and warm up
            out, state = ss.step(params, state)
            jax.block_until_ready(out)
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d, create_perfetto_trace=True):
                for _ in range(args.trace_chunks):
                    out, state = ss.step(params, state)
                    jax.block_until_ready(out)
            kinds = thread_time_by_kind(d, args.trace_chunks)
        result["trace"] = dict(kinds)  # with the traced wall time per chunk
        wall = kinds.pop("_wall_ms_per_chunk")
        busy = sum(k["ms_per_chunk"] for k in kinds.values())
        print(f"traced chunk: wall {wall:.2f} ms, kernel thread time {busy:.2f} ms over the worker threads; by kind:")
        for kind, k in list(kinds.items())[:12]:
            print(
                f"  {kind:32s} {k['ms_per_chunk']:6.2f} ms  {k['calls_per_chunk']:6.1f} calls  ({k['ms_per_chunk'] / busy:4.0%})"
            )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
