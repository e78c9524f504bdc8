"""``mmdit-data``: build training records.

* ``mmdit-data synth --config configs/demo.py --out DIR [--num N] [--num-eval M]`` renders the
  synthetic talking world, encodes it with the config's codecs and writes ``DIR/train`` and
  ``DIR/eval`` record shards (atomically), holding the lock ``DIR/.mmdit.lock`` meanwhile.
* ``mmdit-data ingest --config configs/demo.py --in CLIPS --out DIR`` turns talking-video MP4s (and
  WAV + transcript audio-only sources) into the records the config's model trains on: clip-length
  windows, sidecar captions (``clip.txt`` / ``clip.json``), face boxes, speaking labels. Each host
  ingests its share (``--process-index/--process-count``); a killed ingest rerun with the same
  command continues where it stopped. Details: ``mmdit/data/media_ingest.py``.
"""

from __future__ import annotations

import argparse
import sys

from mmdit import config_spec
from mmdit.cli.errors import entry_point


@entry_point("mmdit-data")
def main(argv=None):
    p = argparse.ArgumentParser(prog="mmdit-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="synthetic talking clips -> records")
    s.add_argument(
        "--config",
        default="demo",
        help="config file or preset name with world/codecs/model.conditions.text sections (default: the embedded demo)",
    )
    s.add_argument("--out", required=True, help="output directory (train/ and eval/ are written inside)")
    s.add_argument("--num", type=int, default=None, help="training clips (default config.data.num_train)")
    s.add_argument("--num-eval", type=int, default=None, help="eval clips (default config.data.num_eval)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    i = sub.add_parser("ingest", help="MP4s (+ WAV audio-only) -> records for the config's model (resumable, per host)")
    i.add_argument("--config", default="configs/demo.py", help="config whose codecs/encoders/model decide the record fields")
    i.add_argument("--in", dest="in_dir", required=True, help="directory searched recursively for *.mp4 (and *.wav + .txt)")
    i.add_argument("--out", required=True, help="record directory (train with mmdit-train --data DIR)")
    i.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    i.add_argument("--process-index", type=int, default=None, help="this host's index (default: jax.process_index())")
    i.add_argument("--process-count", type=int, default=None, help="hosts sharing the inputs (default: jax.process_count())")
    i.add_argument(
        "--clips-per-shard",
        type=int,
        default=None,
        help="source files per shard, the resume unit (default data.examples_per_shard)",
    )
    i.add_argument(
        "--long-clips",
        choices=("windows", "first", "centre"),
        default="windows",
        help="sources longer than one clip: every clip-length window (default), the first, or a centre cut",
    )
    i.add_argument(
        "--overwrite", action="store_true", help="discard this host's earlier (partial) ingest in --out and start over"
    )
    i.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors (or MMDIT_DEBUG=1)")
    args = p.parse_args(argv)
    if args.cmd == "ingest":
        return _ingest(args)
    if args.num is not None and args.num < 1:
        raise ValueError(f"--num {args.num}: write at least one training clip (--num >= 1)")
    if args.num_eval is not None and args.num_eval < 0:
        raise ValueError(f"--num-eval {args.num_eval}: must be >= 0 (0: no eval split)")
    cfg = config_spec.load(args.config, args.set)
    from mmdit.data.synth_records import synth

    manifests = synth(cfg, args.out, args.num, args.num_eval, progress=not args.no_progress)  # holds args.out's lock
    for split, m in manifests.items():
        print(f"{split}: {m.get('num_examples', '?')} examples, skipped {m.get('skipped', {})} -> {args.out}/{split}")
    return 0


def _ingest(args) -> int:
    cfg = config_spec.load(args.config, args.set)
    index, count = args.process_index, args.process_count
    if index is None or count is None:
        import jax

        from mmdit.parallel import distributed

        distributed.maybe_initialize(cfg)
        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    from mmdit.data.media_ingest import ingest

    out = ingest(
        cfg,
        args.in_dir,
        args.out,
        process_index=index,
        process_count=count,
        clips_per_shard=args.clips_per_shard,
        long_clips=args.long_clips,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    host, m = out["host"], out["manifest"]
    print(f"host {index}/{count}: {host['counts']}, skipped {host['skipped']}")
    if m is None:
        print(f"waiting for the other hosts: {args.out}/manifest.json is written by the last host to finish")
    else:
        print(f"{m['num_examples']} records in {len(m['shards'])} shards -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
