"""Checkpoints: orbax CheckpointManager holding the train state and the grain iterator state.

Layout: ``WORKDIR/checkpoints/<step>/{state, data_iter, sha256.json}`` (orbax writes each step to a
temporary directory and renames it when complete, so a killed run never leaves a step that looks
finished; async saves overlap the next steps). ``WORKDIR/config.json`` is the resolved config of the
run; resuming with a config whose model differs is refused before anything is restored.

**Integrity.** Once orbax has committed a step, ``sha256.json`` records the sha256 of every file in
it (process 0, synchronously: at the next save for async saves, at :func:`finish` for the last).
:func:`restore` checks those hashes before orbax reads anything (``verify=False`` skips the check,
for checkpoints too large to re-read: a flipped bit then surfaces only as NaNs). A step that fails
the check, or that orbax cannot read (a deleted ``_METADATA``, a truncated chunk), is corrupt: with
no explicit ``step`` the restore says so and falls back to the previous good step; a writer moves
the corrupt step to ``WORKDIR/checkpoints_corrupt/`` (nothing is deleted) so that training can write
that step number again. A step saved before checksums existed (or killed between orbax's commit
and the hashing) restores without the check, with a note.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import weakref

import jax
import ml_collections as mlc
import orbax.checkpoint as ocp

from mmdit.data import pipeline
from mmdit.util.files import file_sha256, write_json_atomic
from mmdit.util.plain import config_from_json

STATE_ITEM = "state"
CHECKSUMS = "sha256.json"
CORRUPT_DIR = "checkpoints_corrupt"

_pending: "weakref.WeakKeyDictionary[ocp.CheckpointManager, list[int]]" = weakref.WeakKeyDictionary()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _ReaderNoise(logging.Filter):
    """Drops orbax's warning that a reader's directory is read-only (every sample/eval/export says it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_ReaderNoise())


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, train=None, *, read_only: bool = False) -> ocp.CheckpointManager:
    """``train``: the validated ``config.train`` (:class:`mmdit.config_spec.TrainSpec`) when writing;
    None for a reader (keeps everything, synchronous)."""
    opts = ocp.CheckpointManagerOptions(
        **({"save_interval_steps": 0} if read_only else {}),  # what orbax sets (with a warning) for a reader
        max_to_keep=train.keep_checkpoints if train is not None else None,
        enable_async_checkpointing=train.async_checkpoint if train is not None else False,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=opts)


def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(int(step)))


def record_checksums(directory: str) -> dict:
    """Writes ``directory/sha256.json``: ``{"files": {relative path: sha256}, "bytes": total}`` of every
    file below ``directory``; returns it."""
    files, total = {}, 0
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel == CHECKSUMS:
                continue
            files[rel] = file_sha256(path)
            total += os.path.getsize(path)
    record = {"format": "mmdit.checkpoint_sha256", "files": files, "bytes": total}
    write_json_atomic(os.path.join(directory, CHECKSUMS), record)
    return record


def verify_checksums(directory: str) -> str | None:
    """None when every file ``directory/sha256.json`` lists is present with its hash; else what is
    wrong (first problem). Raises FileNotFoundError when no checksums were recorded."""
    path = os.path.join(directory, CHECKSUMS)
    with open(path) as f:
        record = json.load(f)
    for rel, digest in sorted(record.get("files", {}).items()):
        file = os.path.join(directory, rel)
        if not os.path.isfile(file):
            return f"{rel} is missing"
        if file_sha256(file) != digest:
            return f"{rel} fails its sha256 check (modified, truncated or bit-flipped)"
    return None


def _record_finished(manager: ocp.CheckpointManager) -> None:
    """Hashes the steps saved through :func:`save` whose commit has finished (process 0)."""
    pending = _pending.get(manager, [])
    while pending:
        step = pending.pop(0)
        directory = step_dir(manager, step)
        if jax.process_index() == 0 and os.path.isdir(directory):  # absent: already rotated out by max_to_keep
            record_checksums(directory)


def save(manager: ocp.CheckpointManager, step: int, state, data_iter=None) -> None:
    """Saves ``step`` (async if the manager is); its sha256.json is written once orbax committed it."""
    if _pending.get(manager):
        manager.wait_until_finished()  # orbax waits for the previous save before the next one anyway
        _record_finished(manager)
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    if data_iter is not None:
        items[pipeline.DATA_ITER_ITEM] = pipeline.iterator_save_args(data_iter)
    manager.save(step, args=ocp.args.Composite(**items))
    _pending.setdefault(manager, []).append(int(step))
    if not manager.is_saving_in_progress():
        _record_finished(manager)


def finish(manager: ocp.CheckpointManager) -> None:
    """Waits for pending saves, records their checksums and closes the manager."""
    manager.wait_until_finished()
    _record_finished(manager)
    manager.close()


def _why_unreadable(e: Exception) -> str:
    first = " ".join(str(e).split())[:300]
    return f"orbax cannot read it ({type(e).__name__}: {first})"


