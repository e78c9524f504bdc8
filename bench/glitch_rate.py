"""Glitched frames and flicker over many sampling seeds: is a rare whole-frame error gone, or just not drawn?

A glitched frame (a frame pair whose background changes by more than ``mmdit.eval.figures.GLITCH_PAIR``, ~8 grey
levels on every pixel) turns up in a few percent of the demo's T2AV clips, too rarely for the 16-clip eval to
compare two models. This samples ``--seeds`` x the eval clips per workdir (the same clips and seeds for every
workdir, EMA params; ``mmdit.eval.run.evaluate`` once per seed) and prints, per workdir, the clips with a glitch, the flicker figures and the strict sync
fractions (``mmdit.eval.figures.task_figures``, averaged over seeds), with the ground truth's beside them. JSON
to ``--out``. ``--sample KEY=VALUE`` (repeatable, ``sample.*`` fields only) adds a row per workdir sampled with
that setting beside the workdir's own (e.g. ``sample.guidance_interval=(0.0,1.0)`` against a run whose config
limits guidance): one trained model, two samplers.

    python3 bench/glitch_rate.py --workdir runs/demo --workdir runs/demo_keyframe --seeds 10
    python3 bench/glitch_rate.py --workdir runs/demo --sample 'sample.guidance_interval=(0.0,1.0)' --seeds 10
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmdit import config_lib, config_spec  # noqa: E402
from mmdit.eval.run import evaluate  # noqa: E402
from mmdit.train.checkpoint import restore_inference_params  # noqa: E402
from mmdit.util.files import write_json_atomic  # noqa: E402

KEYS = ("fraction_at_0", "fraction_change", "fd", "flicker", "flicker_median", "flicker_worst_pair", "flicker_glitch_clips")


def measure(workdir: str, data: str, task: str, seeds: int, num: int, sample_set: str | None = None) -> dict:
    """``mmdit.eval.run.evaluate`` of ``task`` at sampling seeds ``0 .. seeds-1``, its figures averaged over seeds
    (the worst pair: the max) and the glitched clips counted; ``sample_set``: one ``sample.*`` override."""
    cfg, params = restore_inference_params(workdir)
    if sample_set is not None:
        cfg = config_lib.override(config_spec.complete(cfg), [sample_set])
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
    p.add_argument("--sample", action="append", default=[], metavar="KEY=VALUE", help="an extra row per workdir (sample.*)")
    p.add_argument("--out", default="bench/results/glitch_rate.json")
    args = p.parse_args(argv)
    bad = [s for s in args.sample if not s.strip().startswith("sample.")]
    if bad:
        p.error(f"--sample {bad[0]!r}: only sample.* fields change how a trained model samples")
    data = args.data or os.path.join(args.workdir[0], "data", "eval")
    rows = {}
    for w in args.workdir:
        for extra in [None] + args.sample:
            name = w if extra is None else f"{w} [{extra}]"
            rows[name] = r = measure(w, data, args.task, args.seeds, args.num, extra)
            print(
                f"{name}: {args.task} glitched clips {r['clips_with_glitch']}/{r['clips']} (gt {r['flicker_glitch_clips_gt']:.0%}); "
                f"flicker mean {r['flicker']:.1e} median {r['flicker_median']:.1e} worst {r['flicker_worst_pair']:.1e} "
                f"(gt {r['flicker_gt']:.1e}); frac@0 {r['fraction_at_0']:.2f} fracΔ {r['fraction_change']:.2f}; "
                f"FD {r['fd']:.2f} (floor {r['fd_floor']:.2f})",
                flush=True,
            )
    write_json_atomic(args.out, {"command": " ".join([sys.executable] + sys.argv), "data": data, "task": args.task, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
