"""``mmdit-data``: build training records.

* ``mmdit-data synth --config configs/demo.py --out DIR [--num N] [--num-eval M]`` renders the
  synthetic talking world, encodes it with the config's codecs and writes ``DIR/train`` and
  ``DIR/eval`` record shards (atomically), holding the lock ``DIR/.mmdit.lock`` meanwhile.
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
    s.add_argument("--config", default="configs/demo.py", help="config with world/codecs/model.conditions.text sections")
    s.add_argument("--out", required=True, help="output directory (train/ and eval/ are written inside)")
    s.add_argument("--num", type=int, default=None, help="training clips (default config.data.num_train)")
    s.add_argument("--num-eval", type=int, default=None, help="eval clips (default config.data.num_eval)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors (or MMDIT_DEBUG=1)")
    args = p.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
