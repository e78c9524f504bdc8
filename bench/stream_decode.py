"""Streaming decode benchmark: per-chunk decode (+ fragmented-MP4 mux) time, overlap on vs off.

The ``demo_stream`` codecs (``configs/demo_stream.py``: pixels 32x32 at 25 fps, mel + Griffin-Lim at 16 kHz)
decode ``--chunks`` chunks of random latents of that config's chunk shape (16 latent frames = 0.64 s of both
streams), fed by a stand-in for the DiT that takes ``--dit-ms`` per chunk, through
:func:`mmdit.sample.stream_media.stream_media` with a :class:`~mmdit.data.fmp4.FragmentedMP4Writer` as the sink.
The stand-in either sleeps (``--producer sleep``: an accelerator DiT, which leaves the CPU free) or multiplies
matrices on the CPU for that long (``--producer cpu``: the CPU DiT, which competes with the decode for cores).

One-time costs (librosa's imports) are paid before the timed runs. Reports, per mode (overlap off = decode after each chunk; on = decode on the worker thread): wall time per
chunk, the median producer / decode / mux time per chunk, and the real-time factor (media seconds per wall
second). Writes JSON to ``--out`` (default ``bench/results/stream_decode.json``).

    python bench/stream_decode.py                          # 12 chunks, 300 ms stand-in DiT, both producers
    python bench/stream_decode.py --chunks 30 --dit-ms 150 --producers sleep
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmdit import config_lib  # noqa: E402
from mmdit.codecs.registry import make_audio_codec, make_video_codec  # noqa: E402
from mmdit.data.fmp4 import FragmentedMP4Writer  # noqa: E402
from mmdit.sample.stream_media import stream_media  # noqa: E402


def stand_in_dit(chunks: list, seconds: float, kind: str):
    """Yields ``chunks`` after ``seconds`` of sleeping or of CPU matrix products each."""
    a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    for chunk in chunks:
        end = time.perf_counter() + seconds
        if kind == "sleep":
            time.sleep(seconds)
        else:
            while time.perf_counter() < end:
                a = np.tanh(a @ a * 0.01)
        yield chunk


def run(config, chunks: list, args, producer: str, overlap: bool) -> dict:
    video, audio = make_video_codec(config.codecs.video), make_audio_codec(config.codecs.audio)
    _, _, h, w, _ = chunks[0]["video"].shape
    size = h * video.spatial_compression
    with tempfile.TemporaryDirectory() as tmp:
        mp4 = FragmentedMP4Writer(os.path.join(tmp, "s.mp4"), video.fps, audio.sample_rate, size, size)
        t_mux = []

        def sink(m):
            t0 = time.perf_counter()
            mp4.write(m.frames[0], m.audio[0])
            t_mux.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        out = list(
            stream_media(
                stand_in_dit(chunks, args.dit_ms / 1000, producer), {"video": video, "audio": audio}, overlap=overlap, sink=sink
            )
        )
        wall = time.perf_counter() - t0
        mp4.close()
    media_s = sum(m.frames.shape[1] for m in out) / video.fps
    body = out[1:-1]  # steady state: not the first chunk, not the final (tail) one
    return {
        "producer": producer,
        "overlap": overlap,
        "chunks": len(chunks),
        "wall_s": round(wall, 3),
        "wall_per_chunk_ms": round(1000 * wall / len(chunks), 1),
        "dit_ms_median": round(1000 * statistics.median(m.t_dit for m in body), 1),
        "decode_ms_median": round(1000 * statistics.median(m.t_decode for m in body), 1),
        "mux_ms_median": round(1000 * statistics.median(t_mux[1:-1]), 1),
        "first_chunk_decode_ms": round(1000 * out[0].t_decode, 1),
        "media_s": round(media_s, 3),
        "real_time_factor": round(media_s / wall, 3),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo_stream.py", help="config whose codecs and chunk shape to use")
    p.add_argument("--chunks", type=int, default=12, help="chunks per run")
    p.add_argument("--dit-ms", type=float, default=300.0, help="stand-in DiT time per chunk (ms)")
    p.add_argument("--producers", default="sleep,cpu", help="comma list of stand-in kinds: sleep, cpu")
    p.add_argument("--out", default="bench/results/stream_decode.json")
    args = p.parse_args(argv)
    config = config_lib.load(args.config)
    frames = int(config.model.chunk_frames)
    vs, ac = config.model.streams.video, config.model.streams.audio
    rng = np.random.default_rng(0)
    chunks = [
        {
            "video": rng.standard_normal((1, frames, *tuple(vs.shape[1:]), vs.channels)).astype(np.float32),
            "audio": (0.5 * rng.standard_normal((1, frames, ac.channels))).astype(np.float32),
        }
        for _ in range(args.chunks)
    ]
    # one-time costs (librosa's imports, filterbanks) outside the timed runs
    codecs = {"video": make_video_codec(config.codecs.video), "audio": make_audio_codec(config.codecs.audio)}
    list(stream_media(iter(chunks[:2]), codecs, overlap=False))
    results = []
    for producer in args.producers.split(","):
        for overlap in (False, True):
            r = run(config, chunks, args, producer, overlap)
            print(json.dumps(r))
            results.append(r)
    record = {
        "bench": "stream_decode",
        "config": args.config,
        "chunk_seconds": frames / 25.0,
        "dit_ms": args.dit_ms,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
