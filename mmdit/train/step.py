"""The training step: multitask masks -> condition dropout -> per-token σ -> flow loss -> AdamW + EMA.

``batch`` (per step, global) holds ``<stream>_latents`` ``[B, *latent_shape]`` for every stream and
the raw conditions the model needs (``model.input_spec()``: ``text_tokens`` or ``text`` features, ``ref_audio``...). Pure
function of (state, batch): the step's randomness is ``fold_in(state.rng, state.step)``. A derived condition
(``first_frame``) is no batch key: the model computes it from the tokens it is given (in ti2av the first
frame's, known and so clean), and the task's ``present`` flags keep it only where the task gives that frame.

The flow loss weighs a grid stream's key frame by ``flow.first_frame_weight``; ``flow.temporal_difference_weight``
adds the error of frame-to-frame changes (:func:`mmdit.flow.temporal_difference_loss`, logged as ``loss/<s>_tdiff``).

**Causal chunks** (``model.chunk_frames``, :mod:`mmdit.model.chunks`): σ is drawn per
``flow.chunk_noise`` (:func:`mmdit.flow.chunk_token_sigmas`): one per sample (``shared``), one per
(sample, chunk) (``independent``), or teacher forcing (``clean_context``: the chunks before a random
target chunk clean and known, the later ones invalid, only the target chunk scored).

**Frozen params** (``train.freeze`` / ``train.trainable``, :mod:`mmdit.util.param_groups`): the loss
stops gradients at them (:func:`make_grad_fn`: no weight-gradient matmuls; measured 16.8% fewer
step FLOPs freezing the demo's video stream), they are carried over unchanged (bit-identical) and
their EMA is not updated; with ``grad_accum`` they get no accumulator.

:func:`make_step` picks the plain step (:func:`make_train_step`) or the gradient-accumulating one
(:func:`make_accumulating_train_step`); neither is jitted here: ``mmdit/train/sharding.py`` jits it
with the state / batch shardings and passes the params' shardings and the batch mesh axes in.

**Gradient accumulation** (``train.grad_accum = k > 1``): the step splits the global batch ``[B]``
into ``k`` microbatches ``[B/k]`` *strided* (row ``i`` goes to microbatch ``i mod k``), so every
device keeps its own rows and no microbatch is resharded; a ``lax.scan`` sums the gradients
(constrained to the params' shardings: FSDP reduce-scatters per microbatch) and one AdamW update
follows. Microbatch ``j`` draws its noise from ``fold_in(step_key, j)``; loss and metrics are the
microbatch means. Peak activation memory is that of a ``B/k`` batch; nothing persists between
steps (unlike ``optax.MultiSteps``, which keeps an fp32 gradient copy in the state and updates EMA
and the step counter per microbatch).
"""

from __future__ import annotations

import jax
import numpy as np
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from mmdit import config_spec, flow, tasks
from mmdit.model import chunks
from mmdit.train.state import TrainState, ema_update
from mmdit.util import param_groups


def split_batch(model, batch):
    """(latents per stream, raw conditions) from a record batch (``model.input_spec()``'s fields)."""
    schema = model.input_spec()
    latents = schema.latents_of(batch)
    missing = [f.name for f in schema.latent_fields if f.source not in latents]
    if missing:
        raise KeyError(f"train batch lacks {missing}; it holds {sorted(batch)}")
    return latents, schema.conditions_of(batch)


def make_loss_fn(model, cfg):
    """``loss_fn(params, batch, rng) -> (loss, metrics)`` of ``model`` under ``cfg``'s flow and task
    sections (validated here, once, not in the traced step)."""
    spec = model.spec
    fl, task_weights, model_cfg = config_spec.flow_spec(cfg, spec), config_spec.task_weights(cfg), cfg.model

    def loss_fn(params, batch, rng):
        return _loss(params, model, fl, task_weights, model_cfg, batch, rng)

    return loss_fn


def grid_frame_tokens(spec) -> dict[str, int]:
    """``{generated grid stream: tokens per temporal position}``: the streams that have frames (and a key frame)."""
    return {n: spec.stream(n).geometry.tokens_per_frame for n in spec.generated if spec.stream(n).geometry.kind == "grid"}


