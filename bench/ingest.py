"""Ingest throughput: ``mmdit data ingest`` of generated talking MP4s, in source clips per second.

Generates ``--num`` MP4s from the synthetic world (64x64 px, 25 fps, 16 kHz AAC, 0.8-1.5 s, a
``.txt`` caption each; written once into ``--clips`` and reused), then times
:func:`mmdit.data.media_ingest.ingest` for ``--config`` (default ``configs/demo.py:tiny``: the demo
codecs) into a fresh directory, with the progress bar off. The model/codec construction (the
``RecordMaker``) and a first audio encode (librosa's lazy imports) are timed apart from the loop
(``setup_s``). Reports sources/s and records/s (a 1.5 s source gives
two 0.68 s windows at :tiny), the per-stage split is not measured. Writes JSON to ``--out``
(default ``bench/results/ingest.json``).

Example::

    python3 bench/ingest.py --num 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_clips(out: str, num: int) -> float:
    from mmdit.data import media
    from mmdit.data.synthetic import SyntheticWorld, WorldConfig

    os.makedirs(out, exist_ok=True)
    world = SyntheticWorld(WorldConfig(video_size=64, fps=25, sample_rate=16000, min_seconds=0.8, max_seconds=1.5))
    t = time.perf_counter()
    for i in range(num):
        path = os.path.join(out, f"clip{i:04d}.mp4")
        if os.path.exists(path):
            continue
        c = world.clip(i)
        media.write_mp4(path, c.video, 25, c.audio, 16000)
        with open(os.path.join(out, f"clip{i:04d}.txt"), "w") as f:
            f.write(c.text)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--config", default="configs/demo.py:tiny")
    p.add_argument("--clips", default=os.path.join(tempfile.gettempdir(), "mmdit_bench_ingest_clips"))
    p.add_argument("--clips-per-shard", type=int, default=32)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ingest.json"))
    args = p.parse_args()

    import numpy as np

    from mmdit import config_spec
    from mmdit.data.media_ingest import ingest
    from mmdit.data.record_fields import RecordMaker

    clips = os.path.join(args.clips, str(args.num))
    gen_s = make_clips(clips, args.num)
    cfg = config_spec.load(args.config)
    t = time.perf_counter()
    maker = RecordMaker(cfg)
    maker.audio_codec.encode(np.zeros((1, maker.num_samples), np.float32))  # librosa's lazy imports: seconds, once
    setup_s = time.perf_counter() - t
    out_dir = tempfile.mkdtemp(prefix="mmdit_bench_ingest_")
    try:
        t, c = time.perf_counter(), time.process_time()
        res = ingest(cfg, clips, out_dir, clips_per_shard=args.clips_per_shard, progress=False, maker=maker)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    counts = res["host"]["counts"]
    result = {
        "command": " ".join(["python3", "bench/ingest.py"] + sys.argv[1:]),
        "config": args.config,
        "sources": counts["sources"],
        "records": counts["records"],
        "skipped": res["host"]["skipped"],
        "no_face": counts["no_face"],
        "ingest_wall_s": round(wall, 3),
        "ingest_cpu_s": round(cpu, 3),
        "sources_per_s": round(counts["sources"] / wall, 2),
        "records_per_s": round(counts["records"] / wall, 2),
        "setup_s": round(setup_s, 3),
        "generate_mp4_s": round(gen_s, 3),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
        },
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
