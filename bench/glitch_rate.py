"""Glitched frames and flicker over many sampling seeds: is a rare whole-frame error gone, or just not drawn?

A glitched frame (a frame pair whose background changes by more than ``mmdit.eval.figures.GLITCH_PAIR``, ~8 grey
levels on every pixel) turns up in a few percent of the demo's T2AV clips, too rarely for the 16-clip eval to
compare two models. This samples ``--seeds`` x the eval clips per workdir (the same clips and seeds for every
workdir, EMA params; ``mmdit.eval.run.evaluate`` once per seed) and prints, per workdir, the clips with a glitch, the flicker figures and the strict sync
fractions (``mmdit.eval.figures.task_figures``, averaged over seeds), with the ground truth's beside them. JSON
to ``--out``.

    python3 bench/glitch_rate.py --workdir runs/demo --workdir runs/demo_keyframe --seeds 10
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmdit.eval.run import evaluate  # noqa: E402
from mmdit.train.checkpoint import restore_inference_params  # noqa: E402
from mmdit.util.files import write_json_atomic  # noqa: E402

KEYS = ("fraction_at_0", "fraction_change", "fd", "flicker", "flicker_median", "flicker_worst_pair", "flicker_glitch_clips")


def measure(workdir: str, data: str, task: str, seeds: int, num: int) -> dict:
    """``mmdit.eval.run.evaluate`` of ``task`` at sampling seeds ``0 .. seeds-1``, its figures averaged over seeds
    (the worst pair: the max) and the glitched clips counted."""
    cfg, params = restore_inference_params(workdir)
    per_seed = [evaluate(cfg, params, data, num=num, seed=s, tasks=(task,), write_videos=False)[task] for s in range(seeds)]
    out = {k: float(np.mean([f[k] for f in per_seed])) for k in KEYS}
    out["flicker_worst_pair"] = max(f["flicker_worst_pair"] for f in per_seed)
    out["clips"] = seeds * num
    out["clips_with_glitch"] = int(round(sum(f["flicker_glitch_clips"] * num for f in per_seed)))
    gt = ("flicker", "flicker_median", "flicker_worst_pair", "flicker_glitch_clips")
    out.update({k + "_gt": per_seed[0][k + "_gt"] for k in gt})
    out["fd_floor"] = per_seed[0]["fd_floor"]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", action="append", required=True, help="a trained workdir (repeat to compare)")
    p.add_argument("--data", default=None, help="eval records (default: the first workdir's data/eval)")
    p.add_argument("--task", default="t2av")
    p.add_argument("--seeds", type=int, default=10, help="sampling seeds per workdir")
    p.add_argument("--num", type=int, default=16, help="eval clips per seed")
    p.add_argument("--out", default="bench/results/glitch_rate.json")
    args = p.parse_args(argv)
    data = args.data or os.path.join(args.workdir[0], "data", "eval")
    rows = {}
    for w in args.workdir:
        rows[w] = r = measure(w, data, args.task, args.seeds, args.num)
        print(
            f"{w}: {args.task} glitched clips {r['clips_with_glitch']}/{r['clips']} (gt {r['flicker_glitch_clips_gt']:.0%}); "
            f"flicker mean {r['flicker']:.1e} median {r['flicker_median']:.1e} worst {r['flicker_worst_pair']:.1e} "
            f"(gt {r['flicker_gt']:.1e}); frac@0 {r['fraction_at_0']:.2f} fracΔ {r['fraction_change']:.2f}; "
            f"FD {r['fd']:.2f} (floor {r['fd_floor']:.2f})",
            flush=True,
        )
    write_json_atomic(args.out, {"command": " ".join([sys.executable] + sys.argv), "data": data, "task": args.task, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