def first_frame_weights(spec, weight: float) -> dict | None:
    """``flow.first_frame_weight`` as ``flow_loss``'s ``token_weights``: ``{grid stream: float32[S]}``, ``weight``
    on the stream's first temporal token position (``tokens_per_frame`` tokens), 1 elsewhere; None when 1."""
    if weight == 1.0:
        return None
    out = {}
    for n, per_frame in grid_frame_tokens(spec).items():
        out[n] = np.where(np.arange(spec.stream(n).geometry.num_tokens) < per_frame, weight, 1.0).astype(np.float32)
    return out or None


def _loss(params, model, fl, task_weights, model_cfg, batch, rng):
    """The multitask flow-matching loss of one batch (module docstring) and its metrics."""
    spec = model.spec
    latents, raw = split_batch(model, batch)
    tokens = model.tokens({k: v.astype(jnp.float32) for k, v in latents.items()})
    B = next(iter(tokens.values())).shape[0]
    k_task, k_drop, k_sigma, k_noise = jax.random.split(rng, 4)
    tm = tasks.sample_tasks(k_task, spec, B, task_weights, model_cfg)
    keep = flow.drop_conditions(k_drop, B, dict(fl.condition_dropout), present=tm.present)
    if fl.silence_dropout > 0:  # silence mode for a fraction of clips (its own key: other draws unchanged)
        field = model.input_spec().by_role("speaking")[0]
        speaking = raw.get(field.name, field.default(B))
        raw = {**raw, field.name: flow.silence_dropout(jax.random.fold_in(k_drop, 1), speaking, fl.silence_dropout)}
    noise = flow.chunk_token_sigmas(
        k_sigma,
        {n: tm.known[n] for n in spec.generated},
        chunks.token_chunks(spec),
        chunks.num_chunks(spec),
        mode=fl.chunk_noise,
        valid=tm.valid,
        independent_streams=fl.independent_streams,
        dist=fl.sigma_dist,
        mean=fl.sigma_mean,
        std=fl.sigma_std,
        shift=fl.shift,
    )
    # clean_context: earlier chunks join the known tokens, later ones become invalid (flow.ChunkNoise).
    sigma, gen, valid = noise.sigma, noise.known, noise.valid
    x_sigma, _, target = flow.noisy_inputs(k_noise, {n: tokens[n] for n in spec.generated}, sigma)
    inputs = {**tokens, **x_sigma}
    pred = model.velocity(params, inputs, sigma, raw, cond_keep=keep, known={**tm.known, **gen}, valid=valid)
    weights = dict(fl.stream_weights)
    token_weights = first_frame_weights(spec, fl.first_frame_weight)
    gen_valid = {n: valid[n] for n in spec.generated}
    loss, metrics = flow.flow_loss(pred, target, gen, stream_weights=weights, valid=gen_valid, token_weights=token_weights)
    if fl.temporal_difference_weight > 0:
        tdiff, tmetrics = flow.temporal_difference_loss(
            pred, target, gen, grid_frame_tokens(spec), valid=gen_valid, stream_weights=weights
        )
        loss = loss + fl.temporal_difference_weight * tdiff
        metrics = {**metrics, **tmetrics}
    task_names = list(task_weights)
    for i, name in enumerate(task_names):  # per-task loss (diagnostic, not differentiated)
        w = (tm.task == i).astype(jnp.float32)
        per_task, _ = flow.flow_loss(
            jax.lax.stop_gradient(pred),
            target,
            gen,
            stream_weights=weights,
            valid=gen_valid,
            sample_weights=w,
            token_weights=token_weights,
        )
        metrics[f"loss_task/{name}"] = per_task * B / jnp.maximum(w.sum(), 1.0)
        metrics[f"task_fraction/{name}"] = w.mean()
    return loss, metrics


