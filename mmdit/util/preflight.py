"""Checks before the expensive part: is an output directory writable, with room for what a run writes?

Run before compiling or sampling, so a read-only mount or a full disk is one line naming the
directory, not a traceback after minutes of work. The free-space need is an estimate supplied by
the caller (checkpoint size x ``train.keep_checkpoints``, a bundle's params, a set of MP4s).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

MARGIN = 1.1  # free space asked = estimate x MARGIN + SLACK (metadata, logs, JSON)
SLACK = 16 << 20


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_dir(directory: str, need_bytes: int = 0, what: str = "the output") -> None:
    """Creates ``directory`` if needed and checks it takes a file and has ``need_bytes`` (times
    :data:`MARGIN`, plus :data:`SLACK`) free. Raises OSError (read-only, permission) or ValueError
    (space), each naming ``directory`` and the fix."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{directory} exists and is not a directory; choose another output path")
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".mmdit-write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        if e.filename is None:
            e.filename = directory
        raise
    free = shutil.disk_usage(directory).free
    want = int(need_bytes * MARGIN) + SLACK
    if free < want:
        raise OSError(
            errno.ENOSPC,
            f"{directory} has {human_bytes(free)} free but {what} needs about {human_bytes(want)}; "
            "free space or choose another directory",
        )


def check_parent_writable(path: str, need_bytes: int = 0, what: str = "the output") -> None:
    """:func:`check_output_dir` for the (existing or to-be-created) parent of ``path``."""
    check_output_dir(os.path.dirname(os.path.abspath(path)) or _existing_parent(path), need_bytes, what)
