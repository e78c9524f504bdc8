"""Train state, optimizer and EMA.

``TrainState`` is a pytree: ``step`` (int32), ``params`` (fp32 master weights, the model computes in
``model.dtype``), ``opt_state`` (optax AdamW), ``ema`` (EMA of params; what samplers and exports
use) and ``rng`` (base key; the key of step ``n`` is ``fold_in(rng, n)``, so a resumed run draws
exactly the same noise as an uninterrupted one).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema: Any
    rng: jax.Array  # raw uint32 key data (``jax.random.key_data``): checkpointable


def learning_rate_schedule(train_cfg) -> optax.Schedule:
    """Linear warmup to ``train.lr`` over ``train.warmup_steps``, then ``train.schedule``
    (``cosine`` to 0 at ``train.steps``, or ``constant``)."""
    lr, warmup, steps = float(train_cfg.lr), int(train_cfg.get("warmup_steps", 0)), int(train_cfg.steps)
    kind = train_cfg.get("schedule", "cosine")
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1), end_value=0.0)
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [max(warmup, 1)])
    raise ValueError(f"train.schedule={kind!r}: choose 'cosine' or 'constant'")


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    """Global-norm clipping + AdamW (decoupled weight decay on matrices only)."""
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(float(train_cfg.get("grad_clip", 1.0))),
        optax.adamw(
            learning_rate_schedule(train_cfg),
            b1=float(train_cfg.get("b1", 0.9)),
            b2=float(train_cfg.get("b2", 0.999)),
            eps=1e-8,
            weight_decay=float(train_cfg.get("weight_decay", 0.0)),
            mask=decay_mask,
        ),
    )
    accum = int(train_cfg.get("grad_accum", 1))
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum)
    return tx


def init_state(model, tx, rng, params=None) -> TrainState:
    k_init, k_train = jax.random.split(rng)
    if params is None:
        params = nn.unbox(model.init(k_init))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema=jax.tree_util.tree_map(jnp.copy, params),
        rng=jax.random.key_data(k_train),
    )


def ema_update(ema, params, decay: float):
    return jax.tree_util.tree_map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema, params)
