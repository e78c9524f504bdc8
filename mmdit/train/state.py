"""Train state, optimizer and EMA.

``TrainState`` is a pytree: ``step`` (int32), ``params`` (fp32 master weights, the model computes in
``model.dtype``), ``opt_state`` (optax AdamW), ``ema`` (EMA of params; what samplers and exports
use) and ``rng`` (base key; the key of step ``n`` is ``fold_in(rng, n)``, so a resumed run draws
exactly the same noise as an uninterrupted one).

``step`` counts *optimizer updates*. Gradient accumulation (``train.grad_accum``) is not an optimizer
wrapper: the train step (:func:`mmdit.train.step.make_step`, jitted by :mod:`mmdit.train.sharding`)
splits each global batch into microbatches and sums their gradients before one AdamW update, so
there is no persistent accumulator in the state, EMA and LR schedule advance once per update, and
one loader batch is one update.

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

from mmdit.config_spec import TrainSpec


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema: Any
    rng: jax.Array  # raw uint32 key data (``jax.random.key_data``): checkpointable


def learning_rate_schedule(train: TrainSpec) -> optax.Schedule:
    """Linear warmup to ``train.lr`` over ``train.warmup_steps``, then ``train.schedule``
    (``cosine`` to 0 at ``train.steps``, or ``constant``)."""
    lr, warmup, steps = train.lr, train.warmup_steps, train.steps
    if train.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1), end_value=0.0)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [max(warmup, 1)])


def make_optimizer(train: TrainSpec) -> optax.GradientTransformation:
    """Global-norm clipping + AdamW (decoupled weight decay on matrices only) from the validated
    ``config.train`` (:func:`mmdit.config_spec.train_spec`).

    ``train.grad_accum`` is handled by the train step (microbatches within one update), not here.
    """
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(train.grad_clip),
        optax.adamw(
            learning_rate_schedule(train), b1=train.b1, b2=train.b2, eps=1e-8, weight_decay=train.weight_decay, mask=decay_mask
        ),
    )


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
