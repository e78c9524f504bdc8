"""``mmdit-eval --workdir W``: samples every task of ``cfg.sample.tasks`` from the run's EMA params
(of a staged run: its last stage with a checkpoint) on the eval split (``W/data/eval`` unless ``--data``), writes MP4s and ``W/eval/eval.json`` and
prints lip-sync confidence/offset per task next to the ground-truth ceiling. ``--probe`` also
measures how much each stream's denoising reads the other stream and its timing
(``mmdit.eval.cross_stream``), printed and written to ``OUT/cross_stream_probe.json``."""

from __future__ import annotations

import argparse
import os
import sys

from mmdit import config_spec
from mmdit.cli.errors import entry_point
from mmdit.model.spec import build_spec


@entry_point("mmdit-eval")
def main(argv=None):
    p = argparse.ArgumentParser(prog="mmdit-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="training workdir (config.json + checkpoints)")
    p.add_argument("--data", default=None, help="eval records (default WORKDIR/data/eval)")
    p.add_argument("--out", default=None, help="output dir (default WORKDIR/eval)")
    p.add_argument("--num", type=int, default=None, help="clips per task (default config.sample.num_per_task)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default config.sample.tasks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe", action="store_true", help="also run the cross-stream probe on --num eval clips (>= 2)")
    p.add_argument("--no-verify", action="store_true", help="restore the checkpoint without checking its sha256.json")
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors (or MMDIT_DEBUG=1)")
    args = p.parse_args(argv)
    if args.num is not None and args.num < 1:
        raise ValueError(f"--num {args.num}: evaluate at least one clip per task (--num >= 1)")
    if args.probe and args.num is not None and args.num < 2:
        raise ValueError(f"--num {args.num}: the --probe needs at least 2 eval clips")
    from mmdit.eval.run import evaluate, format_table
    from mmdit.train.checkpoint import restore_inference_params
    from mmdit.util.lock import DirLock

    data = args.data or os.path.join(args.workdir, "data", "eval")
    out = args.out or os.path.join(args.workdir, "eval")
    probe = None
    if not os.path.isdir(args.workdir):
        raise FileNotFoundError(f"--workdir {args.workdir}: no such directory (a training workdir of mmdit-train)")
    with DirLock(out, command=f"mmdit-eval --out {os.path.abspath(out)}"):
        from mmdit.train.stages import resolve_workdir

        cfg, params = restore_inference_params(resolve_workdir(args.workdir), verify=not args.no_verify)
        res = evaluate(
            cfg, params, data, out, num=args.num, seed=args.seed, tasks=tuple(args.tasks.split(",")) if args.tasks else None
        )
        if args.probe:
            from mmdit.eval.cross_stream import probe_eval_split
            from mmdit.model.diffusion import DiffusionModel

            num = int(args.num if args.num is not None else config_spec.sample_spec(cfg, build_spec(cfg.model)).num_per_task)
            probe = probe_eval_split(DiffusionModel.from_config(cfg), params, data, num)
    print(format_table(res))
    if probe is not None:
        from mmdit.util.files import write_json_atomic
        from mmdit.eval.cross_stream import format_probe

        path = os.path.join(out, "cross_stream_probe.json")
        write_json_atomic(path, probe)
        print()
        print(format_probe(probe))
        print(f"cross-stream probe: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
