"""Training stages: ``train.stages`` run in sequence from one ``mmdit train`` launch.

A stage is a dict: a ``name`` plus overrides of the run's config, any of ``steps``, ``tasks`` (replaces
the ``tasks`` mapping), ``trainable``, ``freeze``, ``lr``, ``lr_groups``, ``warmup_steps``,
``init_from_ignore`` (``train.*`` fields) and ``data`` (a record directory; a relative one is a split
beside the run's training records, e.g. ``"train_audio"`` -> ``<workdir>/data/train_audio``).

Layout and sequencing::

    <workdir>/stages.json            the stage list (a rerun with another list is refused)
    <workdir>/stage_<name>/          one ordinary training workdir per stage (mmdit.train.loop)
    <workdir>/stage_<name>/stage_done.json   written atomically when the stage reached its steps

Stage 1 starts from ``train.init_from`` (if any); stage k+1 starts from stage k's final EMA params
(``init_from`` = stage k's workdir, :mod:`mmdit.train.init_from`) with its own fresh optimizer state.
Rerunning the same command resumes: finished stages (their marker, with at least the stage's
``steps``) are skipped and the unfinished one resumes from its own latest checkpoint. Raising a
finished stage's ``steps`` reopens it (it trains on from its checkpoint).

Readers of a staged run (``mmdit sample/eval/export --workdir``) use :func:`resolve_workdir`: the last
stage that holds a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from typing import Any, Callable

import jax

from mmdit.util.files import write_json_atomic
from mmdit.util.plain import plain

STAGES_MANIFEST = "stages.json"
DONE_MARKER = "stage_done.json"
TRAIN_KEYS = ("steps", "trainable", "freeze", "lr", "lr_groups", "warmup_steps", "init_from_ignore")
STAGE_KEYS = ("name", "tasks", "data") + TRAIN_KEYS
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One validated stage: ``name``, its ``train.*`` overrides, ``tasks`` (None: the run's) and
    ``data`` (None: the run's training records)."""

    name: str
    train: dict
    tasks: dict | None
    data: str | None


def parse_stages(cfg) -> list[Stage]:
    """``cfg.train.stages`` validated (ValueError naming the stage and the field); [] when none."""
    raw = plain(cfg.train.get("stages", ())) or ()
    if isinstance(raw, dict) or not isinstance(raw, (list, tuple)):
        raise ValueError(f"train.stages={raw!r}: expected a tuple of dicts, e.g. (dict(name='tts', steps=1000), ...)")
    stages, seen = [], set()
    for i, s in enumerate(raw):
        where = f"train.stages[{i}]"
        if not isinstance(s, dict):
            raise ValueError(f"{where}={s!r}: expected a dict with a name and overrides")
        name = s.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{where}.name={name!r}: give each stage a name of letters, digits, '_' or '-'")
        if name in seen:
            raise ValueError(f"{where}.name={name!r}: two stages share the name; names must be unique")
        seen.add(name)
        unknown = sorted(set(s) - set(STAGE_KEYS))
        if unknown:
            raise ValueError(f"{where} ({name}): unknown key(s) {unknown}; a stage may set {list(STAGE_KEYS)}")
        tasks = s.get("tasks")
        if tasks is not None and (not isinstance(tasks, dict) or not tasks):
            raise ValueError(f"{where}.tasks={tasks!r}: expected a non-empty dict task -> weight, e.g. dict(tts=1.0)")
        data = s.get("data")
        if data is not None and (not isinstance(data, str) or not data):
            raise ValueError(f"{where}.data={data!r}: expected a record directory or a split name such as 'train_audio'")
        stages.append(Stage(name, {k: s[k] for k in TRAIN_KEYS if k in s}, dict(tasks) if tasks else None, data))
    return stages


def stage_dir(workdir: str, name: str) -> str:
    return os.path.join(workdir, f"stage_{name}")


def stage_config(cfg, stage: Stage, init_from: str | None):
    """The config stage ``stage`` trains with: ``cfg`` with the stage's overrides, no stage list, and
    ``train.init_from`` = ``init_from`` (the previous stage's workdir; the run's own for stage 1).
    Validated like any run (ValueError naming the field)."""
    import ml_collections as mlc

    from mmdit import config_spec

    out = cfg.copy_and_resolve_references()
    with out.unlocked():
        out.train.stages = ()
        for key, value in stage.train.items():
            out.train[key] = mlc.ConfigDict(value) if isinstance(value, dict) else value
        out.train.init_from = init_from
        if stage.tasks is not None:
            out.tasks = mlc.ConfigDict(stage.tasks)
    try:
        config_spec.build_run_spec(out)
    except ValueError as e:
        raise ValueError(f"train.stages ({stage.name}): {e}") from None
    return out


def stage_data_dir(stage: Stage, train_data_dir: str) -> str:
    """The records stage ``stage`` reads: its ``data`` (relative: beside ``train_data_dir``) or the run's."""
    if stage.data is None:
        return train_data_dir
    if os.path.isabs(stage.data):
        return stage.data
    return os.path.join(os.path.dirname(os.path.abspath(train_data_dir)), stage.data)


