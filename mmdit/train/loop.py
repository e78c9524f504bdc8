"""The training loop, top to bottom: process group -> config -> model -> sharded setup (mesh, rules,
checks, shardings) -> data -> state (restored or fresh, created sharded) -> steps (log,
checkpoint, sample, profile) -> final checkpoint.

Sharding lives in :mod:`mmdit.train.sharding` (``cfg.mesh``, ``cfg.mesh.rules``; one device is a
1-device mesh), multi-host in :mod:`mmdit.parallel.distributed` (``cfg.distributed`` or the
``MMDIT_*`` environment; every process runs this same function), each process's slice of the data
in :mod:`mmdit.data.sharded_iterator`.

Resuming is automatic: rerunning the same command with the same ``--workdir`` continues from the
latest complete checkpoint, restoring params, optimizer, EMA, step, RNG and the data iterator, so
the loss trajectory matches an uninterrupted run exactly (on CPU). A checkpoint restores onto any
mesh shape (orbax reads into the abstract state carrying this run's shardings).
"""

from __future__ import annotations

import contextlib
import os
import time

import jax

from mmdit import config_lib
from mmdit.data.sharded_iterator import data_iterator
from mmdit.model.diffusion import DiffusionModel
from mmdit.parallel import distributed
from mmdit.train import checkpoint, sharding
from mmdit.train.console import print_on_process_0, progress_bar, warn_on_process_0
from mmdit.train.metrics import MetricWriter
from mmdit.train.resume import restore_latest, trim_metrics  # noqa: F401  (trim_metrics: kept for callers)
from mmdit.train.state import make_optimizer
from mmdit import config_spec
from mmdit.data import codec_stamp, records
from mmdit.util import preflight
from mmdit.util.lock import DirLock

input_keys = sharding.input_keys  # record fields the train step consumes (kept for callers)


def default_data_dir(cfg, workdir: str) -> str:
    return config_spec.data_spec(cfg).dir or os.path.join(workdir, "data", "train")


def train(
    cfg,
    workdir: str,
    *,
    data_dir: str | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    sample_hook=None,
    verify_data: bool | None = None,
    verify_checkpoint: bool = True,
    lock: bool = True,
    log=None,
) -> dict:
    """Trains ``cfg`` in ``workdir``; returns the last logged metrics. ``stop_after`` ends the run
    early after that many *new* steps (tests; a killed run resumes the same way).

    ``sample_hook(step, state, writer)`` (called every ``train.sample_every`` steps) receives the
    sharded state (on several hosts its arrays are not fully addressable: gather inside jit, or use
    ``jax.experimental.multihost_utils``). Training imports no sampling or evaluation: the caller
    builds the hook (``mmdit-train``: ``mmdit.eval.train_samples.sample_hook_for_workdir``).

    Before anything compiles: every config section is validated, the workdir lock is taken
    (``lock``; process 0; :mod:`mmdit.util.lock`), the data manifest is read and, with
    ``verify_data`` (None: when the shards total at most :data:`VERIFY_DATA_MAX_BYTES`), every
    shard's sha256 checked; the workdir must be writable with room for ``train.keep_checkpoints``
    checkpoints. ``config.json`` is written only then. ``verify_checkpoint``: check the restored
    checkpoint's sha256 (:mod:`mmdit.train.checkpoint`); a corrupt latest step falls back to the
    previous one. ``log`` receives one-line notes ("resuming from step N"; default: stdout, process 0)."""
    spec = config_spec.build_run_spec(cfg)  # every section validated before anything compiles
    distributed.maybe_initialize(cfg)
    workdir = os.path.abspath(workdir)
    log = log or print_on_process_0
    with contextlib.ExitStack() as stack:
        if lock and jax.process_index() == 0:
            stack.enter_context(DirLock(workdir, command=f"mmdit-train --workdir {workdir}"))
        return _train_locked(cfg, spec, workdir, data_dir, stop_after, progress, sample_hook, verify_data, verify_checkpoint, log)


VERIFY_DATA_MAX_BYTES = 2 << 30  # verify_data=None checks the data sha256 up to this many bytes of shards


