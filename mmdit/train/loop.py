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

import os
import time

import jax

from mmdit import config_lib
from mmdit.data.sharded_iterator import data_iterator
from mmdit.model.diffusion import DiffusionModel
from mmdit.parallel import distributed
from mmdit.train import checkpoint, sharding
from mmdit.train.metrics import MetricWriter
from mmdit.train.state import make_optimizer
from mmdit import config_spec

input_keys = sharding.input_keys  # record fields the train step consumes (kept for callers)


def default_data_dir(cfg, workdir: str) -> str:
    return config_spec.data_spec(cfg).dir or os.path.join(workdir, "data", "train")


def train(
    cfg, workdir: str, *, data_dir: str | None = None, stop_after: int | None = None, progress: bool = True, sample_hook=None
) -> dict:
    """Trains ``cfg`` in ``workdir``; returns the last logged metrics. ``stop_after`` ends the run
    early after that many *new* steps (tests; a killed run resumes the same way).

    ``sample_hook(step, state, writer)`` (called every ``train.sample_every`` steps) receives the
    sharded state (on several hosts its arrays are not fully addressable: gather inside jit, or use
    ``jax.experimental.multihost_utils``). Training imports no sampling or evaluation: the caller
    builds the hook (``mmdit-train``: ``mmdit.eval.train_samples.sample_hook_for_workdir``)."""
    spec = config_spec.build_run_spec(cfg)  # every section validated before anything compiles
    distributed.maybe_initialize(cfg)
    workdir = os.path.abspath(workdir)
    checkpoint.check_config_matches(workdir, cfg)
    if jax.process_index() == 0:
        config_lib.write_resolved(cfg, workdir)
    model = DiffusionModel.from_config(cfg)
    tx = make_optimizer(spec.train)
    run = sharding.setup(cfg, model, tx)  # validates mesh/rules/batch before anything compiles
    data_iter = data_iterator(cfg, data_dir or default_data_dir(cfg, workdir), run.batch_block())
    manager = checkpoint.make_manager(workdir, spec.train)
    state = checkpoint.restore(manager, run.abstract_state, data_iter)
    if state is None:
        state = run.init(jax.random.key(int(cfg.seed)))
    start = int(state.step)
    total = spec.train.steps
    writer = MetricWriter(workdir)
    tokens_per_step = spec.train.global_batch_size * model.spec.num_tokens
    prof = config_spec.complete(cfg).profile
    prof_start, prof_steps = int(prof.start_step), int(prof.num_steps)
    prof_dir = os.path.join(workdir, "profile", *([f"process_{jax.process_index()}"] if jax.process_count() > 1 else []))
    log_every, ckpt_every = spec.train.log_every, spec.train.checkpoint_every
    sample_every = spec.train.sample_every
    bar = _progress(progress, start, total)
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
    manager.wait_until_finished()
    manager.close()
    writer.close()
    if bar is not None:
        bar.close()
    return last


def _lr(cfg, step):
    from mmdit.train.state import learning_rate_schedule

    return learning_rate_schedule(config_spec.train_spec(cfg))(step)


def _progress(enabled: bool, start: int, total: int):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
