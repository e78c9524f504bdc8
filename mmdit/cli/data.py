"""``mmdit-data``: build training records.

* ``mmdit-data synth --config configs/demo.py --out DIR [--num N] [--num-eval M]`` renders the
  synthetic talking world, encodes it with the config's codecs and writes ``DIR/train`` and
  ``DIR/eval`` record shards (atomically).
"""

from __future__ import annotations

import argparse
import sys

from mmdit import config_spec


def main(argv=None):
    p = argparse.ArgumentParser(prog="mmdit-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="synthetic talking clips -> records")
    s.add_argument("--config", default="configs/demo.py", help="config with world/codecs/model.conditions.text sections")
    s.add_argument("--out", required=True, help="output directory (train/ and eval/ are written inside)")
    s.add_argument("--num", type=int, default=None, help="training clips (default config.data.num_train)")
    s.add_argument("--num-eval", type=int, default=None, help="eval clips (default config.data.num_eval)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        cfg = config_spec.load(args.config, args.set)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"mmdit-data: {args.config}: {e}", file=sys.stderr)
        return 2
    from mmdit.data.synth_records import synth

    manifests = synth(cfg, args.out, args.num, args.num_eval)
    for split, m in manifests.items():
        print(f"{split}: {m.get('num_examples', '?')} examples, skipped {m.get('skipped', {})} -> {args.out}/{split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
