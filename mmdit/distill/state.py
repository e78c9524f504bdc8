"""Distillation state: the trainable student and fake score (critic), their two optimizers, the
student's EMA, and their shardings.

:class:`DistillState` (a pytree, checkpointed whole) holds ``step`` (distillation iterations = critic
updates), ``rng`` (raw key data; iteration ``n`` draws from ``fold_in(rng, n)``, so a resumed run
repeats an uninterrupted one), ``student`` (a :class:`mmdit.train.state.TrainState`: params, AdamW
state, EMA, generator-update count, rng -- exactly what a training checkpoint holds, so the student
is exported as a normal training workdir) and ``critic`` (:class:`CriticState`: params + its own
AdamW state; no EMA). The frozen teacher is *not* in the state: it is restored from its own workdir
at every (re)start and passed to the step as a separate, never-donated argument.

Both trainable sets start as copies of the teacher (one param tree: the student differs from the
teacher only in param-free mask fields, :mod:`mmdit.distill.teacher`). All three param sets are
sharded by the run's logical rules (``cfg.mesh.rules``): shardings come from the *boxed* abstract
state, as in training (:mod:`mmdit.train.sharding`), so optimizer moments and EMA follow their params.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mmdit import parallel
from mmdit.train.state import TrainState, make_optimizer


@flax.struct.dataclass
class CriticState:
    step: jax.Array
    params: Any
    opt_state: Any


@flax.struct.dataclass
class DistillState:
    step: jax.Array
    rng: jax.Array
    student: TrainState
    critic: CriticState


def make_optimizers(train_spec, critic_lr: float | None):
    """``(student tx, critic tx)``: ``config.train``'s AdamW, the critic's at ``distill.critic_lr``."""
    critic = train_spec if critic_lr is None else dataclasses.replace(train_spec, lr=critic_lr)
    return make_optimizer(train_spec), make_optimizer(critic)


def assemble(params, student_tx, critic_tx, rng) -> DistillState:
    """A fresh state whose student and critic are copies of ``params`` (the teacher's; boxed or not)."""
    k_student, k_run = jax.random.split(rng)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (a distinct buffer per counter: the state is donated)
    student_params, critic_params = copy(params), copy(params)
    student = TrainState(
        step=zero(),
        params=student_params,
        opt_state=student_tx.init(student_params),
        ema=copy(params),
        rng=jax.random.key_data(k_student),
    )
    critic = CriticState(step=zero(), params=critic_params, opt_state=critic_tx.init(critic_params))
    return DistillState(step=zero(), rng=jax.random.key_data(k_run), student=student, critic=critic)


def abstract_state(model, student_tx, critic_tx) -> DistillState:
    """``jax.eval_shape`` of :func:`assemble` with the params' ``nn.Partitioned`` boxes kept."""
    return jax.eval_shape(lambda: assemble(model.init(jax.random.key(0)), student_tx, critic_tx, jax.random.key(0)))


def state_shardings(boxed: DistillState, mesh, rules) -> DistillState:
    """``NamedSharding`` per leaf (structure of the unboxed state) from the boxed abstract state."""
    return parallel.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
