"""One writer per directory: an exclusive ``fcntl.flock`` on ``DIR/.mmdit.lock``.

Every command that writes a run's state (``mmdit-train``, ``mmdit demo``, ``mmdit-eval``,
``mmdit-export``, ``mmdit-data synth``, ingest) holds the lock of the directory it writes for its
whole run; a second writer fails at once with :class:`LockHeld`, naming the holder's pid, host and
command. The kernel drops a flock when its process dies (even on SIGKILL), so a crashed run never
blocks the next one: the lock file still names the dead holder (a clean exit empties it), and the
next writer takes it over with a warning. Readers (``mmdit-sample --workdir``) take no lock.

The lock file holds one JSON line ``{"pid", "host", "command", "since"}``. ``flock`` is advisory and
per open file description, and on network filesystems it may be local to one host: two hosts
writing the same NFS workdir are not protected (the message names the host so a user can tell).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from typing import Callable

LOCK_NAME = ".mmdit.lock"


class LockHeld(RuntimeError):
    """Another live process holds the directory's lock; the message names it and the fix."""


def _describe(info: dict) -> str:
    return (
        f"pid {info.get('pid', '?')} on host {info.get('host', '?')} "
        f"({info.get('command') or 'unknown command'}, since {info.get('since', '?')})"
    )


class DirLock:
    """Exclusive lock on ``directory`` (created if missing) through the file ``directory/name``. A
    context manager; ``acquire`` raises :class:`LockHeld` when another process holds it. ``warn`` receives the one-line notice when a
    dead holder's lock is taken over (default: stderr)."""

    def __init__(
        self, directory: str, command: str | None = None, warn: Callable[[str], None] | None = None, *, name: str = LOCK_NAME
    ):
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, name)
        self.command = command or " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:200]
        self.warn = warn or (lambda m: print(m, file=sys.stderr))
        self._fd: int | None = None

    def acquire(self) -> "DirLock":
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read(fd)
            os.close(fd)
            raise LockHeld(
                f"{self.directory} is in use by {_describe(info)}; wait for it to finish, stop it, or use another "
                f"directory (lock file {self.path})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        previous = _read(fd)
        if previous:
            self.warn(
                f"warning: {self.directory} was locked by {_describe(previous)}, which ended without releasing it "
                "(killed or crashed); taking the lock over"
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empties the lock file (a clean exit) and drops the lock. Idempotent."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    """The holder info in an open lock file ({} when empty or unreadable)."""
    try:
        data = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(data) if data else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "command": "unreadable lock file"}
