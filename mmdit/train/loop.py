"""The training loop, top to bottom: config -> model -> data -> state (fresh or resumed) -> steps
(log, checkpoint, sample, profile) -> final checkpoint.

Resuming is automatic: rerunning the same command with the same ``--workdir`` continues from the
latest complete checkpoint, restoring params, optimizer, EMA, step, RNG and the data iterator, so
the loss trajectory matches an uninterrupted run exactly (on CPU).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmdit import config_lib
from mmdit.data import pipeline
from mmdit.model.diffusion import DiffusionModel
from mmdit.train import checkpoint
from mmdit.train.metrics import MetricWriter
from mmdit.train.state import init_state, make_optimizer
from mmdit.train.step import LATENT_SUFFIX, make_train_step


def input_keys(model: DiffusionModel) -> list[str]:
    """Record fields the train step consumes."""
    keys = [a.name + LATENT_SUFFIX for a in model.spec.streams]
    for c in model.spec.conditions:
        if c.name == "text" and model.text_encoder is not None:
            keys.append("text_tokens")
        else:
            keys.append(c.name)
    return keys


def to_device_batch(batch: dict, keys: list[str]) -> dict:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"training records lack field(s) {missing} the model needs (have {sorted(batch)}); re-create the data for this config")
    return {k: jnp.asarray(batch[k]) for k in keys}


def default_data_dir(cfg, workdir: str) -> str:
    return cfg.data.get("dir", None) or os.path.join(workdir, "data", "train")


def train(cfg, workdir: str, *, data_dir: str | None = None, stop_after: int | None = None, progress: bool = True, sample_hook=None) -> dict:
    """Trains ``cfg`` in ``workdir``; returns the last logged metrics. ``stop_after`` ends the run
    early after that many *new* steps (tests; a killed run resumes the same way)."""
    workdir = os.path.abspath(workdir)
    checkpoint.check_config_matches(workdir, cfg)
    if jax.process_index() == 0:
        config_lib.write_resolved(cfg, workdir)
    model = DiffusionModel.from_config(cfg)
    tx = make_optimizer(cfg.train)
    data_dir = data_dir or default_data_dir(cfg, workdir)
    data_iter = pipeline.make_train_iterator(
        data_dir, global_batch_size=int(cfg.train.global_batch_size), seed=int(cfg.seed),
        num_workers=int(cfg.data.get("num_workers", 0)),
    )
    manager = checkpoint.make_manager(workdir, cfg.train)
    state = init_state(model, tx, jax.random.key(int(cfg.seed)))
    restored = checkpoint.restore(manager, jax.eval_shape(lambda: state), data_iter)
    if restored is not None:
        state = restored
    start = int(state.step)
    total = int(cfg.train.steps)
    step_fn = jax.jit(make_train_step(model, cfg, tx), donate_argnums=(0,))
    writer = MetricWriter(workdir)
    keys = input_keys(model)
    tokens_per_step = int(cfg.train.global_batch_size) * model.spec.num_tokens
    prof = cfg.get("profile", {})
    prof_start, prof_steps = int(prof.get("start_step", -1)), int(prof.get("num_steps", 0))
    log_every, ckpt_every = int(cfg.train.log_every), int(cfg.train.checkpoint_every)
    sample_every = int(cfg.train.get("sample_every", 0))
    bar = _progress(progress, start, total)
    last = {}
    t_last, n_last = time.perf_counter(), start
    end = total if stop_after is None else min(total, start + stop_after)
    for step in range(start, end):
        if step == prof_start and prof_steps > 0:
            jax.profiler.start_trace(os.path.join(workdir, "profile"))
        batch = to_device_batch(next(data_iter), keys)
        state, metrics = step_fn(state, batch)
        done = step + 1
        if prof_steps > 0 and done == prof_start + prof_steps:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
        if done % log_every == 0 or done == end:
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            rate = (done - n_last) / max(now - t_last, 1e-9)
            t_last, n_last = now, done
            last = {k: float(v) for k, v in metrics.items()}
            last.update({"lr": float(_lr(cfg, done)), "steps_per_sec": rate, "tokens_per_sec": rate * tokens_per_step})
            writer.scalars(done, last)
            if bar is not None:
                bar.set_postfix(loss=f"{last['loss']:.4f}")
        if done % ckpt_every == 0 or done == total:
            checkpoint.save(manager, done, state, data_iter)
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

    return learning_rate_schedule(cfg.train)(step)


def _progress(enabled: bool, start: int, total: int):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
