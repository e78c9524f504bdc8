"""Train state, optimizer and EMA.

``TrainState`` is a pytree: ``step`` (int32), ``params`` (fp32 master weights, the model computes in
``model.dtype``), ``opt_state`` (optax AdamW), ``ema`` (EMA of params; what samplers and exports
use) and ``rng`` (base key; the key of step ``n`` is ``fold_in(rng, n)``, so a resumed run draws
exactly the same noise as an uninterrupted one).

``step`` counts *optimizer updates*. Gradient accumulation (``train.grad_accum``) is not an optimizer
wrapper: the sharded train step (:mod:`mmdit.train.sharding`) splits each global batch into
microbatches and sums their gradients before one AdamW update, so there is no persistent
accumulator in the state, EMA and LR schedule advance once per update, and one loader batch is one
update.

Shardings come from the *boxed* state: :func:`abstract_state` keeps the params' logical axis names
(``nn.Partitioned``), and optax builds Adam's moments with ``tree_map`` over those boxes, so the
moments (and the EMA) carry their params' names and are sharded exactly like them.
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
    """Global-norm clipping + AdamW (decoupled weight decay on matrices only).

    ``train.grad_accum`` is handled by the train step (microbatches within one update), not here.
    """
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
    accum = train_cfg.get("grad_accum", 1)
    if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
        raise ValueError(f"train.grad_accum={accum!r} must be a positive integer (microbatches per update)")
    return tx


def init_state(model, tx, rng, params=None, *, unbox: bool = True) -> TrainState:
    """A fresh state. ``unbox=False`` keeps the params' ``nn.Partitioned`` boxes (and so boxes the
    Adam moments and EMA too): use it under ``jax.eval_shape`` to derive shardings."""
    k_init, k_train = jax.random.split(rng)
    if params is None:
        params = model.init(k_init)
        params = nn.unbox(params) if unbox else params
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema=jax.tree_util.tree_map(jnp.copy, params),
        rng=jax.random.key_data(k_train),
    )


def ema_update(ema, params, decay: float):
    return jax.tree_util.tree_map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema, params)


def abstract_state(model, tx, *, boxed: bool = True) -> TrainState:
    """``jax.eval_shape`` of :func:`init_state`: ``ShapeDtypeStruct`` leaves, no allocation.

    ``boxed=True`` keeps the logical ``nn.Partitioned`` boxes (``nn.get_partition_spec`` of it gives
    every leaf's logical spec; ``nn.unbox`` of it has the structure of the real state)."""
    return jax.eval_shape(lambda: init_state(model, tx, jax.random.key(0), unbox=not boxed))
