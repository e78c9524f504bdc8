"""The student's chunk-by-chunk rollout on the streaming KV cache (what ``mmdit stream`` runs).

:mod:`mmdit.distill.rollout` generates chunk ``c`` with a forward of the *whole* clip (earlier chunks
re-run as clean context, later ones invalid): ``chunks × steps`` full-sequence passes. Here the
student runs as :class:`mmdit.sample.streaming.StreamingSampler` runs it: the one-chunk model
(:func:`~mmdit.sample.streaming.chunk_model`) attends a KV cache of the sink chunk and the previous
chunk (:func:`~mmdit.sample.stream_cache.cache_context` / :func:`~mmdit.sample.stream_cache.write_cache`),
in the cache geometry the student config serves with: ``sample.stream_cache`` and
``sample.stream_positions`` (:func:`~mmdit.sample.streaming.stream_geometry`). With ``bounded``
positions (the default) every chunk from 2 on sees the window chunk 2 sees, exactly as at sample
time; with ``absolute`` positions and a ``clean`` cache the rollout equals the full-sequence one
(tests/test_distill.py).

Per chunk ``c`` (a ``fori_loop`` over chunks carrying the output and the cache):

1. the steps before the exit step run without gradient (a ``fori_loop`` of traced length: no
   forward past the exit step), each predicting ``x0 = x − σ_k·v`` and re-noising it with fresh
   noise to σ_{k+1} (:func:`mmdit.sample.ode.renoised` with :func:`mmdit.sample.ode.chunk_noise`: the
   rule and numbers of :class:`~mmdit.sample.streaming.StreamingSampler` with ``sample.solver="renoise"``);
2. the exit step runs with gradient on its (gradient-stopped) input and the cached context; its
   ``x0`` is the chunk's output (known tokens, e.g. A2V's audio, keep their given values);
3. the cache is written, without gradient (Self-Forcing): ``clean`` mode: the keys/values of one more
   forward of the finished chunk at σ = 0; ``per_step`` mode: the keys/values each step computed
   (chunk ``c + 1`` at step ``i`` reads chunk ``c`` at step ``i``; the exit step is shared by all
   chunks, so the steps a chunk reads exist). ``teacher_forced`` (CausVid) writes the clean
   forward of the *ground-truth* chunk instead, in either mode.

``context_gradient=True`` lets the gradient also flow through the cached context (its clean
forwards), which makes the gradient equal the full-sequence rollout's (the test oracle); training
uses the default ``False``.

Conditions are encoded once per rollout; the cross-attention keys/values are recomputed per forward
(they carry the exit step's gradient). Derived conditions (``model.conditions.<c>.derived``) are computed
once from chunk 0's given tokens, as :meth:`~mmdit.sample.streaming.StreamingSampler.start` does
(:meth:`CachedRollout.conditions`). Tasks must keep every token valid (``distill.tasks``: t2av, a2v).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmdit.distill.losses import clean_prediction
from mmdit.model.derived_conditions import derived_conditions
from mmdit.sample import streaming
from mmdit.sample.ode import chunk_noise, renoised


IMPLS = ("cache", "full")


def serving_impl(model) -> str:
    """The rollout that matches how the student is served: ``cache`` when it can stream
    (:func:`mmdit.sample.streaming.chunk_layout` accepts it: ``mmdit stream`` runs it chunk by
    chunk), else ``full`` (the full-sequence rollout, :mod:`mmdit.distill.rollout`: a student
    without causal chunks is sampled whole)."""
    try:
        streaming.chunk_layout(model.spec)
    except ValueError:
        return "full"
    return "cache"


def _stop(tree):
    return jax.tree.map(jax.lax.stop_gradient, tree)


class CachedRollout:
    """The cached rollouts of one student (module docstring).

    Args:
      model: the student ``DiffusionModel`` over the whole clip (``model.chunk_frames`` set,
        ``chunk_causal`` in ``model.mask``: what ``mmdit stream`` needs; else a ValueError naming them).
      cfg: the student's experiment config (``sample.stream_cache`` / ``sample.stream_positions``).
      cache_mode, positions: overrides of those two fields (tests).
    """

    def __init__(self, model, cfg, *, cache_mode: str | None = None, positions: str | None = None):
        self.full_model = model
        self.layout = streaming.chunk_layout(model.spec)
        self.model = streaming.chunk_model(model, self.layout)
        self.spec = self.model.spec
        self.cache_mode, self.positions = streaming.stream_geometry(cfg, cache_mode, positions)
        self.generated = sorted(self.spec.generated)
        self.num_chunks = self.layout.clip_chunks

    # -- pieces ----------------------------------------------------------------------------------

    def _slice(self, tree, c):
        """Chunk ``c`` of ``{s: [B, S_s, ...]}``: ``{s: [B, T_s, ...]}`` (a chunk's tokens are contiguous)."""
        T = self.layout.tokens
        return {n: jax.lax.dynamic_slice_in_dim(tree[n], c * T[n], T[n], 1) for n in self.generated}

    def _empty_cache(self, rows: int, steps: int, mode: str) -> dict:
        shapes = streaming.cache_shapes(self.spec, self.layout, rows, steps, mode)
        dt = self.spec.dtype
        return {
            "k": {n: jnp.zeros(s, dt) for n, s in shapes["k"].items()},
            "v": {n: jnp.zeros(s, dt) for n, s in shapes["v"].items()},
            "known": {n: jnp.zeros(s, bool) for n, s in shapes["known"].items()},
            "cross": None,
        }

    def _forward(self, dit_params, x, sig, known, valid, conds, keep, cache, c, offsets, step, mode):
        """One one-chunk forward over the cache: ``(x0 {s: float32 [B, T_s, C]}, kv {"k"|"v": {s:
        [L, B, T_s, H, Dh]}})``."""
        conds, cmasks = conds
        kvc = streaming.cache_context(self.spec, self.layout, cache, c, offsets, step, mode)
        v, kv = self.model.dit.apply(
            dit_params,
            x,
            sig,
            conds,
            cmasks,
            keep,
            known,
            valid,
            kv_context=kvc,
            chunk_index=c,
            time_offset=offsets[0],
            return_kv=True,
        )
        return clean_prediction(x, v, sig), {"k": kv["k"], "v": kv["v"]}

    def conditions(self, params, raw, given) -> tuple[dict, dict]:
        """``(features {c: [B, L_c, D_c]}, masks {c: [B, L_c]})`` of every condition for the one-chunk model:
        ``raw`` encoded by the full model, plus the derived conditions computed from chunk 0 of ``given``
        ``{generated s: float32 [B, S_s, C]}`` (the given tokens' values, 0 elsewhere), which every chunk
        reuses, as :meth:`mmdit.sample.streaming.StreamingSampler.start` computes them. The distill tasks
        (t2av, a2v) give no first frame, so a ``first_frame`` condition is zeros here, and the task marks
        it absent (``cond_keep`` False: dropped) in every pass, as in training."""
        conds, cmasks = self.full_model.encode_conditions(params, raw)
        return {**conds, **derived_conditions(self.spec, self._slice(given, 0))}, cmasks

    def _offsets(self, c):
        return streaming.window_offsets(c, self.layout.chunk_frames, self.positions)

    def _clean_kv(self, dit_params, tokens, valid, conds, keep, cache, c, offsets):
        """Keys/values of the finished chunk ``tokens`` at σ = 0 (all known) and their known flags."""
        known = {n: jnp.ones(valid[n].shape, bool) for n in self.generated}
        zero = {n: jnp.zeros(valid[n].shape, jnp.float32) for n in self.generated}
        _, kv = self._forward(dit_params, tokens, zero, known, valid, conds, keep, cache, c, offsets, 0, "clean")
        return kv, known

    # -- rollouts --------------------------------------------------------------------------------

    def sample(
        self,
        params,
        rng,
        clean,
        masks,
        raw,
        cond_keep,
        step_list,
        *,
        exit_step,
        teacher_forced: bool,
        context_gradient: bool = False,
    ) -> dict:
        """The student's sample ``{generated s: float32 [B, S, C]}``; arguments and result as
        :func:`mmdit.distill.rollout.student_rollout` (same noise for the same ``rng``)."""
        gen, K = self.generated, len(step_list)
        mode = "clean" if teacher_forced else self.cache_mode  # teacher forcing: every step reads the clean truth
        sigmas = jnp.asarray(tuple(step_list) + (0.0,), jnp.float32)
        B = clean[gen[0]].shape[0]
        out = {n: jnp.where(masks.known[n][..., None], clean[n].astype(jnp.float32), 0.0) for n in gen}
        conds = self.conditions(params, raw, out)  # once; the exit steps' gradient reaches the encoder
        dit = params["dit"]
        quiet, quiet_conds = _stop(dit), _stop(conds)
        ctx_dit, ctx_conds = (dit, conds) if context_gradient else (quiet, quiet_conds)
        maybe_stop = (lambda t: t) if context_gradient else _stop  # noqa: E731
        cache = self._empty_cache(B, K, mode)
        if mode == "per_step":
            L, H, Dh = self.spec.num_layers, self.spec.heads, self.spec.head_dim
            fresh0 = {f: {n: jnp.zeros((K, L, B, self.layout.tokens[n], H, Dh), self.spec.dtype) for n in gen} for f in "kv"}
        else:
            fresh0 = None

        def one_chunk(c, carry):
            out, cache = carry
            offsets = self._offsets(c)
            known, valid = self._slice(masks.known, c), self._slice(masks.valid, c)
            held = {n: v.astype(jnp.float32) for n, v in self._slice(clean, c).items()}
            hold = lambda x: {n: jnp.where(known[n][..., None], held[n], x[n]) for n in gen}  # noqa: E731
            at = lambda s: {n: jnp.where(known[n], 0.0, s) for n in gen}  # noqa: E731

            def denoise(dit_params, conds, x, i, fresh):
                x0, kv = self._forward(dit_params, x, at(sigmas[i]), known, valid, conds, cond_keep, cache, c, offsets, i, mode)
                if mode == "per_step":
                    kv = maybe_stop(kv)
                    fresh = {f: {n: fresh[f][n].at[i].set(kv[f][n].astype(fresh[f][n].dtype)) for n in gen} for f in "kv"}
                return hold(x0), fresh

            def before_exit(i, carry):
                x, fresh = carry
                x0, fresh = denoise(quiet, quiet_conds, x, i, fresh)
                nxt = sigmas[i + 1]
                return hold({n: renoised(x0[n], nxt, self._noise(rng, c, 1 + i, x0, n)) for n in gen}), fresh

            x = hold({n: self._noise(rng, c, 0, held, n) for n in gen})
            x, fresh = jax.lax.fori_loop(0, exit_step, before_exit, (x, fresh0))
            x0, fresh = denoise(dit, conds, _stop(x), exit_step, fresh)
            if mode == "clean":
                context_tokens = self._slice(clean, c) if teacher_forced else _stop(x0)
                kv, new_known = self._clean_kv(ctx_dit, context_tokens, valid, ctx_conds, cond_keep, cache, c, offsets)
                kv = maybe_stop(kv)
            else:
                kv, new_known = fresh, known
            cache = streaming.write_cache(self.spec, self.layout, cache, c, kv, new_known)
            T = self.layout.tokens
            out = {n: jax.lax.dynamic_update_slice_in_dim(out[n], x0[n], c * T[n], 1) for n in gen}
            return out, cache

        out, _ = jax.lax.fori_loop(0, self.num_chunks, one_chunk, (out, cache))
        return out

    def _noise(self, rng, c, draw, like, n):
        return chunk_noise(rng, c, draw, self.generated.index(n), like[n].shape)

    def predict(self, params, x_noisy, context, sigma, masks, raw, cond_keep) -> dict:
        """Clean predictions of every chunk from ``x_noisy`` at one σ, chunk ``c`` reading the clean
        ``context`` of the earlier chunks from the cache (teacher forcing; the regression loss); as
        :func:`mmdit.distill.rollout.predict_chunks` (``{generated s: float32 [B, S, C]}``)."""
        gen = self.generated
        B = x_noisy[gen[0]].shape[0]
        given = {n: jnp.where(masks.known[n][..., None], context[n].astype(jnp.float32), 0.0) for n in gen}
        conds = self.conditions(params, raw, given)
        quiet, quiet_conds = _stop(params["dit"]), _stop(conds)
        out = {n: context[n].astype(jnp.float32) for n in gen}

        def one_chunk(c, carry):
            out, cache = carry
            offsets = self._offsets(c)
            known, valid = self._slice(masks.known, c), self._slice(masks.valid, c)
            ctx = {n: v.astype(jnp.float32) for n, v in self._slice(context, c).items()}
            x = {n: jnp.where(known[n][..., None], ctx[n], v) for n, v in self._slice(x_noisy, c).items()}
            sig = {n: jnp.where(known[n], 0.0, jnp.asarray(sigma, jnp.float32)) for n in gen}
            x0, _ = self._forward(params["dit"], x, sig, known, valid, conds, cond_keep, cache, c, offsets, 0, "clean")
            x0 = {n: jnp.where(known[n][..., None], ctx[n], x0[n]) for n in gen}
            kv, new_known = self._clean_kv(quiet, ctx, valid, quiet_conds, cond_keep, cache, c, offsets)
            cache = streaming.write_cache(self.spec, self.layout, cache, c, _stop(kv), new_known)
            T = self.layout.tokens
            out = {n: jax.lax.dynamic_update_slice_in_dim(out[n], x0[n], c * T[n], 1) for n in gen}
            return out, cache

        out, _ = jax.lax.fori_loop(0, self.num_chunks, one_chunk, (out, self._empty_cache(B, 1, "clean")))
        return out
