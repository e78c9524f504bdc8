"""One distillation iteration: (every ``distill.critic_steps``-th iteration) a generator update of the
student, then a critic update of the fake score.

Per iteration (``batch``: a training batch of the student's records; its latents are the ground
truth of teacher-forced rollouts and the given modality of A2V, its conditions drive all models):

1. a task per sample from ``distill.tasks`` (``t2av``: both streams generated; ``a2v``: audio given);
2. **generator** (iterations ``n`` with ``n % critic_steps == 0``): the student's chunked few-step
   rollout ``x`` (random exit step; on the streaming KV cache in the geometry ``mmdit stream`` serves
   the student with, :mod:`mmdit.distill.cached_rollout`, or full-sequence passes for a student that
   cannot stream, :mod:`mmdit.distill.rollout`), re-noised at one σ per sample
   drawn uniformly in ``[dmd_sigma_min, dmd_sigma_max]`` and shifted by ``flow.shift``; the teacher
   (guided with ``distill.guidance`` inside ``distill.guidance_interval``, :class:`mmdit.sample.sampler.Sampler`'s
   one-call CFG) and the
   critic (conditional) predict its clean version; the DMD loss (:mod:`mmdit.distill.losses`) plus,
   with ``regression_weight > 0``, the regression loss of the student's teacher-forced predictions
   from the teacher's ODE state at a random σ of the step list (:mod:`mmdit.distill.ode_pairs`);
   AdamW on the student (``config.train``) and its EMA (:func:`mmdit.train.step.apply_gradients`);
3. **critic**: a fresh rollout of the (updated) student, gradient stopped, noised at a training σ
   (``config.flow``), and the critic's flow-matching loss; AdamW at ``distill.critic_lr``.

The teacher's params are an argument, read only: the step never returns them, so they stay
bit-identical. :func:`make_step` builds the pure function; the loop jits one per kind of iteration.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from mmdit import config_spec, flow, tasks
from mmdit.distill import losses, ode_pairs
from mmdit.distill.cached_rollout import IMPLS, CachedRollout, serving_impl
from mmdit.distill.rollout import predict_chunks, renoise, student_rollout
from mmdit.config_spec import is_full_interval
from mmdit.sample.guidance import guidance_scale
from mmdit.sample.sampler import Sampler
from mmdit.train.step import apply_gradients, first_frame_weights, split_batch


def guided_teacher(teacher_model, teacher_cfg, guidance, interval=None):
    """``velocity(params, tokens, sigma, raw, masks) -> v``: the teacher's guided velocity (one
    batched call over every CFG pattern).

    ``interval = (lo, hi)`` (None: the teacher config's ``sample.guidance_interval``): a sample's stream is
    guided only where its σ -- the largest of its tokens' σ's, i.e. the σ it is being denoised at (known
    tokens are at 0) -- lies in ``(lo, hi]``, and gets the conditional velocity elsewhere: the velocity field
    of the teacher's own sampler (:func:`mmdit.sample.guidance.guidance_scale`), per sample, since the DMD
    real score is queried at one σ per sample."""
    sampler = Sampler(teacher_model, teacher_cfg)
    g = sampler.resolve_guidance(guidance, interval=interval)
    gated = bool(g.scales) and not is_full_interval(g.interval)

    def velocity(params, tokens, sigma, raw, masks):
        scales = None
        if gated:  # per-sample scales [B, 1, 1], broadcast against the [B, S, C] velocities
            at = {n: jnp.max(s, axis=1)[:, None, None] for n, s in sigma.items()}
            scales = guidance_scale(g.scale_arrays(), 0.0, sigma=at, interval=g.interval)
        return sampler.guided_velocity(params, tokens, sigma, raw, masks, g, scales)

    return velocity


def make_step(
    student_model, teacher_model, cfg, teacher_cfg, dspec, student_tx, critic_tx, *, generator: bool, rollout_impl=None
):
    """``step(state, teacher_params, batch) -> (state, metrics)`` (not jitted; module docstring).

    ``rollout_impl``: ``cache`` (the student's rollouts and teacher-forced predictions chunk by chunk
    on the streaming KV cache, :mod:`mmdit.distill.cached_rollout`), ``full`` (full-sequence
    passes, :mod:`mmdit.distill.rollout`) or None: ``cache`` for a student that can stream, else
    ``full`` (:func:`~mmdit.distill.cached_rollout.serving_impl`).

    ``generator=True``: the generator update alone (``state.step`` unchanged); ``False``: the critic
    update, which ends the iteration (``state.step + 1``). A generator iteration runs both on the
    same batch, generator first; both draw from the iteration's key. Two separate functions, so
    the loop compiles each once (the critic one is not duplicated inside the generator one)."""
    spec = student_model.spec
    fl = config_spec.flow_spec(cfg, spec)
    ema_decay = config_spec.train_spec(cfg).ema_decay
    stream_weights = dict(fl.stream_weights)
    # the key frame weighs in every loss as in the teacher's training (flow.first_frame_weight; None when 1)
    token_weights = first_frame_weights(spec, fl.first_frame_weight)
    step_list = tuple(dspec.denoising_step_list)
    K = len(step_list)
    teacher_velocity = guided_teacher(teacher_model, teacher_cfg, dspec.guidance, dspec.guidance_interval)
    teacher_forced = dspec.rollout == "teacher_forced"
    impl = rollout_impl or serving_impl(student_model)
    if impl not in IMPLS:
        raise ValueError(f"rollout_impl={impl!r}: use one of {', '.join(IMPLS)}")
    if impl == "cache":
        cached = CachedRollout(student_model, cfg)
        sample_chunks, predict = cached.sample, cached.predict
    else:
        sample_chunks = functools.partial(student_rollout, student_model)
        predict = functools.partial(predict_chunks, student_model)
    task_weights = dict(dspec.tasks)
    task_names = list(task_weights)  # tasks.sample_tasks' order: TaskMasks.task indexes it
    from_records = dspec.regression_pairs == "records"
    if dspec.regression_weight > 0 and not from_records:
        ode_sigmas, ode_positions = ode_pairs.merged_schedule(
            dspec.ode_steps or int(teacher_cfg.sample.steps),
            dspec.ode_shift if dspec.ode_shift is not None else float(teacher_cfg.sample.shift),
            step_list,
        )

    def step(state, teacher_params, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_task, k_gen, k_critic = jax.random.split(rng, 3)
        latents, raw = split_batch(student_model, batch)
        clean = student_model.tokens({k: v.astype(jnp.float32) for k, v in latents.items()})
        B = next(iter(clean.values())).shape[0]
        tm = tasks.sample_tasks(k_task, spec, B, task_weights, cfg.model)
        raw = student_model.input_spec().canonical_conditions(raw, B)
        keep = {c: jnp.asarray(tm.present.get(c, jnp.ones((B,), bool)), bool) for c in spec.keep_names}
        gen_known = {n: tm.known[n] for n in spec.generated}
        gen_valid = {n: tm.valid[n] for n in spec.generated}

        def rollout(params, key):
            k_exit, k_roll = jax.random.split(key)
            exit_step = jax.random.randint(k_exit, (), 0, K)
            return sample_chunks(
                params, k_roll, clean, tm, raw, keep, step_list, exit_step=exit_step, teacher_forced=teacher_forced
            )

        metrics = {}
        student = state.student
        if generator:
            k_roll, k_sigma, k_noise, k_ode, k_pick = jax.random.split(k_gen, 5)

            def generator_loss(params):
                if not dspec.trains_critic:  # dmd_weight == 0 (the ODE warm-up): no rollout, teacher or critic pass
                    l_reg = regression(params, k_ode, k_pick)
                    return dspec.regression_weight * l_reg, {"gen/regression_loss": l_reg}
                x = rollout(params, k_roll)
                u = jax.random.uniform(k_sigma, (B,), minval=dspec.dmd_sigma_min, maxval=dspec.dmd_sigma_max)
                x_t, sig, _ = renoise(k_noise, jax.lax.stop_gradient(x), tm, flow.shift_sigma(u, fl.shift))
                tokens = {**clean, **x_t}
                v_real = teacher_velocity(teacher_params, tokens, sig, raw, tm)
                v_fake = teacher_model.velocity(
                    state.critic.params, tokens, sig, raw, cond_keep=keep, known=tm.known, valid=tm.valid
                )
                x0_real = losses.clean_prediction(x_t, v_real, sig)
                x0_fake = losses.clean_prediction(x_t, v_fake, sig)
                l_dmd, m = losses.dmd_generator_loss(x, x0_real, x0_fake, gen_known, gen_valid, stream_weights, token_weights)
                total = dspec.dmd_weight * l_dmd
                m = {**m, "gen/dmd_loss": l_dmd}
                if dspec.regression_weight > 0:
                    l_reg = regression(params, k_ode, k_pick)
                    total = total + dspec.regression_weight * l_reg
                    m["gen/regression_loss"] = l_reg
                return total, m

            def regression(params, k_ode, k_pick):
                noise = {
                    n: jax.random.normal(jax.random.fold_in(k_ode, i), clean[n].shape)
                    for i, n in enumerate(sorted(spec.generated))
                }

                def velocity(x, sigma):
                    return teacher_velocity(teacher_params, {**clean, **x}, sigma, raw, tm)

                if from_records:  # each sample's pair for its drawn task (mmdit distill prepare)
                    states, endpoint = ode_pairs.pairs_of_batch(
                        spec, batch, clean, tm.task, task_names, K, cfg.model, dspec.drawn_tasks
                    )
                else:
                    states, endpoint = ode_pairs.ode_pair(velocity, noise, clean, gen_known, ode_sigmas, ode_positions)
                endpoint = jax.lax.stop_gradient(endpoint)
                k = jax.random.randint(k_pick, (), 0, K)
                x_k = {n: jnp.stack([s[n] for s in states])[k] for n in spec.generated}
                sigma_k = jnp.asarray(step_list, jnp.float32)[k]
                context = {**clean, **endpoint}
                pred = predict(params, jax.lax.stop_gradient(x_k), context, sigma_k, tm, raw, keep)
                loss, _ = losses.regression_loss(pred, endpoint, gen_known, gen_valid, stream_weights, token_weights)
                return loss

            (g_loss, g_metrics), grads = jax.value_and_grad(generator_loss, has_aux=True)(student.params)
            student, g_metrics = apply_gradients(student, grads, g_metrics, student_tx, ema_decay)
            metrics.update({k: v for k, v in g_metrics.items() if k != "param_norm"})
            metrics["gen/loss"] = g_loss
            metrics["gen/grad_norm"] = metrics.pop("grad_norm")
            return state.replace(student=student), metrics

        k_roll, k_sigma, k_noise = jax.random.split(k_critic, 3)
        x = jax.lax.stop_gradient(rollout(student.params, k_roll))
        sigma = flow.sample_sigma(k_sigma, (B,), dist=fl.sigma_dist, mean=fl.sigma_mean, std=fl.sigma_std, shift=fl.shift)
        x_t, sig, noise = renoise(k_noise, x, tm, sigma)

        def critic_loss(params):
            v = teacher_model.velocity(params, {**clean, **x_t}, sig, raw, cond_keep=keep, known=tm.known, valid=tm.valid)
            return losses.fake_score_loss(v, x, noise, gen_known, gen_valid, stream_weights, token_weights)

        (c_loss, _), c_grads = jax.value_and_grad(critic_loss, has_aux=True)(state.critic.params)
        updates, opt_state = critic_tx.update(c_grads, state.critic.opt_state, state.critic.params)
        critic = state.critic.replace(
            step=state.critic.step + 1, params=optax.apply_updates(state.critic.params, updates), opt_state=opt_state
        )
        metrics["critic/loss"] = c_loss
        metrics["critic/grad_norm"] = optax.global_norm(c_grads)
        return state.replace(step=state.step + 1, critic=critic), metrics

    return step
