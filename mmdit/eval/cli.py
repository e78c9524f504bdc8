"""``mmdit-eval --workdir W``: samples every task of ``cfg.sample.tasks`` from the run's EMA params
on the eval split (``W/data/eval`` unless ``--data``), writes MP4s and ``W/eval/eval.json`` and
prints lip-sync confidence/offset per task next to the ground-truth ceiling."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None):
    p = argparse.ArgumentParser(prog="mmdit-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="training workdir (config.json + checkpoints)")
    p.add_argument("--data", default=None, help="eval records (default WORKDIR/data/eval)")
    p.add_argument("--out", default=None, help="output dir (default WORKDIR/eval)")
    p.add_argument("--num", type=int, default=None, help="clips per task (default config.sample.num_per_task)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default config.sample.tasks)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from mmdit.eval.run import evaluate, format_table
    from mmdit.train.checkpoint import restore_inference_params

    try:
        cfg, params = restore_inference_params(args.workdir)
        res = evaluate(cfg, params, args.data or os.path.join(args.workdir, "data", "eval"), args.out or os.path.join(args.workdir, "eval"),
                       num=args.num, seed=args.seed, tasks=tuple(args.tasks.split(",")) if args.tasks else None)
    except (ValueError, FileNotFoundError) as e:
        print(f"mmdit-eval: {e}", file=sys.stderr)
        return 2
    print(format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
