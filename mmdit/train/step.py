"""The training step: multitask masks -> condition dropout -> per-token σ -> flow loss -> AdamW + EMA.

``batch`` (per step, global) holds ``<stream>_latents`` ``[B, *latent_shape]`` for every stream and
the raw conditions the model needs (``text_tokens`` or ``text`` features, ``ref_audio``...). Pure
function of (state, batch): the step's randomness is ``fold_in(state.rng, state.step)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmdit import flow, tasks
from mmdit.train.state import TrainState, ema_update

LATENT_SUFFIX = "_latents"


def split_batch(model, batch):
    """(latents per stream, raw conditions) from a record batch."""
    latents = {a.name: batch[a.name + LATENT_SUFFIX] for a in model.spec.streams}
    raw = {k: v for k, v in batch.items() if not k.endswith(LATENT_SUFFIX)}
    return latents, raw


def loss_fn(params, model, cfg, batch, rng):
    spec = model.spec
    latents, raw = split_batch(model, batch)
    tokens = model.tokens({k: v.astype(jnp.float32) for k, v in latents.items()})
    B = next(iter(tokens.values())).shape[0]
    k_task, k_drop, k_sigma, k_noise = jax.random.split(rng, 4)
    tm = tasks.sample_tasks(k_task, spec, B, dict(cfg.tasks), cfg.model)
    keep = flow.drop_conditions(k_drop, B, dict(cfg.flow.get("condition_dropout", {})), present=tm.present)
    gen = {n: tm.known[n] for n in spec.generated}
    sigma = flow.sample_token_sigmas(
        k_sigma, gen, independent_streams=float(cfg.flow.independent_streams), dist=cfg.flow.sigma_dist,
        mean=float(cfg.flow.sigma_mean), std=float(cfg.flow.sigma_std), shift=float(cfg.flow.shift),
    )
    x_sigma, _, target = flow.noisy_inputs(k_noise, {n: tokens[n] for n in spec.generated}, sigma)
    inputs = {**tokens, **x_sigma}
    pred = model.velocity(params, inputs, sigma, raw, cond_keep=keep, known=tm.known, valid=tm.valid)
    weights = dict(cfg.flow.get("stream_weights", {}))
    loss, metrics = flow.flow_loss(pred, target, gen, stream_weights=weights, valid={n: tm.valid[n] for n in spec.generated})
    task_names = list(cfg.tasks)
    for i, name in enumerate(task_names):  # per-task loss (diagnostic, not differentiated)
        w = (tm.task == i).astype(jnp.float32)
        per_task, _ = flow.flow_loss(jax.lax.stop_gradient(pred), target, gen, stream_weights=weights, valid={n: tm.valid[n] for n in spec.generated}, sample_weights=w)
        metrics[f"loss_task/{name}"] = per_task * B / jnp.maximum(w.sum(), 1.0)
        metrics[f"task_fraction/{name}"] = w.mean()
    return loss, metrics


def apply_gradients(state: TrainState, grads, metrics: dict, tx, ema_decay: float):
    """One AdamW update + EMA (with warmup) from ``grads``; shared by the plain and the
    gradient-accumulating step (``mmdit.train.sharding``)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # EMA warmup: with a fixed 0.999 a 1k-step run would still be ~37% random init.
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = ema_update(state.ema, params, decay)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics


def make_train_step(model, cfg, tx):
    """Returns ``step(state, batch) -> (state, metrics)`` (not jitted: the caller jits with shardings)."""
    ema_decay = float(cfg.train.get("ema_decay", 0.999))

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, model, cfg, batch, rng)
        return apply_gradients(state, grads, dict(metrics, loss=loss), tx, ema_decay)

    return step
