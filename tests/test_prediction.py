"""``model.prediction="x0"``: the heads predict clean tokens and the model returns the implied velocity.

Same params, same head output: the x0 model's velocity is ``(x_sigma - head) / max(σ, 0.05)`` where the velocity
model returns ``head``; an Euler step to σ = 0 then lands exactly on the head's x0; a tiny demo trains a step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdit import config_lib
from mmdit.model.diffusion import DiffusionModel
from mmdit.model.spec import X0_MIN_SIGMA


def _models():
    cfg = config_lib.load("demo:tiny")  # the demo's default predicts x0
    by_v = DiffusionModel.from_config(config_lib.override(cfg, ["model.prediction=velocity"]))
    return by_v, DiffusionModel.from_config(config_lib.override(cfg, ["model.prediction=x0"]))


def test_x0_prediction_returns_the_implied_velocity():
    by_v, by_x0 = _models()
    assert (by_v.spec.prediction, by_x0.spec.prediction) == ("velocity", "x0")
    params = by_v.init(jax.random.key(0))  # no new params: one tree serves both
    assert jax.tree.structure(params) == jax.tree.structure(by_x0.init(jax.random.key(0)))
    tokens, _, raw = by_v.dummy_inputs(2)
    rng = np.random.default_rng(0)
    tokens = {n: jnp.asarray(rng.standard_normal(t.shape), jnp.float32) for n, t in tokens.items()}
    sigma = {n: jnp.asarray(rng.uniform(0, 1, t.shape[:2]), jnp.float32).at[:, 0].set(0.01) for n, t in tokens.items()}
    head = by_v.velocity(params, tokens, sigma, raw)
    v = by_x0.velocity(params, tokens, sigma, raw)
    for n in head:
        s = np.maximum(np.asarray(sigma[n]), X0_MIN_SIGMA)[..., None]
        np.testing.assert_allclose(v[n], (np.asarray(tokens[n]) - np.asarray(head[n])) / s, rtol=1e-5, atol=1e-4)
        # the last Euler step (σ -> 0) lands on the predicted clean tokens wherever σ >= the clamp
        x_end = tokens[n] + (0.0 - sigma[n][..., None]) * v[n]
        far = np.asarray(sigma[n]) >= X0_MIN_SIGMA
        np.testing.assert_allclose(np.asarray(x_end)[far], np.asarray(head[n])[far], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_x0_prediction_trains_and_rejects_unknown_values():
    from mmdit.train.step import make_loss_fn

    _, by_x0 = _models()
    cfg = config_lib.override(config_lib.load("demo:tiny"), ["model.prediction=x0"])
    params = by_x0.init(jax.random.key(1))
    tokens, _, raw = by_x0.dummy_inputs(2)
    batch = {**{f.name: np.zeros((2, *f.shape), f.dtype) for f in by_x0.input_spec().latent_fields}, **raw}
    loss, grads = jax.value_and_grad(lambda p: make_loss_fn(by_x0, cfg)(p, batch, jax.random.key(2))[0])(params)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="model.prediction='eps'"):
        DiffusionModel.from_config(config_lib.override(cfg, ["model.prediction=eps"]))