def _quarantine(manager: ocp.CheckpointManager, step: int) -> str:
    """Moves a corrupt step out of the checkpoint directory (never deletes it); returns where to."""
    root = os.path.join(os.path.dirname(str(manager.directory)), CORRUPT_DIR)
    os.makedirs(root, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    dest = os.path.join(root, f"{step}-{stamp}")
    os.replace(step_dir(manager, step), dest)
    manager.reload()
    return dest


def restore(manager: ocp.CheckpointManager, abstract_state, data_iter=None, step: int | None = None, **kw):
    """The state of :func:`restore_step` (None when there is no checkpoint)."""
    return restore_step(manager, abstract_state, data_iter, step, **kw)[0]


def restore_step(
    manager: ocp.CheckpointManager,
    abstract_state,
    data_iter=None,
    step: int | None = None,
    *,
    verify: bool = True,
    quarantine: bool = False,
    warn=_stderr,
):
    """Restores ``step`` (default: the latest good one) into ``abstract_state``'s structure, shapes and
    shardings, and ``data_iter``'s position in place. Returns ``(state, step)``, or ``(None, None)``
    when there is no checkpoint.

    ``verify``: check the step's sha256.json first (module docstring). A corrupt explicit ``step`` is
    a ValueError naming it and the steps there are; without ``step``, corrupt steps are reported
    through ``warn`` and skipped (``quarantine``: moved to ``WORKDIR/checkpoints_corrupt/``, for a
    writer that will save those step numbers again)."""
    available = sorted(manager.all_steps(), reverse=True)
    if step is not None and int(step) not in available:
        raise ValueError(
            f"checkpoint step {step} is not in {manager.directory} (steps there: {sorted(available) or 'none'}); "
            "pick one of them with --step, or omit --step for the latest"
        )
    candidates = [int(step)] if step is not None else available
    for i, s in enumerate(candidates):
        directory = step_dir(manager, s)
        problem = None
        if verify:
            try:
                problem = verify_checksums(directory)
            except FileNotFoundError:
                warn(
                    f"note: checkpoint step {s} has no {CHECKSUMS} (saved before checksums, or killed right after saving); not verified"
                )
            except (OSError, ValueError) as e:
                problem = f"its {CHECKSUMS} is unreadable ({e})"
        if problem is None:
            items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
            if data_iter is not None:
                items[pipeline.DATA_ITER_ITEM] = pipeline.iterator_restore_args(data_iter)
            try:
                restored = manager.restore(s, args=ocp.args.Composite(**items))
                return restored[STATE_ITEM], s
            except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many types for one cause
                if verify and os.path.isfile(os.path.join(directory, CHECKSUMS)) and not isinstance(e, (OSError,)):
                    # every file is intact, so orbax refusing it means a different model/state structure
                    raise ValueError(
                        f"checkpoint {directory} is intact but does not match this model/config "
                        f"({_why_unreadable(e)}); train into a new --workdir or use the config the checkpoint was made with"
                    ) from None
                problem = _why_unreadable(e)
        if step is not None:
            raise ValueError(
                f"checkpoint step {s} ({directory}) is corrupt: {problem}; restore another step with --step "
                f"(steps there: {sorted(available)})"
            )
        rest = candidates[i + 1 :]
        where = f"moved to {_quarantine(manager, s)}" if quarantine else "left in place"
        if rest:
            warn(f"warning: checkpoint step {s} is corrupt: {problem} ({where}); falling back to step {rest[0]}")
        else:
            raise ValueError(
                f"checkpoint step {s} ({directory}) is corrupt: {problem} ({where}), and no earlier step is left to "
                "fall back to; train into a new --workdir or from scratch"
            )
    return None, None


# model.* fields a resumed run may change: how the model executes, not what it computes.
EXECUTION_FIELDS = ("attention", "remat", "scan", "sequence_parallel")


def check_config_matches(workdir: str, cfg) -> None:
    """Refuses to resume a workdir whose saved config builds a different model than ``cfg`` (compared on
    the built model spec, :func:`mmdit.model.spec_diff.model_differences`: spelling the same model
    differently is no difference; :data:`EXECUTION_FIELDS` may change); the message names the fields."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path) or not os.path.isdir(checkpoint_dir(workdir)):
        return
    with open(path) as f:
        saved = json.load(f)
    from mmdit.config_lib import to_json
    from mmdit.model.spec_diff import model_differences

    now = json.loads(to_json(cfg))
    diffs = model_differences(saved.get("model", {}), now.get("model", {}), ignore=EXECUTION_FIELDS)
    if diffs:
        raise ValueError(
            f"{workdir} holds checkpoints of a different model: "
            + "; ".join(diffs[:5])
            + ". Use a new --workdir, or the config in "
            + path
        )


def load_config(workdir: str) -> mlc.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a training workdir (mmdit-train --workdir)?")
    with open(path) as f:
        return config_from_json(json.load(f))


def restore_inference(workdir: str, step: int | None = None, which: str = "ema", *, verify: bool = True):
    """``(config, params, step)`` from a training workdir: the EMA (default) or raw params of ``step``
    (default: the latest good step, see :func:`restore`)."""
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.train.state import init_state, make_optimizer
    from mmdit import config_spec

    cfg = load_config(workdir)
    model = DiffusionModel.from_config(cfg)
    tx = make_optimizer(config_spec.train_spec(cfg))
    abstract = jax.eval_shape(lambda: init_state(model, tx, jax.random.key(0)))
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}; train first (mmdit-train --workdir {workdir})")
    manager = make_manager(workdir, read_only=True)
    state, step = restore_step(manager, abstract, step=step, verify=verify)
    if state is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}; train first (mmdit-train --workdir {workdir})")
    return cfg, (state.ema if which == "ema" else state.params), step


def restore_inference_params(workdir: str, step: int | None = None, which: str = "ema", *, verify: bool = True):
    """``(config, params)`` of :func:`restore_inference` (without the step)."""
    cfg, params, _ = restore_inference(workdir, step, which, verify=verify)
    return cfg, params
