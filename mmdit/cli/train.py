"""``mmdit-train --config configs/demo.py --workdir W``: trains (or resumes) a run.

Data: ``--data DIR`` (records written by ``mmdit-data``), default ``config.data.dir`` or
``W/data/train``. Rerunning the same command resumes from the latest good checkpoint in ``W``
("resuming from step N"; a corrupt latest step is reported, moved to ``W/checkpoints_corrupt/`` and
the previous one used). One run per workdir: a second ``mmdit-train`` on ``W`` refuses, naming the
running one (``W/.mmdit.lock``). Failures print one ``mmdit-train: error: ...`` line (``--debug``
for the traceback).

A config with ``train.stages`` trains its stages in sequence, each in ``W/stage_<name>`` (stage k+1
starts from stage k's params; a rerun skips finished stages and resumes the unfinished one; see
``mmdit/train/stages.py``); ``--init-from`` then seeds the first stage.
"""

from __future__ import annotations

import argparse
import os
import sys

from mmdit import config_spec
from mmdit.cli.errors import entry_point


def build_parser():
    p = argparse.ArgumentParser(prog="mmdit-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file (configs/X.py[:arg]) or preset name")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, TensorBoard logs, config.json")
    p.add_argument(
        "--data",
        default=None,
        help="record directory (default: config.data.dir or WORKDIR/data/train); records another codecs section "
        "encoded (manifest metadata.codecs) are refused, naming the differing codecs.* fields",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--init-from",
        default=None,
        metavar="PATH",
        help="start a fresh run from pretrained params: a converted checkpoint (mmdit convert), a training workdir "
        "or a serving bundle (same as --set train.init_from=PATH; matching params loaded, the rest fresh)",
    )
    p.add_argument(
        "--verify-data",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="check every data shard's sha256 against the manifest before training (default: when the shards "
        "total at most 2 GiB; --no-verify-data skips it)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="restore the checkpoint without checking its sha256.json (for huge checkpoints; a corrupt "
        "array then surfaces only as NaNs)",
    )
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors (or MMDIT_DEBUG=1)")
    return p


@entry_point("mmdit-train")
def main(argv=None):
    args = build_parser().parse_args(argv)
    from mmdit.eval.train_samples import sample_hook_for_workdir
    from mmdit.train.loop import train

    overrides = args.set + ([f"train.init_from={args.init_from}"] if args.init_from else [])
    cfg = config_spec.load(args.config, overrides)  # every section checked before anything compiles
    # TensorBoard samples every train.sample_every steps when WORKDIR/data/eval holds records.
    common = dict(data_dir=args.data, progress=not args.no_progress, verify_data=args.verify_data)
    if cfg.train.get("stages"):
        from mmdit.train.stages import run_stages

        last = run_stages(cfg, args.workdir, hook_for=sample_hook_for_workdir, verify_checkpoint=not args.no_verify, **common)
    else:
        hook = sample_hook_for_workdir(cfg, args.workdir)
        last = train(cfg, args.workdir, sample_hook=hook, verify_checkpoint=not args.no_verify, **common)
    if last:
        logs = os.path.join(args.workdir, "stage_*" if cfg.train.get("stages") else "", "tensorboard")
        print(f"done: step loss {last.get('loss', float('nan')):.4f}; logs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
