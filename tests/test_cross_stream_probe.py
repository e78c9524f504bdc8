"""The cross-stream probe on a tiny random model: exact 1.0 ratios without joint attention, a
measurable dependence with it, and clear errors for inputs it cannot probe."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdit import config_lib
from mmdit.eval.cross_stream import cross_stream_probe, format_probe
from mmdit.model.diffusion import DiffusionModel


def _setup(overrides=(), config="configs/demo.py:tiny"):
    cfg = config_lib.override(config_lib.load(config), list(overrides))
    model = DiffusionModel.from_config(cfg)
    params = nn.unbox(model.init(jax.random.key(0)))
    rng = np.random.default_rng(0)
    latents = {
        a.name: jnp.asarray(rng.standard_normal((3, *a.geometry.shape, a.geometry.channels)), jnp.float32)
        for a in model.spec.streams
    }
    length = model.spec.condition("text").length
    raw = {"text_tokens": jnp.asarray(rng.integers(1, 200, (3, length)), jnp.int32)}
    return model, params, latents, raw


def test_without_joint_layers_the_other_stream_is_invisible():
    model, params, latents, raw = _setup(config="configs/demo.py:tiny,nojoint")  # model.joint_layers=()
    res = cross_stream_probe(model, params, latents, raw, sigmas=(0.5,), seeds=1)
    assert set(res) == {"audio", "video"}
    for per_sigma in res.values():
        r = per_sigma["0.5"]
        assert r["ratio_other_clip"] == pytest.approx(1.0, abs=1e-6)
        assert r["ratio_time_shifted"] == pytest.approx(1.0, abs=1e-6)


def test_with_joint_attention_the_partner_matters():
    model, params, latents, raw = _setup()
    res = cross_stream_probe(model, params, latents, raw, sigmas=(0.5,), seeds=1)
    for per_sigma in res.values():
        r = per_sigma["0.5"]
        assert np.isfinite(r["right"]) and r["right"] > 0
        assert abs(r["ratio_other_clip"] - 1.0) > 1e-4
        assert abs(r["ratio_time_shifted"] - 1.0) > 1e-4
    table = format_probe(res)
    assert "audio" in table and "/time shifted" in table


def test_probe_rejects_a_single_clip():
    model, params, latents, raw = _setup()
    one = {k: v[:1] for k, v in latents.items()}
    with pytest.raises(ValueError, match="batch of >= 2"):
        cross_stream_probe(model, params, one, {"text_tokens": raw["text_tokens"][:1]})
