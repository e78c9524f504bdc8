"""``mmdit-distill --config configs/demo_distill.py --teacher T --workdir W``: few-step DMD distillation
of a trained teacher (workdir ``T``) into the config's (chunk-causal) student, or resumes it.

Launched like ``mmdit-train``: ``--data DIR`` (records, default ``config.data.dir`` or
``W/data/train``), ``--set KEY=VALUE``; rerunning the same command resumes from the latest good
checkpoint. The teacher must be the student's twin (same streams, shapes, conditions; only
``model.mask`` / ``model.chunk_frames`` and execution choices may differ): otherwise it is refused,
naming every differing field, before ``W`` is touched. When the run reaches ``train.steps`` the
student is written as a normal training workdir ``W/student`` (``mmdit export --workdir W/student``,
``mmdit sample --workdir W/student``). Losses and grad norms: ``W/metrics.jsonl``,
``W/tensorboard`` (with sample clips of the student every ``train.sample_every`` iterations, conditioned
on ``W/data/eval`` or the eval records beside ``--data``). See ``mmdit/distill/loop.py`` and
``configs/demo_distill.py``.

CausVid's recipe: an ODE-regression warm-up (``--config configs/demo_distill.py:warmup``:
``distill.dmd_weight=0``, the student alone learns the teacher's ODE map from the pairs ``prepare`` wrote,
``--data OUT``), then DMD from it with ``--set distill.student_init=W_warmup/student`` (the student starts
from the warm-up's EMA params).

``mmdit-distill prepare --config C --teacher T --data IN --out OUT``: precomputes the regression
loss's teacher ODE pairs into records, for every task of ``distill.tasks`` (``mmdit/distill/prepare.py``;
each sample regresses on its drawn task's pair); distil on them with
``--data OUT --set distill.regression_pairs=records`` (the default, ``on_the_fly``, integrates the
teacher's ODE inside every generator step).
"""

from __future__ import annotations

import argparse
import sys

from mmdit import config_spec
from mmdit.cli.errors import entry_point


def build_parser():
    p = argparse.ArgumentParser(prog="mmdit-distill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="distill config (configs/demo_distill.py[:tiny])")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, TensorBoard logs, config.json, student/")
    p.add_argument(
        "--teacher", default=None, metavar="WORKDIR", help="the teacher's training workdir (= --set distill.teacher=...)"
    )
    p.add_argument(
        "--data",
        default=None,
        help="record directory (default: config.data.dir or WORKDIR/data/train); records another codecs section "
        "encoded are refused, naming the differing codecs.* fields",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-verify", action="store_true", help="restore checkpoints without checking their sha256.json")
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors (or MMDIT_DEBUG=1)")
    return p


def build_prepare_parser():
    p = argparse.ArgumentParser(
        prog="mmdit-distill prepare",
        description="precompute teacher ODE pairs (noise -> guided teacher sample, with the ODE's states at the student's "
        "sigmas) into records, for every task of distill.tasks: the input records plus ode_<task>_target_<stream> / "
        "ode_<task>_state<k>_<stream> fields per stream the task generates; distil on them with --data OUT --set "
        "distill.regression_pairs=records (mmdit/distill/prepare.py)",
    )
    p.add_argument("--config", required=True, help="distill config (configs/demo_distill.py[:tiny])")
    p.add_argument(
        "--teacher", default=None, metavar="WORKDIR", help="the teacher's training workdir (= --set distill.teacher=...)"
    )
    p.add_argument("--data", required=True, help="input record directory (the student's training records)")
    p.add_argument("--out", required=True, help="output record directory")
    p.add_argument("--batch", type=int, default=4, help="examples per teacher ODE batch (default 4)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors (or MMDIT_DEBUG=1)")
    return p


@entry_point("mmdit-distill")
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prepare"]:
        return prepare(argv[1:])
    args = build_parser().parse_args(argv)
    from mmdit.distill.loop import distill

    overrides = args.set + ([f"distill.teacher={args.teacher}"] if args.teacher else [])
    cfg = config_spec.load(args.config, overrides)
    last = distill(cfg, args.workdir, data_dir=args.data, progress=not args.no_progress, verify_checkpoint=not args.no_verify)
    if last:
        losses = ", ".join(f"{k} {last[k]:.4f}" for k in ("gen/loss", "critic/loss") if k in last)
        print(f"done: {losses}; student: {args.workdir}/student")
    return 0


def prepare(argv):
    args = build_prepare_parser().parse_args(argv)
    from mmdit.distill.prepare import prepare_pairs

    cfg = config_spec.load(args.config, args.set + ([f"distill.teacher={args.teacher}"] if args.teacher else []))
    if args.batch < 1:
        raise ValueError(f"--batch={args.batch} must be >= 1")
    manifest = prepare_pairs(cfg, args.data, args.out, batch=args.batch, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"{args.out}: {manifest['num_examples']} teacher ODE pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
