"""``mmdit-export``: a training workdir's EMA params -> a serving bundle (``mmdit/serve/export.py``).

::

    mmdit-export --workdir W --out BUNDLE [--step N] [--platforms cpu,cuda,tpu] [--fixed-batch]

Restores the inference (EMA) params and resolved config with
``mmdit.train.checkpoint.restore_inference_params(workdir, step)`` (latest step by default) and writes
the bundle atomically; prints its path. Sample from it with ``mmdit-sample --bundle BUNDLE``.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmdit-export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="training workdir (checkpoints + config.json)")
    p.add_argument("--out", required=True, help="bundle directory to write (replaced atomically if it is a bundle)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument(
        "--platforms", default=None, help="comma-separated lowering platforms (default: cpu,cuda,tpu, skipping those that fail)"
    )
    p.add_argument("--fixed-batch", action="store_true", help="export for batch 1 instead of a symbolic batch")
    return p


def main(argv=None) -> int:
    """Console entry point ``mmdit-export`` (see the module docstring)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        try:
            from mmdit.train.checkpoint import restore_inference_params
        except ImportError as e:
            raise ValueError(f"mmdit.train.checkpoint is not available ({e}); cannot restore {args.workdir}") from None
        from mmdit.serve.export import export_bundle

        cfg, params = restore_inference_params(args.workdir, step=args.step)
        platforms = [p.strip() for p in args.platforms.split(",") if p.strip()] if args.platforms else None
        path = export_bundle(cfg, params, args.out, step=args.step, batch_symbolic=not args.fixed_batch, platforms=platforms)
    except (ValueError, FileNotFoundError, KeyError) as e:
        parser.exit(2, f"mmdit-export: error: {e}\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
