"""Resuming a loop from its workdir: what training (:mod:`mmdit.train.loop`) and distillation
(:mod:`mmdit.distill.loop`) do alike before their first step.

:func:`restore_latest` restores the latest good checkpoint (:func:`mmdit.train.checkpoint.restore_step`:
state, data position; corrupt steps skipped and, on process 0, quarantined), says so, and drops the
``metrics.jsonl`` lines a killed run logged after that checkpoint (:func:`trim_metrics`), so the
resumed run logs them again exactly as an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from mmdit.train import checkpoint


@dataclasses.dataclass(frozen=True)
class Restored:
    """``state``: the restored state, None when the workdir has no checkpoint (start fresh); ``step``:
    its step; ``finished``: already at ``total`` steps (nothing to do; the manager is closed)."""

    state: Any
    step: int | None
    finished: bool = False


def restore_latest(
    manager, abstract_state, data_iter, workdir: str, total: int, *, verify: bool, log, warn, verb: str = "train"
) -> Restored:
    """The latest good checkpoint of ``workdir`` (module docstring) restored into ``abstract_state``'s
    structure and shardings and ``data_iter``'s position. ``total``: ``train.steps``; ``verb`` names
    what raising it would do further (``train`` / ``distil``) in the note of a finished run."""
    process_0 = jax.process_index() == 0
    state, step = checkpoint.restore_step(manager, abstract_state, data_iter, verify=verify, quarantine=process_0, warn=warn)
    if state is None:
        return Restored(None, None)
    log(f"resuming from step {step} ({checkpoint.step_dir(manager, step)})")
    if step >= total:
        log(f"already at step {step} >= train.steps={total}, nothing to do (raise train.steps to {verb} further)")
        manager.close()
        return Restored(state, step, finished=True)
    if process_0:
        trim_metrics(os.path.join(workdir, "metrics.jsonl"), step)
    return Restored(state, step)


def trim_metrics(path: str, step: int) -> int:
    """Drops the lines of ``metrics.jsonl`` logged after ``step`` (a killed run logged steps its last
    checkpoint does not hold; the resumed run logs them again). Atomic; returns the lines dropped."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line of a killed run
    if len(keep) == len(lines):
        return 0
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(lines) - len(keep)
