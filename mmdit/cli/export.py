"""``mmdit-export``: a training workdir's EMA params -> a serving bundle (``mmdit/serve/export.py``).

::

    mmdit-export --workdir W --out BUNDLE [--step N] [--platforms cpu,cuda,tpu] [--fixed-batch]

Restores the inference (EMA) params and resolved config with
``mmdit.train.checkpoint.restore_inference(workdir, step)`` (a staged run: its last stage with a
checkpoint; latest good step by default, its
sha256 checked unless ``--no-verify``) and writes the bundle atomically, recording the step in
bundle.json; prints its path. Holds the lock ``.BUNDLE.lock`` next to the bundle while it works. Sample from it with ``mmdit-sample --bundle BUNDLE``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

from mmdit.cli.errors import entry_point


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmdit-export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="training workdir (checkpoints + config.json)")
    p.add_argument("--out", required=True, help="bundle directory to write (replaced atomically if it is a bundle)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument(
        "--platforms", default=None, help="comma-separated lowering platforms (default: cpu,cuda,tpu, skipping those that fail)"
    )
    p.add_argument("--fixed-batch", action="store_true", help="export for batch 1 instead of a symbolic batch")
    p.add_argument("--no-verify", action="store_true", help="restore the checkpoint without checking its sha256.json")
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors (or MMDIT_DEBUG=1)")
    return p


def parse_platforms(value: str | None) -> list[str] | None:
    """``--platforms`` -> a list of known lowering platforms (None: the default set); ValueError naming the flag."""
    if value is None:
        return None
    from mmdit.serve.export import KNOWN_PLATFORMS

    names = [p.strip() for p in value.split(",") if p.strip()]
    bad = [p for p in names if p not in KNOWN_PLATFORMS]
    if not names or bad:
        raise ValueError(
            f"--platforms {value!r}: {'unknown ' + str(bad) if bad else 'empty'}; choose from {list(KNOWN_PLATFORMS)}"
        )
    return names


@entry_point("mmdit-export")
def main(argv=None) -> int:
    """Console entry point ``mmdit-export`` (see the module docstring)."""
    args = _parser().parse_args(argv)
    platforms = parse_platforms(args.platforms)  # before any work
    if args.step is not None and args.step < 0:
        raise ValueError(f"--step {args.step}: a checkpoint step is >= 0")
    from mmdit.serve.export import export_bundle
    from mmdit.train.checkpoint import restore_inference
    from mmdit.util import preflight
    from mmdit.util.lock import DirLock

    out = os.path.abspath(args.out)
    with DirLock(os.path.dirname(out), name=f".{os.path.basename(out)}.lock", command=f"mmdit-export --out {out}"):
        from mmdit.train.stages import resolve_workdir

        cfg, params, step = restore_inference(resolve_workdir(args.workdir), step=args.step, verify=not args.no_verify)
        size = sum(int(np.size(a)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(params))
        preflight.check_output_dir(os.path.dirname(out), 2 * size, f"a bundle of {preflight.human_bytes(size)} of params")
        path = export_bundle(cfg, params, out, step=step, batch_symbolic=not args.fixed_batch, platforms=platforms)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
