"""Demo quality: lip-sync of the trained demo model vs. an untrained one vs. the same training with
no cross-stream attention (``joint_layers=()``, the JAM-Flow ablation nobody published).

    python3 bench/demo_quality.py --workdir runs/bench_demo [--set train.steps=1500] [--skip-ablation]

Runs ``mmdit demo`` twice (``--config``, and its ``nojoint`` variant: ``model.joint_layers=()``, hence no
joint guidance either) unless the workdirs already
hold finished runs, evaluates each (EMA params) and an untrained model (init params, same seed) on
the same eval clips, prints the table and writes JSON (default ``bench/results/demo_quality.json``).
Figures: per task the mean best-offset correlation (``sync_corr``), the median offset and the
share of clips within +-1 frame; ``ground_truth`` is the metric's ceiling on this world. Each run
also gets the cross-stream probe (``mmdit.eval.cross_stream``): the denoising loss of one stream
with the true partner over that with another clip's / a time-shifted partner (below 1: the model
reads the partner; ~1.000 for the time shift: it ignores the partner's timing).

Each table also carries the strict figures of ``mmdit.eval.figures``: lag-0 and change correlation with
their chance level (mismatched clips) and the ground-truth ceiling, the fraction of the way from chance
to ceiling, Fréchet distances with their ground-truth floor, background flicker and TI2AV identity vs
the given frame; the last table puts every run's fractions side by side.
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


def run_demo(workdir: str, config: str, overrides: list[str]) -> float:
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "mmdit.cli.main", "demo", "--config", config, "--workdir", workdir, "--no-progress"] + sum(
        [["--set", o] for o in overrides], []
    )
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def train_seconds(workdir: str) -> float | None:
    """Training wall time as the run logged it (sum of log interval / steps_per_sec over
    ``metrics.jsonl``), so a rerun that only resumes a finished run still reports the real figure."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    total, last = 0.0, 0
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row.get("steps_per_sec"):
                total += (row["step"] - last) / row["steps_per_sec"]
            last = row["step"]
    return total


def headline_table(runs: dict) -> str:
    """One row per run, per task ``frac@0/fracΔ`` (see ``mmdit.eval.run.format_table``)."""
    tasks = [t for t in next(iter(runs.values()))["eval"] if t != "ground_truth"]
    fmt = lambda x: "  -  " if x is None else f"{x:+.2f}"  # noqa: E731
    lines = [f"{'run':<18}" + "".join(f"{t:>14}" for t in tasks)]
    for name, run in runs.items():
        ev = run["eval"]
        cells = [f"{fmt(ev[t].get('fraction_at_0'))}/{fmt(ev[t].get('fraction_change'))}" for t in tasks]
        lines.append(f"{name:<18}" + "".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/bench_demo")
    p.add_argument("--config", default="configs/demo.py", help="demo config, e.g. configs/demo.py:wan4")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--num", type=int, default=8, help="eval clips per task")
    p.add_argument("--skip-ablation", action="store_true")
    p.add_argument("--out", default="bench/results/demo_quality.json")
    args = p.parse_args(argv)
    from mmdit.eval.cross_stream import format_probe, probe_eval_split
    from mmdit.eval.run import evaluate, format_table
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.train.checkpoint import restore_inference_params
    import flax.linen as nn

    runs = {"joint": (args.config, args.set)}
    if not args.skip_ablation:  # the config's `nojoint` variant: model.joint_layers=() and no joint guidance
        runs["no_joint_layers"] = (args.config + (",nojoint" if ":" in args.config else ":nojoint"), args.set)
    report = {"device": jax.devices()[0].device_kind, "host": platform.processor() or platform.machine(), "runs": {}}
    for name, (config, overrides) in runs.items():
        wd = os.path.join(args.workdir, name)
        wall = run_demo(wd, config, overrides)
        cfg, params = restore_inference_params(wd)
        data = os.path.join(wd, "data", "eval")
        model = DiffusionModel.from_config(cfg)
        res = evaluate(cfg, params, data, None, num=args.num, write_videos=False)
        probe = probe_eval_split(model, params, data, args.num)
        train_s = train_seconds(wd)
        report["runs"][name] = {
            "config": config,
            "overrides": overrides,
            "demo_wall_s": wall,
            "train_s_logged": train_s,
            "eval": res,
            "cross_stream_probe": probe,
        }
        print(
            f"\n== {name} ({' '.join([config] + overrides)}), demo wall {wall / 60:.1f} min (this call; "
            f"training as logged {train_s / 60 if train_s else 0:.1f} min)"
        )
        print(format_table(res))
        print(format_probe(probe))
        if name == "joint":
            init = nn.unbox(model.init(jax.random.key(int(cfg.seed))))
            res0 = evaluate(cfg, init, data, None, num=args.num, write_videos=False)
            probe0 = probe_eval_split(model, init, data, args.num)
            report["runs"]["untrained"] = {"eval": res0, "cross_stream_probe": probe0}
            print("\n== untrained (init params)")
            print(format_table(res0))
            print(format_probe(probe0))
    print("\n== fraction of the way from chance to the ground truth (lag-0 / change correlation)")
    print(headline_table(report["runs"]))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