def apply_gradients(state: TrainState, grads, metrics: dict, tx, ema_decay: float, frozen=None):
    """One AdamW update + EMA (with warmup) from ``grads``; shared by the plain and the
    gradient-accumulating step. ``frozen`` (:func:`frozen_params`): params kept as they are, their
    EMA too."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if frozen is not None:  # bit-identical (AdamW's decoupled weight decay never touches them)
        params = param_groups.select(frozen, state.params, params)
    # EMA warmup: with a fixed 0.999 a 1k-step run would still be ~37% random init.
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = ema_update(state.ema, params, decay, frozen)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics


def frozen_params(cfg, params):
    """The static frozen mask of ``params`` under ``train.freeze`` / ``train.trainable`` (a tree of
    Python bools), or None when everything trains."""
    groups = config_spec.train_spec(cfg).param_groups
    if groups.trainable == ("*",) and not groups.freeze:
        return None
    return param_groups.frozen_mask(params, groups)


def make_grad_fn(model, cfg):
    """``value_and_grad`` of :func:`make_loss_fn` with gradients stopped at frozen params *inside*
    the loss, so the backward pass skips their weight-gradient matmuls (their gradients come back
    as zeros)."""
    loss_fn = make_loss_fn(model, cfg)

    def loss(params, batch, rng):
        frozen = frozen_params(cfg, params)
        if frozen is not None:
            params = param_groups.select(frozen, jax.tree.map(jax.lax.stop_gradient, params), params)
        return loss_fn(params, batch, rng)

    return jax.value_and_grad(loss, has_aux=True)


def make_train_step(model, cfg, tx):
    """Returns ``step(state, batch) -> (state, metrics)`` (not jitted: the caller jits with shardings)."""
    ema_decay = config_spec.train_spec(cfg).ema_decay
    grad_fn = make_grad_fn(model, cfg)

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        frozen = frozen_params(cfg, state.params)
        (loss, metrics), grads = grad_fn(state.params, batch, rng)
        return apply_gradients(state, grads, dict(metrics, loss=loss), tx, ema_decay, frozen)

    return step


def grad_accum(cfg) -> int:
    """``train.grad_accum``: microbatches per optimizer update (validated by ``config_spec``)."""
    return config_spec.train_spec(cfg).grad_accum


def _split_microbatches(x, k: int, axes):
    """``[B, ...] -> [k, B/k, ...]`` with microbatch ``j`` = rows ``j, j+k, ...`` (device-local)."""
    y = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(y, PartitionSpec(None, axes or None))


def make_accumulating_train_step(model, cfg, tx, k: int, param_shardings, axes):
    """Returns the gradient-accumulating ``step(state, batch) -> (state, metrics)`` over ``k``
    strided microbatches (module docstring; not jitted).

    Args:
      k: microbatches per update (``train.grad_accum``); the global batch ``B`` must divide by ``k``.
      param_shardings: the params' shardings (a pytree like ``state.params``); each microbatch's
        gradients are constrained to them.
      axes: mesh axes the batch dimension is sharded over (``()`` = replicated); each microbatch
        ``[B/k, ...]`` keeps that sharding.
    """
    ema_decay = config_spec.train_spec(cfg).ema_decay
    grad_fn = make_grad_fn(model, cfg)

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        micro = {n: _split_microbatches(x, k, axes) for n, x in batch.items()}
        frozen = frozen_params(cfg, state.params)

        def one(j, mb):
            (loss, metrics), g = grad_fn(state.params, mb, jax.random.fold_in(rng, j))
            g = jax.lax.with_sharding_constraint(g, param_shardings)
            if frozen is not None:  # no accumulator for frozen params (their gradients are zero)
                g = jax.tree.map(lambda f, x: optax.MaskedNode() if f else x, frozen, g)
            return g, dict(metrics, loss=loss)

        def body(carry, xs):
            g, m = one(*xs)
            return jax.tree.map(jnp.add, carry, (g, m)), None

        shapes = jax.eval_shape(one, 0, jax.tree.map(lambda x: x[0], micro))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        (gsum, msum), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
        grads = jax.tree.map(lambda g: g / k, gsum)
        if frozen is not None:
            grads = jax.tree.map(lambda f, p, g: jnp.zeros_like(p) if f else g, frozen, state.params, grads)
        metrics = jax.tree.map(lambda m: m / k, msum)
        return apply_gradients(state, grads, metrics, tx, ema_decay, frozen)

    return step


def make_step(model, cfg, tx, param_shardings, axes):
    """``step(state, batch) -> (state, metrics)``: :func:`make_train_step` when
    ``train.grad_accum == 1``, else :func:`make_accumulating_train_step` (module docstring)."""
    k = grad_accum(cfg)
    if k == 1:
        return make_train_step(model, cfg, tx)
    return make_accumulating_train_step(model, cfg, tx, k, param_shardings, axes)
