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

**Training groups** (``train.trainable`` / ``train.freeze`` / ``train.lr_groups``, param-path
patterns; rules in :mod:`mmdit.util.param_groups`): with any set, the optimizer is
``chain(zero frozen grads, clip, multi_transform({frozen: set_to_zero, lr_x<m>: AdamW at m·lr}))``.
``set_to_zero`` keeps no state and each AdamW is ``optax.masked`` to its own params, so a frozen
param has **no Adam moments** at all (``optax.MaskedNode`` in their place: no leaves, so nothing to
allocate, shard or checkpoint, and ``mmdit-plan`` counts optimizer memory for trainable params
only). The clip's global norm is over trainable gradients only. The EMA keeps its full structure
(exports and samplers read it), and a frozen param's EMA stays equal to the param (the step skips
its update, so it is bit-identical, not decayed towards itself). The train step stops gradients
at frozen params (``stop_gradient``: their weight-gradient matmuls are not computed). With all
params trainable at 1x the optimizer is the plain ``chain(clip, adamw)`` (checkpoints unchanged).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from mmdit.config_spec import TrainSpec
from mmdit.util import param_groups


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
    if warmup == 0:  # no warmup: the first step already runs at ``lr`` (not at 0)
        if train.schedule == "cosine":
            return optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.0)
        return optax.constant_schedule(lr)
    if train.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=0.0)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


def make_optimizer(train: TrainSpec) -> optax.GradientTransformation:
    """Global-norm clipping + AdamW (decoupled weight decay on matrices only) from the validated
    ``config.train`` (:func:`mmdit.config_spec.train_spec`).

    With ``train.trainable`` / ``train.freeze`` / ``train.lr_groups`` set, frozen params get no
    optimizer state and each group its own learning-rate multiplier (module docstring); the param
    paths are read from the params given to ``init`` / ``update`` (a pattern matching none of them
    raises ``ValueError`` naming the field).

    ``train.grad_accum`` is handled by the train step (microbatches within one update), not here.
    """
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    schedule = learning_rate_schedule(train)

    def adamw(multiplier: float) -> optax.GradientTransformation:
        lr = schedule if multiplier == 1.0 else (lambda count: multiplier * schedule(count))
        return optax.adamw(lr, b1=train.b1, b2=train.b2, eps=1e-8, weight_decay=train.weight_decay, mask=decay_mask)

    groups = train.param_groups
    if groups.is_default:
        return optax.chain(optax.clip_by_global_norm(train.grad_clip), adamw(1.0))
    transforms = {param_groups.FROZEN: optax.set_to_zero()}
    transforms.update({param_groups.lr_label(m): adamw(m) for m in groups.multipliers})
    return optax.chain(
        optax.masked(optax.set_to_zero(), lambda params: param_groups.frozen_mask(params, groups)),
        optax.clip_by_global_norm(train.grad_clip),
        optax.multi_transform(transforms, lambda params: param_groups.tree_labels(params, groups)),
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


def ema_update(ema, params, decay: float, frozen=None):
    """``ema·decay + (1-decay)·params`` leafwise; leaves where ``frozen`` (a tree of static bools like
    ``params``, :func:`mmdit.util.param_groups.frozen_mask`) is True are kept as they are."""
    new = jax.tree_util.tree_map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema, params)
    return new if frozen is None else param_groups.select(frozen, ema, new)


def abstract_state(model, tx, *, boxed: bool = True) -> TrainState:
    """``jax.eval_shape`` of :func:`init_state`: ``ShapeDtypeStruct`` leaves, no allocation.

    ``boxed=True`` keeps the logical ``nn.Partitioned`` boxes (``nn.get_partition_spec`` of it gives
    every leaf's logical spec; ``nn.unbox`` of it has the structure of the real state)."""
    return jax.eval_shape(lambda: init_state(model, tx, jax.random.key(0), unbox=not boxed))
