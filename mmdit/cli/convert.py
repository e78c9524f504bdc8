"""``mmdit convert --from HF_DIR --to OUT [--family F] [--dtype float32|bfloat16] [--force]``: a
pretrained Hugging Face checkpoint folder -> an mmdit converted checkpoint (params + manifest.json).

The families are listed by ``--help`` (each family module's ``DESCRIPTION``, imported lazily).
"""

from __future__ import annotations

import argparse
import json
import sys

from mmdit.cli.errors import entry_point

EXAMPLE = """example (Wan2.1 1.3B text-to-video DiT, downloaded on a machine with internet):
  huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir ~/hf/wan21-1.3b
  mmdit convert --from ~/hf/wan21-1.3b/transformer --to ~/ckpt/wan21-1.3b-dit --dtype bfloat16
  mmdit convert --from ~/hf/wan21-1.3b/vae --to ~/ckpt/wan21-vae
A diffusers pipeline folder (model_index.json) may be given with --family to pick its component.
Read the result with mmdit.util.converted.load(OUT) or train from it with mmdit-train --init-from OUT."""


def _families_help() -> str:
    from mmdit.convert import registry

    lines = ["families (--family; auto-detected from config.json when omitted):"]
    lines += [f"  {name:<16} {desc}" for name, desc in registry.describe()]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmdit convert",
        description=__doc__.split("\n\n")[0],
        epilog=_families_help() + "\n\n" + EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--from", dest="src", required=True, help="Hugging Face model folder (config.json + *.safetensors)")
    p.add_argument("--to", dest="out", required=True, help="output directory (created atomically)")
    p.add_argument("--family", default=None, help="converter family (default: detect from config.json)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the converted params")
    p.add_argument("--force", action="store_true", help="replace a different converted checkpoint already at --to")
    p.add_argument("--allow-unused", action="store_true", help="do not fail when source tensors are left unconverted")
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors (or MMDIT_DEBUG=1)")
    return p


@entry_point("mmdit convert")
def main(argv=None) -> int:
    """Bad input (:class:`~mmdit.convert.source.ConvertError`, a ValueError), missing files and full
    disks print one ``mmdit convert: error: ...`` line and return 2 (``--debug``: the traceback)."""
    args = parser().parse_args(argv)
    from mmdit.convert.run import convert_dir

    manifest = convert_dir(
        args.src, args.out, family=args.family, dtype=args.dtype, force=args.force, allow_unused=args.allow_unused
    )
    summary = {k: manifest[k] for k in ("family", "target", "dtype", "n_params")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
