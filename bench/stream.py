"""Streaming speed: time between chunks, first-chunk latency, real-time factor, cached vs recomputed
context, decode overlap, constant memory (issue 12).

    python3 bench/stream.py [--config configs/demo_stream.py] [--workdir W] [--chunks 220] [--out bench/results/stream.json]

* **TTBC** (TalkingMachines' time between chunks): wall time of each ``StreamingSampler.step``
  (denoising steps of one chunk, one jitted call); first-chunk latency includes compilation.
  Chunk 200's time vs chunk 3's (the median of the 21 chunks around each, chunk 3's window clipped at
  chunk 1, as the cores are shared); every chunk's time is in the JSON.
* **Real-time factor**: seconds of media per chunk / TTBC (> 1: faster than real time).
* **Cached vs recomputed**: the same chunk without a cache needs its context recomputed: (a) *window
  recompute* -- the bidirectional sampler on the 3-chunk window (sink, previous, current) at the same
  steps, what a cacheless sampler with clean context pays per chunk; (b) *exact per-step recompute*
  -- with per-step context, chunk c's context at step i depends on every earlier chunk at step i, so
  without a cache the exact output of chunk 20 needs the bidirectional sampler over 21 chunks.
* **Decode overlap**: chunk latents -> frames + audio with the codecs, decode on a worker thread
  overlapped with the next chunk's DiT vs decode in line (``mmdit.sample.stream_media``).
* **Memory**: cache bytes and process RSS at chunk 3 and at the last chunk.
* **Stream start** (``--starts N``): ``StreamingSampler.start`` after a warm-up one (conditions encoded, cross-attention
  K/V, empty cache): median wall time until the cache is ready, and the process CPU time spent before the call
  returns (Python-side dispatch; XLA's threads may add to it).

Params: the workdir's EMA params when ``--workdir`` is given, else a random init (speed does not depend on
the weights).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import demo_stream  # noqa: E402
from mmdit import config_lib  # noqa: E402
from mmdit.codecs.text import ByteTokenizer  # noqa: E402
from mmdit.model.diffusion import DiffusionModel  # noqa: E402
from mmdit.sample.sampler import Sampler  # noqa: E402
from mmdit.sample.streaming import StreamingSampler  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _median_around(times, i, w=10):
    lo, hi = max(1, i - w), min(len(times), i + w + 1)
    return float(np.median(times[lo:hi]))


def _sample_time(cfg, params, chunks, raw, repeats=3):
    """Seconds of one bidirectional sample of a ``chunks``-chunk clip (compiled first, median of ``repeats``)."""
    c = copy.deepcopy(cfg)
    with c.unlocked():
        demo_stream.set_clip_chunks(c, chunks)
    model = DiffusionModel.from_config(c)
    s = Sampler(model, c)
    s.sample(params, jax.random.key(0), task="t2av", batch=1, raw_conds=raw)
    out = []
    for r in range(repeats):
        t0 = time.perf_counter()
        s.sample(params, jax.random.key(r + 1), task="t2av", batch=1, raw_conds=raw)
        out.append(time.perf_counter() - t0)
    return float(np.median(out))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo_stream.py")
    p.add_argument("--workdir", default=None)
    p.add_argument("--chunks", type=int, default=220)
    p.add_argument("--decode-chunks", type=int, default=30, help="chunks for the decode-overlap case (0: skip)")
    p.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True, help="time the cacheless baselines")
    p.add_argument("--starts", type=int, default=20, help="stream starts to time after a warm-up one (0: skip)")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "stream.json"))
    args = p.parse_args(argv)

    if args.workdir:
        from mmdit.train.checkpoint import restore_inference_params

        cfg, params = restore_inference_params(args.workdir)
    else:
        cfg = config_lib.load(args.config)
        params = DiffusionModel.from_config(cfg).init(jax.random.key(0))
    model = DiffusionModel.from_config(cfg)
    raw = model.input_spec().zero_conditions(1)  # features models (umt5 text...): zero features, same speed
    if model.text_encoder is not None:
        raw = {"text_tokens": ByteTokenizer().encode_batch(["hello there, this is a stream"], cfg.model.conditions.text.length)}
    results = {"config": args.config, "workdir": args.workdir, "steps": int(cfg.sample.steps), "machine": os.uname().nodename}
    results["cpu_count"] = os.cpu_count()

    ss = StreamingSampler(model, cfg)
    results["seconds_per_chunk"] = ss.seconds_per_chunk
    state = ss.start(params, jax.random.key(0), task="t2av", batch=1, raw_conds=raw)
    if args.starts:
        results["start"] = _start_times(ss, params, raw, args.starts)
        print(json.dumps(results["start"]), file=sys.stderr)
    times, rss = [], {}
    for c in range(args.chunks):
        t0 = time.perf_counter()
        out, state = ss.step(params, state)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
        if c in (3, args.chunks - 1):
            rss[c] = rss_mb()
        if c % 20 == 0:
            print(f"chunk {c}: {times[-1] * 1e3:.1f} ms", file=sys.stderr)
    steady = np.asarray(times[1:])
    cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state.cache))
    results["stream"] = {
        "chunks": args.chunks,
        "cache_mode": ss.cache_mode,
        "positions": ss.positions,
        "first_chunk_s": times[0],
        "ttbc_mean_s": float(steady.mean()),
        "ttbc_p50_s": float(np.median(steady)),
        "ttbc_p95_s": float(np.percentile(steady, 95)),
        "real_time_factor": ss.seconds_per_chunk / float(np.median(steady)),
        "chunk3_s": _median_around(times, 3),
        "chunk200_s": _median_around(times, min(200, args.chunks - 3)),
        "chunk200_over_chunk3": _median_around(times, min(200, args.chunks - 3)) / _median_around(times, 3),
        "chunk_times_s": [round(t, 5) for t in times],
        "compilations": ss.compilations,
        "cache_bytes": int(cache_bytes),
        "rss_mb_at_chunk3": rss.get(3),
        "rss_mb_at_last": rss.get(args.chunks - 1),
    }
    print(json.dumps(results["stream"], indent=1), file=sys.stderr)

    frames_per_chunk = ss.layout.latents[ss.spec.generated[0]]
    if ss.spec.streams[0].geometry.kind == "grid" and cfg.codecs.get("video"):
        frames_per_chunk *= int(cfg.codecs.video.get("temporal", 1))
    results["stream"]["video_frames_per_s_dit_only"] = frames_per_chunk / float(np.median(steady))
    if args.recompute:
        window = _sample_time(cfg, params, 3, raw)
        prefix = _sample_time(cfg, params, 21, raw, repeats=1)
        cached = float(np.median(steady))
        results["recompute"] = {
            "cached_chunk_s": cached,
            "window_recompute_s": window,
            "window_speedup": window / cached,
            "exact_prefix_recompute_at_chunk20_s": prefix,
            "prefix_speedup_at_chunk20": prefix / cached,
        }
        print(json.dumps(results["recompute"], indent=1), file=sys.stderr)
    if args.decode_chunks and cfg.codecs.get("video") and cfg.codecs.video.get("kind") in ("pixels",):
        results["decode_overlap"] = _decode_overlap(ss, params, raw, cfg, args.decode_chunks)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(json.dumps(results, indent=1))


def _start_times(ss, params, raw, n: int) -> dict:
    """Median wall and Python-side CPU ms of ``n`` stream starts (the sampler already started one)."""
    wall, cpu = [], []
    for i in range(n):
        w0, c0 = time.perf_counter(), time.process_time()
        state = ss.start(params, jax.random.key(100 + i), task="t2av", batch=1, raw_conds=raw)
        cpu.append(time.process_time() - c0)
        jax.block_until_ready(state.cache)
        wall.append(time.perf_counter() - w0)
    return {"starts": n, "wall_ms_median": 1e3 * float(np.median(wall)), "cpu_ms_median": 1e3 * float(np.median(cpu))}


def _decode_overlap(ss, params, raw, cfg, n):
    """Seconds for ``n`` chunks, DiT + decode, with the decode overlapped (worker thread) and in line."""
    from mmdit.codecs.registry import make_audio_codec, make_video_codec
    from mmdit.sample.stream_media import stream_media

    codecs = {"video": make_video_codec(cfg.codecs.video), "audio": make_audio_codec(cfg.codecs.audio)}
    out = {}
    for overlap in (False, True):
        state = ss.start(params, jax.random.key(1), task="t2av", batch=1, raw_conds=raw)
        t0 = time.perf_counter()
        for _ in stream_media(ss.stream(params, state, num_chunks=n), codecs, overlap=overlap):
            pass
        out["overlap_s" if overlap else "inline_s"] = time.perf_counter() - t0
    out["chunks"] = n
    out["speedup"] = out["inline_s"] / out["overlap_s"]
    return out


if __name__ == "__main__":
    main()
