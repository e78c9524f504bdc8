"""Teacher ODE pairs for the regression loss: noise -> the teacher's (guided) Euler sample, with the
ODE's state recorded at every σ of the student's ``denoising_step_list``.

The Euler schedule is the teacher's shifted ``ode_steps`` schedule with the student's σ's merged
in (so the ODE passes through each of them exactly); :func:`ode_pair` returns the states there and
the endpoint. The student's regression target at σ_k is then: from the teacher's state at σ_k,
predict the teacher's endpoint (CausVid's ODE regression) -- zero loss exactly when the student's
clean prediction reproduces the teacher's ODE map.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmdit import flow


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
