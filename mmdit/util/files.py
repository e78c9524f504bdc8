"""Small file utilities with no dependencies on the rest of the package: durable renames, hashing,
atomic JSON writes.

"Atomic" means a reader sees either the old file or the complete new one, never a torn write: the
data goes to ``path.tmp``, is fsynced, ``os.replace``-d over ``path``, and the directory is fsynced
so the rename survives a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

TMP_SUFFIX = ".tmp"


def fsync_path(path: str) -> None:
    """fsyncs a file or a directory (a directory fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes JSON to ``path`` via ``path.tmp`` + fsync + ``os.replace`` (+ directory fsync)."""
    tmp = path + TMP_SUFFIX
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def chmod_as_umask(path: str, mode: int = 0o666) -> None:
    """Gives ``path`` the permissions ``open()`` would have (``mode`` minus the process umask); for
    files made through ``tempfile.mkstemp`` (always 0600) and renamed into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)