def _train_locked(cfg, spec, workdir, data_dir, stop_after, progress, sample_hook, verify_data, verify_checkpoint, log) -> dict:
    checkpoint.check_config_matches(workdir, cfg)
    model = DiffusionModel.from_config(cfg)
    tx = make_optimizer(spec.train)
    run = sharding.setup(cfg, model, tx)  # validates mesh/rules/batch before anything compiles
    data_dir = data_dir or default_data_dir(cfg, workdir)
    _check_data(cfg, data_dir, verify_data, log)
    data_iter = data_iterator(cfg, data_dir, run.batch_block())
    if jax.process_index() == 0:
        state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(run.abstract_state))
        existing = len(os.listdir(checkpoint.checkpoint_dir(workdir))) if os.path.isdir(checkpoint.checkpoint_dir(workdir)) else 0
        preflight.check_output_dir(
            workdir,
            state_bytes * max(1, spec.train.keep_checkpoints + 1 - existing),
            f"{spec.train.keep_checkpoints} checkpoint(s) of {preflight.human_bytes(state_bytes)} (train.keep_checkpoints)",
        )
        config_lib.write_resolved(cfg, workdir)  # only once the config and the data are known good
    manager = checkpoint.make_manager(workdir, spec.train)
    total = spec.train.steps
    restored = restore_latest(
        manager, run.abstract_state, data_iter, workdir, total, verify=verify_checkpoint, log=log, warn=warn_on_process_0
    )
    if restored.finished:
        return {}
    state = restored.state
    if state is None:
        state = run.init(jax.random.key(int(cfg.seed)))
        if spec.train.init_from:  # pretrained start of a fresh run (a resumed run keeps its checkpoint)
            from mmdit.train.init_from import init_state_from

            state = init_state_from(
                state,
                spec.train.init_from,
                spec.train.init_from_ignore,
                run.state_shardings.params,
                log=log,
                prediction=model.spec.prediction,
            )
    start = int(state.step)
    writer = MetricWriter(workdir)
    tokens_per_step = spec.train.global_batch_size * model.spec.num_tokens
    prof = config_spec.complete(cfg).profile
    prof_start, prof_steps = int(prof.start_step), int(prof.num_steps)
    prof_dir = os.path.join(workdir, "profile", *([f"process_{jax.process_index()}"] if jax.process_count() > 1 else []))
    log_every, ckpt_every = spec.train.log_every, spec.train.checkpoint_every
    sample_every = spec.train.sample_every
    bar = progress_bar(progress, start, total, "train")
    last = {}
    t_last, n_last = time.perf_counter(), start
    end = total if stop_after is None else min(total, start + stop_after)
    for step in range(start, end):
        if step == prof_start and prof_steps > 0:
            jax.profiler.start_trace(prof_dir)
        batch = run.global_batch(next(data_iter))
        state, metrics = run.step(state, batch)
        done = step + 1
        if prof_steps > 0 and done == prof_start + prof_steps:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
        if done % log_every == 0 or done == end:
            metrics = jax.device_get(metrics)  # replicated scalars: readable on every host
            now = time.perf_counter()
            rate = (done - n_last) / max(now - t_last, 1e-9)
            t_last, n_last = now, done
            last = {k: float(v) for k, v in metrics.items()}
            last.update({"lr": float(_lr(cfg, done)), "steps_per_sec": rate, "tokens_per_sec": rate * tokens_per_step})
            writer.scalars(done, last)  # process 0 only
            if bar is not None:
                bar.set_postfix(loss=f"{last['loss']:.4f}")
        if done % ckpt_every == 0 or done == total:
            checkpoint.save(manager, done, state, data_iter)  # every process writes its shards
        if sample_hook is not None and sample_every and done % sample_every == 0:
            sample_hook(done, state, writer)
        if bar is not None:
            bar.update(1)
    checkpoint.finish(manager)
    writer.close()
    if bar is not None:
        bar.close()
    return last


def _check_data(cfg, data_dir: str, verify: bool | None, log) -> None:
    """Reads the data manifest and checks every shard (size, record count; sha256 when ``verify``,
    or when ``verify`` is None and the shards are small), and that the codecs which encoded the latents
    are ``cfg``'s (:mod:`mmdit.data.codec_stamp`). ValueError naming the shard or the fields otherwise."""
    manifest = records.read_manifest(data_dir)
    note = codec_stamp.check_codecs(
        cfg,
        data_dir,
        require_stamp=False,
        fix="train with the config that made the records, or re-make them with this one",
        manifest=manifest,
    )
    if note:
        log(note)
    size = sum(int(s.get("num_bytes", 0)) for s in manifest.get("shards", []))
    if verify is None:
        verify = size <= VERIFY_DATA_MAX_BYTES
        if not verify:
            log(
                f"note: not checking the sha256 of {preflight.human_bytes(size)} of data in {data_dir} "
                "(pass --verify-data to check it)"
            )
    records.open_dataset(data_dir, verify_checksums=verify)


def _lr(cfg, step):
    from mmdit.train.state import learning_rate_schedule

    return learning_rate_schedule(config_spec.train_spec(cfg))(step)
