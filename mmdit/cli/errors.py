"""One clear line per failure: the shared wrapper around every ``mmdit-*`` entry point.

:func:`entry_point` turns a command's ``main(argv)`` into one that prints a known failure as a single
``PROG: error: MESSAGE`` line on stderr and returns exit code 2, instead of a traceback: bad values
and config fields (``ValueError``, ``KeyError``), missing or unwritable files and full disks
(``OSError``: the message names the path and the fix), undecodable text (``UnicodeError``), images
PIL refuses (``DecompressionBombError``), a directory another writer holds
(:class:`mmdit.util.lock.LockHeld`). Anything else is a bug and keeps its traceback.

``--debug`` (anywhere on the command line; removed before the command parses its arguments) or the
environment variable ``MMDIT_DEBUG=1`` re-raises instead, for the full traceback.

Orbax's reader threads report "Event loop is closed" hundreds of times after a failed restore
(through ``sys.unraisablehook``); the wrapper drops exactly those reports. After a handled failure
the program (not an in-process ``main([...])`` call) ends with ``os._exit`` once stdout/stderr
are flushed, so no background thread still finishing orbax work prints at interpreter shutdown
either. Commands hold their directory locks in ``with`` blocks, so a lock is released before
the error reaches this wrapper.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from typing import Callable

DEBUG_FLAG = "--debug"
DEBUG_ENV = "MMDIT_DEBUG"
MAX_MESSAGE = 600  # characters of one error line; the rest is behind --debug

_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted: free space or write elsewhere",
    errno.EROFS: "the filesystem is read-only: choose a writable output directory",
    errno.EACCES: "permission denied: choose a directory you can write, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a directory you can write, or fix its permissions",
    errno.ENOENT: "no such file or directory: check the path",
    errno.ENOTDIR: "a component of the path is not a directory: check the path",
    errno.EISDIR: "is a directory, not a file: check the path",
}


def debug_enabled(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def describe(e: BaseException) -> str | None:
    """The one-line message for a known failure, or None when ``e`` is not one (a bug: traceback)."""
    from mmdit.util.lock import LockHeld

    name = type(e).__name__
    if isinstance(e, LockHeld):
        msg = str(e)
    elif isinstance(e, UnicodeError):
        msg = f"text is not valid UTF-8 / not encodable ({e}); pass UTF-8 text or a file in UTF-8"
    elif isinstance(e, OSError):
        hint = _OS_HINTS.get(e.errno or -1)
        where = e.filename if e.filename is not None else ""
        if e.filename2 is not None:
            where = f"{where} -> {e.filename2}"
        if hint:
            msg = f"{where}: {hint}" if where else f"{e.strerror or e}: {hint}"
        else:
            msg = f"{where + ': ' if where else ''}{e.strerror or e}"
        if isinstance(e, FileNotFoundError) and e.filename is None:  # raised with our own message
            msg = str(e)
    elif isinstance(e, KeyError):
        msg = str(e.args[0]) if e.args else name
    elif isinstance(e, ValueError):
        msg = str(e)
    elif name == "DecompressionBombError":  # PIL, without importing it
        msg = f"image too large to decode safely ({e}); pass a smaller image"
    else:
        return None
    msg = " ".join(msg.split())
    if len(msg) > MAX_MESSAGE:
        msg = msg[:MAX_MESSAGE] + f" ... (full message: rerun with {DEBUG_FLAG})"
    return msg


def _quiet_shutdown() -> None:
    logging.disable(logging.CRITICAL)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _drop_closed_loop_noise(unraisable) -> None:
    """``sys.unraisablehook`` that drops orbax/tensorstore's "Event loop is closed" callbacks (raised
    in reader threads after a restore already failed) and reports everything else as usual."""
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def entry_point(prog: str) -> Callable:
    """Decorator for a command's ``main(argv=None) -> int`` (see the module docstring)."""

    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(argv=None) -> int:
            as_program = argv is None  # console script / ``python -m``: end the process on failure
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = debug_enabled(argv)
            argv = [a for a in argv if a != DEBUG_FLAG]
            sys.unraisablehook = _drop_closed_loop_noise
            if debug:
                return main(argv)
            try:
                return main(argv)
            except Exception as e:  # noqa: BLE001 -- only the known kinds are handled below
                msg = describe(e)
                if msg is None:
                    raise
                print(f"{prog}: error: {msg}", file=sys.stderr)
                if as_program:
                    exit_quietly(2)
                return 2

        return run

    return wrap


def exit_quietly(code: int) -> None:
    """Ends a failed program without the interpreter's shutdown noise (module docstring)."""
    _quiet_shutdown()
    os._exit(code)