def latest_step(workdir: str) -> int | None:
    """The newest checkpoint step in ``workdir/checkpoints`` (None: none)."""
    root = os.path.join(workdir, "checkpoints")
    steps = [int(s) for s in os.listdir(root) if s.isdigit()] if os.path.isdir(root) else []
    return max(steps) if steps else None


def is_finished(workdir: str, steps: int) -> bool:
    """Whether the stage in ``workdir`` wrote its marker with at least ``steps`` steps."""
    path = os.path.join(workdir, DONE_MARKER)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return int(json.load(f).get("steps", -1)) >= steps


def resolve_workdir(workdir: str) -> str:
    """The directory holding a run's checkpoints: ``workdir`` itself, or for a staged run the last stage
    that has a checkpoint (FileNotFoundError naming the workdir when no stage has one yet)."""
    manifest = os.path.join(workdir, STAGES_MANIFEST)
    if not os.path.isfile(manifest):
        return workdir
    with open(manifest) as f:
        names = json.load(f)["stages"]
    for name in reversed(names):
        d = stage_dir(workdir, name)
        if latest_step(d) is not None:
            return d
    raise FileNotFoundError(f"{workdir}: a staged run ({', '.join(names)}) with no checkpoint yet; train it first")


def _check_manifest(workdir: str, stages: list[Stage]) -> None:
    path = os.path.join(workdir, STAGES_MANIFEST)
    names = [s.name for s in stages]
    if os.path.isfile(path):
        with open(path) as f:
            before = json.load(f)["stages"]
        if before != names:
            raise ValueError(
                f"{workdir} holds a staged run with stages {before}, the config lists {names} (train.stages); "
                "use a new --workdir or restore the stage list"
            )
        return
    write_json_atomic(path, {"stages": names})


def run_stages(
    cfg,
    workdir: str,
    *,
    data_dir: str | None = None,
    stop_after: int | None = None,
    log: Callable[[str], None] | None = None,
    train_fn: Callable[..., dict] | None = None,
    hook_for: Callable[[Any, str], Any] | None = None,
    **train_kwargs,
) -> dict:
    """Trains every stage of ``cfg.train.stages`` in order in ``workdir`` (see the module docstring);
    returns the last stage's last logged metrics ({} when nothing was trained). ``stop_after``: stop
    after that many new steps over all stages (tests; the rerun resumes). ``train_fn``: the loop
    (default :func:`mmdit.train.loop.train`), called as ``train_fn(stage_cfg, stage_workdir,
    data_dir=..., stop_after=..., sample_hook=..., log=..., **train_kwargs)``; ``hook_for(stage_cfg,
    workdir)`` builds each stage's sample hook (None: no hook)."""
    from mmdit.train import console, loop
    from mmdit.util.lock import DirLock

    train_fn = train_fn or loop.train
    log = log or console.print_on_process_0
    stages = parse_stages(cfg)
    if not stages:
        raise ValueError("run_stages: the config has no train.stages; train it with mmdit.train.loop.train")
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:
            stack.enter_context(DirLock(workdir, command=f"mmdit-train --workdir {workdir} (stages)"))
        return _run_locked(cfg, stages, workdir, data_dir, stop_after, log, train_fn, hook_for, train_kwargs)


def _run_locked(cfg, stages, workdir, data_dir, stop_after, log, train_fn, hook_for, train_kwargs) -> dict:
    from mmdit.train import loop

    train_data = data_dir or loop.default_data_dir(cfg, workdir)
    # every stage's config validated before anything trains; stage k+1 starts from stage k's workdir
    sources = [cfg.train.get("init_from")] + [stage_dir(workdir, s.name) for s in stages[:-1]]
    configs = [stage_config(cfg, s, src) for s, src in zip(stages, sources)]
    if jax.process_index() == 0:
        _check_manifest(workdir, stages)
    last: dict = {}
    budget = stop_after
    for k, (stage, scfg) in enumerate(zip(stages, configs)):
        d = stage_dir(workdir, stage.name)
        steps = int(scfg.train.steps)
        if is_finished(d, steps):
            log(f"stage {k + 1}/{len(stages)} {stage.name!r}: done ({steps} steps), skipped")
            continue
        if budget is not None and budget <= 0:
            return last
        before = latest_step(d) or 0
        log(f"stage {k + 1}/{len(stages)} {stage.name!r}: {steps} steps in {d}")
        last = train_fn(
            scfg,
            d,
            data_dir=stage_data_dir(stage, train_data),
            stop_after=budget,
            sample_hook=hook_for(scfg, workdir) if hook_for is not None else None,
            log=log,
            **train_kwargs,
        )
        reached = latest_step(d) or 0
        if budget is not None:
            budget -= reached - before
        if reached < steps:
            log(f"stage {stage.name!r} stopped at step {reached} of {steps}; rerun the same command to resume")
            return last
        if jax.process_index() == 0:
            write_json_atomic(os.path.join(d, DONE_MARKER), {"stage": stage.name, "steps": reached})
    return last
