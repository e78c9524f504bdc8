"""Teacher ODE pairs for the regression loss: noise -> the teacher's (guided) Euler sample, with the
ODE's state recorded at every σ of the student's ``denoising_step_list``.

The Euler schedule is the teacher's shifted ``ode_steps`` schedule with the student's σ's merged
in (so the ODE passes through each of them exactly); :func:`ode_pair` returns the states there and
the endpoint. The student's regression target at σ_k is then: from the teacher's state at σ_k,
predict the teacher's endpoint (CausVid's ODE regression) -- zero loss exactly when the student's
clean prediction reproduces the teacher's ODE map.

Prepared pairs (``distill.regression_pairs="records"``, ``mmdit distill prepare``) are written per task of
``distill.tasks`` and per stream the task generates (:func:`paired_streams`: t2av both, a2v the video), as the
record fields :func:`pair_fields` lists; :func:`pairs_of_batch` reads back each sample's pair for the task the
distillation step drew for it, with the given streams at their clean latents (what the ODE held them at).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmdit import flow
from mmdit import tasks as tasks_lib
from mmdit.distill.spec import PAIR_STATE, PAIR_TARGET


def merged_schedule(ode_steps: int, shift: float, step_list: Sequence[float]) -> tuple[np.ndarray, list[int]]:
    """``(sigmas float32 [N + 1] from 1 to 0, positions)``: the teacher's shifted Euler schedule with
    the student's σ's inserted; ``positions[k]`` is the index of ``step_list[k]`` in it."""
    base = np.asarray(flow.shift_sigma(np.linspace(1.0, 0.0, ode_steps + 1), shift), np.float64)
    merged = sorted(set(np.round(base, 7).tolist()) | {round(float(s), 7) for s in step_list}, reverse=True)
    positions = [merged.index(round(float(s), 7)) for s in step_list]
    return np.asarray(merged, np.float32), positions


def ode_pair(velocity: Callable, noise: dict, clean: dict, known: dict, sigmas: np.ndarray, positions: Sequence[int]):
    """Integrates the teacher ODE from ``noise`` with Euler over ``sigmas``.

    Args:
      velocity: ``(x {s: [B, S, C]}, sigma {s: [B, S]}) -> v`` for the generated streams (guided).
      noise: ``{generated s: float32 [B, S, C]}`` the starting point (σ = 1).
      clean, known: the given values and ``bool [B, S]`` masks of known tokens (held, σ = 0).
      sigmas: ``float32 [N + 1]`` descending from 1 to 0 (:func:`merged_schedule`).
      positions: indices into ``sigmas`` at which to record the state.

    Returns:
      ``(states, endpoint)``: ``states[k]`` the ODE state ``{s: [B, S, C]}`` at ``sigmas[positions[k]]``
      and the endpoint at σ = 0 (known tokens equal ``clean``).
    """
    names = sorted(noise)
    hold = lambda x: {n: jnp.where(known[n][..., None], clean[n].astype(jnp.float32), x[n]) for n in names}  # noqa: E731
    sig = jnp.asarray(sigmas, jnp.float32)
    pos = jnp.asarray(positions, jnp.int32)
    x = hold({n: noise[n].astype(jnp.float32) for n in names})
    states = {n: jnp.zeros((len(positions),) + x[n].shape, jnp.float32) for n in names}

    def record(i, x, states):
        hit = pos == i  # [K]
        return {n: jnp.where(hit.reshape((-1,) + (1,) * x[n].ndim), x[n][None], states[n]) for n in names}

    def body(i, carry):
        x, states = carry
        states = record(i, x, states)
        s, s_next = sig[i], sig[i + 1]
        sigma = {n: jnp.where(known[n], 0.0, s) for n in names}
        v = velocity(x, sigma)
        x = hold({n: x[n] + (s_next - s) * v[n].astype(jnp.float32) for n in names})
        return x, states

    x, states = jax.lax.fori_loop(0, len(sigmas) - 1, body, (x, states))
    return [{n: states[n][k] for n in names} for k in range(len(positions))], x


def paired_streams(spec, task: str, model_cfg=None) -> tuple[str, ...]:
    """The generated streams ``task`` generates (not wholly given), sorted: the ones its prepared pairs hold."""
    with jax.ensure_compile_time_eval():  # concrete inside a jitted step too
        masks = tasks_lib.task_masks(task, jax.random.key(0), spec, 1, model_cfg)
    return tuple(n for n in sorted(spec.generated) if not bool(np.all(np.asarray(masks.known[n]))))


def _fields(task: str, streams, num_steps: int) -> list[str]:
    """The pair fields of ``task`` for its paired ``streams``: the target, then the states."""
    out = []
    for n in streams:
        out.append(PAIR_TARGET.format(task=task, stream=n))
        out += [PAIR_STATE.format(task=task, k=k, stream=n) for k in range(num_steps)]
    return out


def pair_fields(spec, task_names: Sequence[str], num_steps: int, model_cfg=None) -> list[str]:
    """Record fields prepared pairs add for ``task_names`` and a step list of ``num_steps`` σ's."""
    return [f for task in task_names for f in _fields(task, paired_streams(spec, task, model_cfg), num_steps)]


def pairs_of_batch(
    spec, batch: dict, clean: dict, task_index, task_names: Sequence[str], num_steps: int, model_cfg=None, drawn=None
):
    """``(states, endpoint)`` as :func:`ode_pair` returns them, read from a batch of prepared records.

    ``task_index``: int32 ``[B]``, each sample's task as an index into ``task_names`` (the order of
    :func:`mmdit.tasks.sample_tasks`); a sample reads its task's fields, and the streams its task gives are
    their ``clean`` tokens ``{s: [B, S, C]}`` (the ODE held them there). ``drawn``: the tasks that can be drawn
    (default all): KeyError naming the field when the batch lacks one of theirs; a task never drawn (weight 0)
    is read from nothing."""
    drawn = list(task_names if drawn is None else drawn)
    have = {t: paired_streams(spec, t, model_cfg) for t in drawn}
    missing = [f for t in drawn for f in _fields(t, have[t], num_steps) if f not in batch]
    if missing:
        raise KeyError(f"the batch lacks the prepared pair field(s) {missing} (mmdit distill prepare writes them)")

    def read(field_of):
        out = {}
        for n in sorted(spec.generated):
            value = clean[n].astype(jnp.float32)
            for i, task in enumerate(task_names):
                if task in have and n in have[task]:
                    value = jnp.where((task_index == i)[:, None, None], batch[field_of(task, n)].astype(jnp.float32), value)
            out[n] = value
        return out

    endpoint = read(lambda task, n: PAIR_TARGET.format(task=task, stream=n))
    states = [read(lambda task, n, k=k: PAIR_STATE.format(task=task, k=k, stream=n)) for k in range(num_steps)]
    return states, endpoint
