"""``mmdit-train --config configs/demo.py --workdir W``: trains (or resumes) a run.

Data: ``--data DIR`` (records written by ``mmdit-data``), default ``config.data.dir`` or
``W/data/train``. Rerunning the same command resumes from the latest checkpoint in ``W``.
"""

from __future__ import annotations

import argparse
import sys

from mmdit import config_spec


def build_parser():
    p = argparse.ArgumentParser(prog="mmdit-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file (configs/X.py[:arg]) or preset name")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, TensorBoard logs, config.json")
    p.add_argument("--data", default=None, help="record directory (default: config.data.dir or WORKDIR/data/train)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from mmdit.eval.train_samples import sample_hook_for_workdir
    from mmdit.train.loop import train

    try:
        cfg = config_spec.load(args.config, args.set)  # every section checked before anything compiles
        # TensorBoard samples every train.sample_every steps when WORKDIR/data/eval holds records.
        hook = sample_hook_for_workdir(cfg, args.workdir)
        last = train(cfg, args.workdir, data_dir=args.data, progress=not args.no_progress, sample_hook=hook)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"mmdit-train: {e}", file=sys.stderr)
        return 2
    if last:
        print(f"done: step loss {last.get('loss', float('nan')):.4f}; logs: {args.workdir}/tensorboard")
    return 0


if __name__ == "__main__":
    sys.exit(main())
