"""A streamed student's clip with the time embedding's σ palette against the per-token MLP, side by side.

``TimestepEmbedding`` runs its MLP per token below ``mmdit.model.layers.PALETTE_MIN_TOKENS`` tokens (a streaming
chunk) instead of once per distinct σ (the palette: a run-time ``cond``, the selection and a one-hot gather,
~50 small XLA kernels per stream). This builds two :class:`~mmdit.sample.streaming.StreamingSampler` s of one
student in one process, one compiled with the palette forced (``PALETTE_MIN_TOKENS = 0``, the path before the
change) and one with the default, checks their latents agree, and times whole clips alternately
(``bench/distill_table.py``'s streamed sampling: start + every chunk, no CFG), the median and minimum of
``--rounds`` calls each, at ``--batch`` clips per call. JSON to ``--out``.

    python3 bench/stream_time_embedding.py --student /tmp/dist_c7s2 --teacher /tmp/demo_check [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import distill_table as dt  # noqa: E402
from mmdit.model import layers  # noqa: E402
from mmdit.train.checkpoint import restore_inference  # noqa: E402
from mmdit.util.files import write_json_atomic  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="a distill workdir (its student/) or a student workdir")
    p.add_argument("--teacher", required=True, help="the teacher's workdir (its data/eval gives the clip's conditions)")
    p.add_argument("--task", default="t2av")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", default="bench/results/stream_time_embedding.json")
    args = p.parse_args(argv)
    cfg, params, _ = restore_inference(dt.student_workdir(args.student))
    tcfg, _, _ = restore_inference(args.teacher)
    known, raw = dt.Scorer(tcfg, os.path.join(args.teacher, "data", "eval"), 1).one(0)
    rep = lambda a: np.repeat(np.asarray(a), args.batch, 0)  # noqa: E731
    known, raw = jax.tree.map(rep, known), jax.tree.map(rep, raw)
    default = layers.PALETTE_MIN_TOKENS
    variants, outs = {}, {}
    for name, threshold in (("palette", 0), ("per_token", default)):
        layers.PALETTE_MIN_TOKENS = threshold  # read when the chunk is traced: the first call compiles it
        sample, _ = dt.streaming_sampler(cfg, params)
        outs[name] = sample(args.task, jax.random.key(1), args.batch, known, raw)
        variants[name] = sample
    layers.PALETTE_MIN_TOKENS = default
    diff = max(float(np.abs(outs["palette"][n] - outs["per_token"][n]).max()) for n in outs["palette"])
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, sample in variants.items():
            t = time.perf_counter()
            sample(args.task, jax.random.key(1), args.batch, known, raw)
            times[k].append(time.perf_counter() - t)
    res = {k: {"median_s": statistics.median(v), "min_s": min(v)} for k, v in times.items()}
    for k, r in res.items():
        print(f"{k:10s} clip (batch {args.batch}): median {r['median_s'] * 1e3:.1f} ms, min {r['min_s'] * 1e3:.1f} ms")
    print(f"max |latent difference| {diff:.2e}")
    write_json_atomic(
        args.out,
        {"command": " ".join([sys.executable] + sys.argv), "machine": dt.machine(), "max_abs_diff": diff, "results": res},
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
