"""``mmdit <command> ...``: one entry point for every program.

Commands: ``demo`` (the embedded default end to end), ``info``, ``data``, ``train``, ``distill``, ``sample``, ``stream``,
``export``, ``eval``, ``plan``, ``convert``. ``mmdit <command> --help`` shows each one's flags; each is also
installed as ``mmdit-<command>``.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("mmdit.cli.demo", "main", "synth data -> train -> sample every task -> lip-sync eval (configs/demo.py)"),
    "info": ("mmdit.cli.info", "main", "param/token/FLOP counts of a config (eval_shape only)"),
    "data": ("mmdit.cli.data", "main", "write training records (synth: synthetic world; ingest: MP4/WAV files)"),
    "train": ("mmdit.cli.train", "main", "train or resume a run"),
    "distill": ("mmdit.cli.distill", "main", "few-step DMD distillation of a trained teacher (or resume)"),
    "sample": ("mmdit.cli.sample", "main", "sample MP4s from a workdir or serving bundle"),
    "stream": ("mmdit.cli.stream", "main", "stream a talking portrait chunk by chunk into a growing MP4 (KV-cached)"),
    "export": ("mmdit.cli.export", "main", "export a serving bundle (params + jax.export'd step)"),
    "eval": ("mmdit.cli.eval", "main", "lip-sync and identity metrics of a run's samples"),
    "plan": ("mmdit.cli.plan", "main", "ahead-of-time memory/FLOP plan for a topology"),
    "convert": ("mmdit.cli.convert", "main", "pretrained Hugging Face checkpoint (Wan, MMAudio, UMT5...) -> mmdit params"),
}


def usage() -> str:
    lines = [__doc__.strip(), "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None):
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"mmdit: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, fn, _ = COMMANDS[cmd]
    rc = getattr(importlib.import_module(module), fn)(rest)
    if rc and as_program:  # a failed command ends without orbax's shutdown noise
        from mmdit.cli.errors import exit_quietly

        exit_quietly(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
