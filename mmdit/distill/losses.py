"""The three distillation losses, over dicts of token streams (:mod:`mmdit.flow`'s data model).

Shapes: token streams ``{s: float [B, S_s, C_s]}``; ``known`` / ``valid`` ``{s: bool [B, S_s]}``.
A token is *supervised* when it is valid and not known (the given modality of A2V, padding and
absent streams never enter a loss). σ is per token ``{s: float32 [B, S_s]}``.

* :func:`dmd_generator_loss` -- DMD (CausVid / DMD2 form). With the student's sample ``x``, the
  real (teacher, guided) and fake (critic) scores' clean predictions ``x0_real`` / ``x0_fake`` at a
  re-noised ``x``: ``grad = (x0_fake − x0_real) / mean|x − x0_real|`` (the mean per sample over its
  supervised tokens and channels: the update's size does not depend on how far the sample is from
  the teacher), and ``loss = 0.5·||x − stop_grad(x − grad)||²`` (a masked mean), whose gradient in
  ``x`` is ``grad`` / (element count): descending it moves ``x`` towards the teacher's prediction
  and away from the critic's, i.e. along the difference of the real and fake scores.
* :func:`fake_score_loss` -- the critic's flow-matching loss on (stop-gradient) student samples.
* :func:`regression_loss` -- the student's clean prediction against the teacher's ODE endpoint
  from the same noise (CausVid's regression warm-up / auxiliary loss); zero when the student
  reproduces the teacher's ODE map.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from mmdit import flow

Streams = Mapping[str, jax.Array]

NORM_EPS = 1e-6  # floor of the DMD normaliser (a sample already equal to the teacher's prediction)


def clean_prediction(x_sigma: Streams, velocity: Streams, sigma: Streams) -> dict:
    """``x0 = x_σ − σ·v`` per stream (float32): the denoised estimate of a velocity prediction."""
    return {n: x_sigma[n].astype(jnp.float32) - sigma[n][..., None] * velocity[n].astype(jnp.float32) for n in velocity}


def supervised_weights(names, known: Streams | None, valid: Streams | None, shapes: Mapping[str, tuple]) -> dict:
    """``{s: float32 [B, S_s]}``: 1 on valid, unknown tokens, else 0."""
    out = {}
    for n in names:
        k = flow._mask(known, n, shapes[n], False)
        v = flow._mask(valid, n, shapes[n], True)
        out[n] = (~k & v).astype(jnp.float32)
    return out


def dmd_normaliser(x: Streams, x0_real: Streams, weights: Streams) -> jax.Array:
    """``[B]``: mean ``|x − x0_real|`` over every supervised token and channel of each sample (all
    streams together), floored at :data:`NORM_EPS`."""
    total, count = 0.0, 0.0
    for n in x:
        diff = jnp.abs(x[n].astype(jnp.float32) - x0_real[n].astype(jnp.float32))
        w = weights[n][..., None]
        total = total + jnp.sum(diff * w, axis=(1, 2))
        count = count + jnp.sum(weights[n], axis=1) * x[n].shape[-1]
    return jnp.maximum(total / jnp.maximum(count, 1.0), NORM_EPS)


def dmd_generator_loss(
    x: Streams, x0_real: Streams, x0_fake: Streams, known=None, valid=None, stream_weights=None, token_weights=None
):
    """The DMD generator loss of the student's sample ``x`` (module docstring).

    Args:
      x: ``{s: [B, S, C]}`` the student's clean sample (carries the gradient to the student).
      x0_real, x0_fake: ``{s: [B, S, C]}`` teacher / critic clean predictions at a re-noised
        ``x`` (gradients are stopped here).
      known, valid: ``{s: bool [B, S]}`` (supervised = valid and not known).
      stream_weights: ``{s: float}`` (default 1).
      token_weights: ``{s: float32 [S]}`` relative weights of a stream's tokens (``flow_loss``'s; e.g.
        :func:`mmdit.train.step.first_frame_weights`); the normaliser stays unweighted.

    Returns:
      ``(loss, metrics)``: scalar float32 and ``{"dmd/grad_abs": mean |grad| over supervised elements, "dmd/normaliser":
      mean of the per-sample normaliser}``.
    """
    x0_real = jax.tree.map(jax.lax.stop_gradient, dict(x0_real))
    x0_fake = jax.tree.map(jax.lax.stop_gradient, dict(x0_fake))
    shapes = {n: x[n].shape[:2] for n in x}
    w = supervised_weights(list(x), known, valid, shapes)
    norm = jax.lax.stop_gradient(dmd_normaliser(jax.lax.stop_gradient(dict(x)), x0_real, w))
    grad = {n: (x0_fake[n] - x0_real[n]) / norm[:, None, None] for n in x}
    target = {n: jax.lax.stop_gradient(x[n].astype(jnp.float32) - grad[n]) for n in x}
    mse, _ = flow.flow_loss(dict(x), target, known, valid=valid, stream_weights=stream_weights, token_weights=token_weights)
    count = sum(jnp.sum(w[n]) * x[n].shape[-1] for n in x)
    grad_abs = sum(jnp.sum(jnp.abs(grad[n]) * w[n][..., None]) for n in x) / jnp.maximum(count, 1.0)
    return 0.5 * mse, {"dmd/grad_abs": grad_abs, "dmd/normaliser": jnp.mean(norm)}


def fake_score_loss(
    pred_velocity: Streams, x: Streams, noise: Streams, known=None, valid=None, stream_weights=None, token_weights=None
):
    """The critic's flow-matching loss: its velocity ``pred_velocity`` at ``x`` noised with
    ``noise`` against ``noise − x`` (``x`` the student's sample, gradient stopped), tokens weighted as
    the teacher's training weighed them (``token_weights``). ``(loss, metrics)``."""
    x = jax.tree.map(jax.lax.stop_gradient, dict(x))
    target = flow.velocity_target(x, dict(noise))
    return flow.flow_loss(
        dict(pred_velocity), target, known, valid=valid, stream_weights=stream_weights, token_weights=token_weights
    )


def regression_loss(x0_student: Streams, x0_teacher: Streams, known=None, valid=None, stream_weights=None, token_weights=None):
    """Masked MSE of the student's clean prediction against the teacher's ODE endpoint
    (``x0_teacher``, gradient stopped). ``(loss, metrics)``; exactly 0 when they agree."""
    target = jax.tree.map(jax.lax.stop_gradient, dict(x0_teacher))
    return flow.flow_loss(
        dict(x0_student), target, known, valid=valid, stream_weights=stream_weights, token_weights=token_weights
    )
