"""``mmdit demo``: the whole system on the embedded default (``configs/demo.py``), on one CPU.

1. ``mmdit-data synth``: render the synthetic talking world, encode it with the weight-free codecs,
   write train/eval record shards (skipped if ``WORKDIR/data`` already holds them; records another
   ``codecs`` section encoded are refused, naming the field: use a new ``--workdir`` or delete ``WORKDIR/data``);
2. ``mmdit-train``: train the tiny twin-stream MM-DiT (resumes if ``WORKDIR`` has checkpoints);
3. ``mmdit-eval``: sample every task in ``config.sample.tasks`` (T2AV, TI2AV, TV2A, A2V) from the
   EMA params, write MP4s and contact sheets, and measure lip-sync strictly (mouth-opening vs
   audio-energy correlation at lag 0, and of their frame-to-frame changes) as the fraction of the way
   from chance (mismatched pairs) to the ground-truth ceiling, plus image quality and identity;
4. print the summary table and where the MP4s and TensorBoard logs are.

``--config`` takes a file or a preset name (``demo_stream``, ``demo_talking``...), from any directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from mmdit import config_spec
from mmdit.cli.errors import entry_point


@entry_point("mmdit demo")
def main(argv=None):
    p = argparse.ArgumentParser(prog="mmdit demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo", help="where data, checkpoints, logs and samples go (default runs/demo)")
    p.add_argument("--config", default="demo", help="config file or preset name (default: the embedded demo, configs/demo.py)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors (or MMDIT_DEBUG=1)")
    args = p.parse_args(argv)
    cfg = config_spec.load(args.config, args.set)
    from mmdit.util.lock import DirLock

    with DirLock(args.workdir, command=f"mmdit demo --workdir {os.path.abspath(args.workdir)}"):
        return _demo(cfg, args)


def _demo(cfg, args) -> int:
    wd = os.path.abspath(args.workdir)
    data = os.path.join(wd, "data")
    times = {}

    t = time.perf_counter()
    if not (
        os.path.exists(os.path.join(data, "train", "manifest.json"))
        and os.path.exists(os.path.join(data, "eval", "manifest.json"))
    ):
        from mmdit.data.synth_records import synth

        print(f"[1/3] synthesising {cfg.data.num_train} train + {cfg.data.num_eval} eval clips -> {data}")
        synth(cfg, data, progress=not args.no_progress)
    else:
        from mmdit.data.codec_stamp import check_codecs

        fix = f"use a new --workdir, or delete {data} to re-synthesise the records"
        for split in ("train", "eval"):
            check_codecs(cfg, os.path.join(data, split), require_stamp=True, fix=fix)
        print(f"[1/3] using existing records in {data}")
    times["data"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"[2/3] training {cfg.train.steps} steps -> {wd}")
    from mmdit.eval.train_samples import sample_hook_for_workdir
    from mmdit.train.loop import train

    train(
        cfg,
        wd,
        data_dir=os.path.join(data, "train"),
        progress=not args.no_progress,
        sample_hook=sample_hook_for_workdir(cfg, wd),
        lock=False,  # this command holds the workdir lock
    )
    times["train"] = time.perf_counter() - t

    t = time.perf_counter()
    print("[3/3] sampling every task and measuring lip-sync")
    from mmdit.eval.run import evaluate, format_table
    from mmdit.train.checkpoint import restore_inference_params

    cfg_run, params = restore_inference_params(wd)
    out = os.path.join(wd, "eval")
    from mmdit.train.metrics import MetricWriter

    writer = MetricWriter(wd)  # the per-task contact sheets go to TensorBoard beside the training curves
    try:
        results = evaluate(
            cfg_run,
            params,
            os.path.join(data, "eval"),
            out,
            progress=not args.no_progress,
            writer=writer,
            step=int(cfg_run.train.steps),
        )
    finally:
        writer.close()
    times["eval"] = time.perf_counter() - t

    print()
    print(format_table(results))
    print()
    print(f"samples (MP4, H.264 + AAC): {out}/<task>_<i>.mp4   metrics: {out}/eval.json")
    print(f"TensorBoard: tensorboard --logdir {wd}/tensorboard")
    print("time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
