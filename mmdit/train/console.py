"""What a training-like loop prints, on process 0 only: log lines (stdout), warnings (stderr) and the
tqdm progress bar. Shared by ``mmdit train``, its stages and ``mmdit distill``."""

from __future__ import annotations

import sys

import jax


def print_on_process_0(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def warn_on_process_0(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def progress_bar(enabled: bool, start: int, total: int, desc: str):
    """A tqdm bar of ``total`` steps starting at ``start`` (None when disabled or not process 0)."""
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)
