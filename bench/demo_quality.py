"""Demo quality: lip-sync of the trained demo model vs. an untrained one vs. the same training with
no cross-stream attention (``joint_layers=()``, the JAM-Flow ablation nobody published).

    python3 bench/demo_quality.py --workdir runs/bench_demo [--set train.steps=1500] [--skip-ablation]

Runs ``mmdit demo`` twice (default config, and ``model.joint_layers=()``) unless the workdirs already
hold finished runs, evaluates each (EMA params) and an untrained model (init params, same seed) on
the same eval clips, prints the table and writes JSON (default ``bench/results/demo_quality.json``).
Figures: per task the mean best-offset correlation (``sync_corr``), the median offset and the
share of clips within +-1 frame; ``ground_truth`` is the metric's ceiling on this world. Each run
also gets the cross-stream probe (``mmdit.eval.cross_stream``): the denoising loss of one stream
with the true partner over that with another clip's / a time-shifted partner (below 1: the model
reads the partner; ~1.000 for the time shift: it ignores the partner's timing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import jax



def run_demo(workdir: str, overrides: list[str]) -> float:
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "mmdit.cli.main", "demo", "--workdir", workdir, "--no-progress"] + sum([["--set", o] for o in overrides], [])
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/bench_demo")
    p.add_argument("--config", default="configs/demo.py")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--num", type=int, default=8, help="eval clips per task")
    p.add_argument("--skip-ablation", action="store_true")
    p.add_argument("--out", default="bench/results/demo_quality.json")
    args = p.parse_args(argv)
    from mmdit.eval.cross_stream import cross_stream_probe, format_probe
    from mmdit.eval.run import eval_batch, evaluate, format_table
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.train.checkpoint import restore_inference_params
    import flax.linen as nn

    runs = {"joint": args.set}
    if not args.skip_ablation:
        runs["no_joint_layers"] = args.set + ["model.joint_layers=()"]
    report = {"device": jax.devices()[0].device_kind, "host": platform.processor() or platform.machine(), "runs": {}}
    for name, overrides in runs.items():
        wd = os.path.join(args.workdir, name)
        wall = run_demo(wd, overrides)
        cfg, params = restore_inference_params(wd)
        data = os.path.join(wd, "data", "eval")
        model = DiffusionModel.from_config(cfg)
        batch = eval_batch(data, args.num)
        latents = {a.name: batch[a.name + "_latents"] for a in model.spec.streams}
        raw = {"text_tokens": batch["text_tokens"]}
        res = evaluate(cfg, params, data, None, num=args.num, write_videos=False)
        probe = cross_stream_probe(model, params, latents, raw)
        report["runs"][name] = {"overrides": overrides, "demo_wall_s": wall, "eval": res, "cross_stream_probe": probe}
        print(f"\n== {name} ({' '.join(overrides) or 'default'}), demo wall {wall / 60:.1f} min")
        print(format_table(res))
        print(format_probe(probe))
        if name == "joint":
            init = nn.unbox(model.init(jax.random.key(int(cfg.seed))))
            res0 = evaluate(cfg, init, data, None, num=args.num, write_videos=False)
            probe0 = cross_stream_probe(model, init, latents, raw)
            report["runs"]["untrained"] = {"eval": res0, "cross_stream_probe": probe0}
            print("\n== untrained (init params)")
            print(format_table(res0))
            print(format_probe(probe0))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
