"""The bidirectional sampler: one task, multi-condition CFG, the whole ODE loop in one jitted call.

Pieces (docs/design.md conventions: latents per stream ``[B, *latent_shape]``, tokens ``[B, S, C]``,
per-token σ, tasks are masks over tokens):

* :func:`denoise_step_fn` -- the **step function**, the one network evaluation of a sampler step:
  ``(params, x_tokens, sigma_tokens, raw_conds, cond_keep, known, valid) -> v_tokens``. Its batch
  axis holds *every* CFG row of the step (``P·B`` rows for ``P`` guidance patterns), so guidance
  is applied around it, not inside it: this is what ``mmdit/serve/export.py`` serialises (with a
  symbolic batch), and an exported bundle therefore supports any guidance structure.
* :class:`~mmdit.sample.guidance.Guidance` (``mmdit/sample/guidance.py``, built by
  ``guidance.resolve_guidance``) -- which conditions are guided (ordered), their scales (per
  condition, or per condition and stream), the mode (``nested`` / ``independent``,
  ``guidance.cfg_batch_plan``), the schedule (``constant`` / ``cosine``, ``guidance.guidance_scale``) and the σ interval it applies in
  (``sample.guidance_interval``).
* :class:`Sampler` -- ``sample(params, rng, task=..., batch=..., known_latents=..., raw_conds=...)``
  -> ``{generated stream: latents [B, *latent_shape]}``.

Each step makes ONE forward pass over the ``P·B`` stacked rows (``guidance.repeat_for_cfg``), whose
condition keep flags are ``guidance.cfg_keep_flags`` ANDed with the task's ``present`` flags, then
``guidance.combine_cfg`` with the (scheduled) scales. Known tokens (``tasks.task_masks``,
``known.known_tokens``) get σ = 0 and are held at their clean values, so they come back bit-exact;
invalid (absent) streams come back as zeros. The loop is ``ode.euler_sample`` (``sample.solver``
``euler``) or ``ode.renoise_sample`` (``renoise``: a distilled student's rule), a ``fori_loop``
inside one ``jax.jit``, cached per traced program: (batch, steps, guidance structure, progress, solver).
Scale values, σ schedule (shift) and task masks are *arguments*, so changing them -- or the task,
when its guidance plan is the same -- reuses the compiled loop.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmdit import config_spec
from mmdit import tasks as tasks_lib
from mmdit.sample import guidance as guidance_lib
from mmdit.sample import ode
from mmdit.sample.guidance import Guidance
from mmdit.sample.known import known_tokens

StepFn = Callable[..., dict]

__all__ = ["StepFn", "denoise_step_fn", "canonical_raw_conds", "step_example_inputs", "Guidance", "Sampler"]


# ----------------------------------------------------------------------------------------------
# The step function and its canonical inputs
# ----------------------------------------------------------------------------------------------


def denoise_step_fn(model, *, per_sample: bool = False) -> StepFn:
    """The pure step function ``(params, x_tokens, sigma_tokens, raw_conds, cond_keep, known,
    valid) -> v_tokens`` of ``model`` (a ``DiffusionModel``).

    Args (leading axis ``N`` = every CFG row of a step; shapes per stream ``s`` / condition ``c``):
      params: unboxed model params (``flax.linen.meta.unbox``).
      x_tokens: ``{s: float32 [N, S_s, C_s·prod(patch_s)]}`` for *every* stream (condition streams
        included, clean).
      sigma_tokens: ``{s: float32 [N, S_s]}`` per-token σ ∈ [0, 1] for the generated streams.
      raw_conds: :func:`canonical_raw_conds` -- ``text_tokens`` int32 ``[N, L]`` for the byte text
        path, else features ``[N, L_c, C_c]`` + ``{c}_mask`` bool ``[N, L_c]``.
      cond_keep: ``{c: bool [N]}`` for every condition and condition stream (False drops it).
      known, valid: ``{s: bool [N, S_s]}`` for every stream.

    Returns:
      ``{s: float32 [N, S_s, C_s·prod(patch_s)]}`` velocities ``ε − x_data`` of the generated
      streams.

    ``per_sample=True`` evaluates ``jax.vmap`` of a batch-of-one call instead of one batched call:
    numerically the same computation, but every shape inside the model is concrete, which
    ``jax.export`` with a symbolic batch needs while ``mmdit/attention/masks.py`` reads batch sizes
    with ``int()``.
    """

    def step(params, x_tokens, sigma_tokens, raw_conds, cond_keep, known, valid):
        return model.velocity(params, x_tokens, sigma_tokens, raw_conds, cond_keep=cond_keep, known=known, valid=valid)

    if not per_sample:
        return step

    def one(params, *rows):
        rows = jax.tree.map(lambda a: a[None], rows)
        return jax.tree.map(lambda a: a[0], step(params, *rows))

    batched = jax.vmap(one, in_axes=(None,) + (0,) * 6)

    def step_per_sample(params, x_tokens, sigma_tokens, raw_conds, cond_keep, known, valid):
        return batched(params, x_tokens, sigma_tokens, raw_conds, cond_keep, known, valid)

    return step_per_sample


def canonical_raw_conds(model, raw_conds: Mapping[str, Any], batch: int) -> dict:
    """The fixed raw-condition tree the step function takes (an exported step accepts exactly this):
    every condition field of ``model.input_spec()`` -- ``text_tokens`` int32 ``[B, L]`` for the byte
    text path; else ``c`` float32 ``[B, L_c, C_c]`` plus ``c_mask`` bool ``[B, L_c]`` (all True when
    not given). Raises ValueError naming a missing or mis-shaped input."""
    return model.input_spec().canonical_conditions(raw_conds, batch)


def step_example_inputs(model, batch: int = 1) -> tuple:
    """Zero-filled step inputs ``(x_tokens, sigma_tokens, raw_conds, cond_keep, known, valid)`` of
    batch ``batch``: the canonical tree structure, shapes and dtypes of :func:`denoise_step_fn`."""
    tokens, sigma, raw = model.dummy_inputs(batch)
    keep = {n: jnp.ones((batch,), bool) for n in model.spec.keep_names}
    masks = {a.name: jnp.zeros((batch, a.geometry.num_tokens), bool) for a in model.spec.streams}
    return tokens, sigma, raw, keep, masks, jax.tree.map(jnp.logical_not, masks)


# ----------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------


class Sampler:
    """Samples one task at a time from a ``DiffusionModel`` (see the module docstring).

    Args:
      model: ``mmdit.model.diffusion.DiffusionModel`` (its ``spec`` fixes streams and shapes).
      cfg: the experiment config; ``cfg.sample.*`` gives the defaults (steps, shift, guidance,
        guidance_mode, guidance_schedule) and ``cfg.model`` the roles for the task masks.
      step_fn: an external step function with :func:`denoise_step_fn`'s signature (e.g.
        ``load_bundle(path).step_fn``, an exported step); default: ``denoise_step_fn(model)``.
      progress: default for :meth:`sample`'s ``progress`` (a tqdm bar fed by ``jax.debug.callback``).
      compiler_options: XLA options for compiling the loop (``Lowered.compile(compiler_options=)``),
        e.g. ``{"xla_backend_optimization_level": 0}`` to halve CPU compile time in tests.
    """

    def __init__(
        self,
        model,
        cfg,
        *,
        step_fn: StepFn | None = None,
        progress: bool = False,
        compiler_options: Mapping[str, Any] | None = None,
    ):
        self.model, self.cfg = model, cfg
        # The validated sample section: the defaults every call below falls back to.
        self.defaults = config_spec.sample_spec(cfg, model.spec, check_tasks=False)
        self.compiler_options = dict(compiler_options) if compiler_options else None
        self.spec = model.spec
        self.step_fn = step_fn if step_fn is not None else denoise_step_fn(model)
        self.progress = progress
        self.generated = list(self.spec.generated)
        self._compiled: dict[tuple, Callable] = {}
        self._bar = None

    # -- inputs ----------------------------------------------------------------------------------

    def task_masks(self, task: str, rng, batch: int) -> tasks_lib.TaskMasks:
        """The task's masks (concrete arrays); raises ValueError for a task this model cannot do."""
        if task not in tasks_lib.TASKS:
            raise ValueError(f"unknown task {task!r}; known tasks: {sorted(tasks_lib.TASKS)}")
        try:
            tasks_lib.validate_tasks({task: 1.0}, self.spec, self.cfg.model)
        except ValueError as e:
            raise ValueError(f"cannot sample task {task!r} with this model: {e}") from None
        return tasks_lib.task_masks(task, rng, self.spec, batch, self.cfg.model)

    def noise(self, rng, batch: int) -> dict:
        """Initial noise ``{generated stream: float32 [B, S, C]}`` (keys split in sorted name order)."""
        names = sorted(self.generated)
        keys = jax.random.split(rng, len(names))
        return {
            n: jax.random.normal(
                k, (batch, self.spec.stream(n).geometry.num_tokens, self.spec.stream(n).geometry.token_dim), jnp.float32
            )
            for n, k in zip(names, keys)
        }

    def resolve_guidance(
        self,
        guidance=None,
        mode: str | None = None,
        schedule: str | None = None,
        present: Mapping[str, Any] | None = None,
        interval=None,
    ) -> Guidance:
        """Validates and normalises a guidance setting (defaults: ``cfg.sample``); see
        :func:`mmdit.sample.guidance.resolve_guidance` (this model's conditions and generated streams).

        ``guidance``: ``{cond: s}`` / ``{cond: {stream: s}}`` in nested order (None: the config's;
        ``{}``: unguided). Per-stream dicts are completed with 1.0 for unnamed generated streams.
        Conditions absent from every sample of the task (``present`` all False) are dropped: their
        guidance term is identically zero. ``interval``: ``(lo, hi)``, guide only the steps with σ in
        ``(lo, hi]`` (None: ``cfg.sample.guidance_interval``).
        """
        return guidance_lib.resolve_guidance(
            guidance,
            mode,
            schedule,
            defaults=self.defaults,
            conditions=self.spec.keep_names,
            generated=self.generated,
            present=present,
            interval=interval,
        )

    # -- one step ----------------------------------------------------------------------------------

    def guided_velocity(self, params, x_tokens, sigma_tokens, raw_conds, masks, guidance: Guidance, scales=None) -> dict:
        """The guided velocity of one step from ONE batched call of the step function.

        Args:
          params: unboxed params for the step function.
          x_tokens: ``{s: float32 [B, S_s, C]}`` for every stream (condition streams included).
          sigma_tokens: ``{s: float32 [B, S_s]}`` for the generated streams.
          raw_conds: :func:`canonical_raw_conds` (batch B).
          masks: a ``tasks.TaskMasks`` (``known``/``valid`` ``{s: bool [B, S_s]}``, ``present``
            ``{c: bool [B]}``).
          guidance: the :class:`Guidance` (its plan fixes the ``P`` stacked patterns).
          scales: scale pytree overriding ``guidance.scales`` (e.g. scheduled, traced).

        Returns:
          ``{generated s: float32 [B, S_s, C]}`` = ``guidance.combine_cfg`` of the ``[P·B]`` evaluation.
        """
        plan = guidance.plan()
        batch = next(iter(x_tokens.values())).shape[0]
        rep = lambda tree: guidance_lib.repeat_for_cfg(tree, plan)  # noqa: E731
        flags = guidance_lib.cfg_keep_flags(plan, batch)
        keep = {}
        for c in self.spec.keep_names:
            present = jnp.asarray(masks.present.get(c, jnp.ones((batch,), bool)), bool)
            keep[c] = rep(present) & flags[c] if c in flags else rep(present)
        v = self.step_fn(
            params, rep(x_tokens), rep(sigma_tokens), rep(raw_conds), keep, rep(dict(masks.known)), rep(dict(masks.valid))
        )
        return guidance_lib.combine_cfg(v, plan, dict(guidance.scales) if scales is None else scales)

    # -- the loop ----------------------------------------------------------------------------------

    def _on_step(self, i):
        if self._bar is not None:
            self._bar.n = int(i) + 1
            self._bar.refresh()

    def _loop(self, batch: int, steps: int, guidance: Guidance, progress: bool, solver: str) -> Callable:
        """The jitted sampling loop for one traced program (see the module docstring)."""
        gen = self.generated

        def run(params, k_noise, sigmas, scales, m, held, cond_tokens, raw):
            masks = tasks_lib.TaskMasks(m["known"], m["valid"], m["present"], None)

            def velocity(x, sigma_tokens, i):
                s = guidance.scale_at(scales, i, steps, {n: sigmas[n][i] for n in gen})
                return self.guided_velocity(params, {**x, **cond_tokens}, sigma_tokens, raw, masks, guidance, s)

            def report(i, x_next, x0_hat):  # host-side tick of the tqdm bar, in step order
                jax.debug.callback(self._on_step, i, ordered=True)

            known = {n: masks.known[n] for n in gen}
            callback = report if progress else None
            if solver == "renoise":  # re-noising draws from the noise key too (ode.chunk_noise, chunk 0)
                x = ode.renoise_sample(
                    velocity, self.noise(k_noise, batch), sigmas, rng=k_noise, known=known, known_values=held, callback=callback
                )
            else:
                x = ode.euler_sample(
                    velocity, self.noise(k_noise, batch), sigmas, known=known, known_values=held, callback=callback
                )
            return {n: jnp.where(masks.valid[n][..., None], x[n], 0.0) for n in gen}

        return jax.jit(run)

    def _executable(self, batch: int, steps: int, guidance: Guidance, progress: bool, solver: str, args):
        """The compiled loop, cached per (batch, steps, guidance structure, progress, solver, arg avals)."""
        leaves, treedef = jax.tree.flatten(args)
        avals = tuple((tuple(np.shape(a)), str(getattr(a, "dtype", type(a)))) for a in leaves)
        key = (batch, steps, guidance.structure(), progress, solver, treedef, avals)
        if key not in self._compiled:
            lowered = self._loop(batch, steps, guidance, progress, solver).lower(*args)
            self._compiled[key] = lowered.compile(compiler_options=self.compiler_options)
        return self._compiled[key]

    def schedules(self, steps: int, shift: float, stream_shift: Mapping[str, float] | None = None) -> dict:
        """``{generated stream: float32 [steps + 1]}`` σ schedules: ``shift`` for every stream unless
        ``stream_shift`` (default ``cfg.sample.stream_shift``) names it."""
        per = self.defaults.stream_shift if stream_shift is None else config_spec.check_stream_shift(stream_shift, self.generated)
        return {n: ode.sampling_sigmas(steps, float(per.get(n, shift))) for n in self.generated}

    def sample(
        self,
        params,
        rng,
        *,
        task: str,
        batch: int,
        known_latents: Mapping | None = None,
        raw_conds: Mapping,
        steps: int | None = None,
        shift: float | None = None,
        stream_shift: Mapping[str, float] | None = None,
        guidance=None,
        guidance_mode: str | None = None,
        guidance_schedule: str | None = None,
        progress: bool | None = None,
        regions: Mapping[str, Any] | None = None,
        solver: str | None = None,
        guidance_interval=None,
    ) -> dict:
        """Samples ``batch`` examples of ``task``.

        Args:
          params: model params (boxed or unboxed; the step function's tree).
          rng: PRNG key; split as ``k_noise, k_task = jax.random.split(rng)`` (noise from
            :meth:`noise` with ``k_noise``; ``k_task`` draws random task masks, e.g. inpaint spans).
          task: a name in ``mmdit.tasks.TASKS`` the model supports.
          batch: samples ``B``.
          known_latents: ``{stream: float [B, *latent_shape]}`` clean latents of every stream with
            known tokens in the task (ti2av: the visual stream, only its first latent frame is read --
            it is also what a ``first_frame`` condition tiles, :mod:`mmdit.model.derived_conditions`;
            tv2a: visual; a2v: audio; inpaint: all generated) and of every condition stream.
          raw_conds: raw conditions (``text_tokens`` int32 ``[B, L]`` for the byte text path, or
            features ``[B, L_c, C_c]`` + optional ``{c}_mask``).
          steps, shift: sampler steps and schedule shift (default ``cfg.sample``).
          stream_shift: ``{stream: shift}`` overriding ``shift`` for some generated streams (default
            ``cfg.sample.stream_shift``): a smaller shift denoises that stream ahead of the others.
          guidance, guidance_mode, guidance_schedule, guidance_interval: see :meth:`resolve_guidance`.
          progress: show a tqdm bar of the steps (default: the constructor's).
          regions: task ``inpaint`` only: ``{generated stream: [(start_s, end_s), ...]}`` the spans to
            regenerate (e.g. ``{"audio": [(1.0, 2.5)]}``); every other token of the generated streams is
            known (``known_latents`` needed for all of them) and comes back bit-exact
            (:func:`mmdit.tasks.region_known`). None: the task's random spans.
          solver: ``euler`` | ``renoise`` (:func:`mmdit.sample.ode.solver_update`; default
            ``cfg.sample.solver``).

        Returns:
          ``{generated stream: float32 [B, *latent_shape]}``; known tokens equal the given latents
          exactly; streams the task marks invalid (absent) are zeros.
        """
        steps = int(steps if steps is not None else self.defaults.steps)
        shift = float(shift if shift is not None else self.defaults.shift)
        progress = self.progress if progress is None else progress
        solver = self.defaults.solver if solver is None else config_spec.check_solver(solver)
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        k_noise, k_task = jax.random.split(rng)
        masks = self.task_masks(task, k_task, batch)
        if regions is not None:
            if task != "inpaint":
                raise ValueError(f"regions= chooses the spans task 'inpaint' regenerates; got task {task!r}")
            masks = tasks_lib.with_regions(masks, self.spec, regions)
        g = self.resolve_guidance(guidance, guidance_mode, guidance_schedule, present=masks.present, interval=guidance_interval)
        held, cond_tokens = known_tokens(self.spec, task, masks.known, known_latents, batch)
        raw = canonical_raw_conds(self.model, raw_conds, batch)
        m = {"known": dict(masks.known), "valid": dict(masks.valid), "present": dict(masks.present)}
        sigmas = self.schedules(steps, shift, stream_shift)
        args = (nn.meta.unbox(params), k_noise, sigmas, g.scale_arrays(), m, held, cond_tokens, raw)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=steps, desc=f"compiling {task}", unit="step", leave=True)
        try:
            fn = self._executable(batch, steps, g, progress, solver, args)
            if self._bar is not None:
                self._bar.set_description(f"sampling {task}")
                self._bar.reset(total=steps)
            tokens = jax.block_until_ready(fn(*args))
            if progress:
                jax.effects_barrier()
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        return self.model.latents(tokens)
