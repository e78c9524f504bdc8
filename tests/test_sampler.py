"""The bidirectional sampler on the tiny demo model (random-init params, CPU).

Every task runs with the right shapes; known tokens come back bit-exact; absent streams are zeros;
nested CFG at scale 1 equals the unguided conditional sampler; the one batched CFG pass equals an
Euler loop written by hand from separate conditional / unconditional evaluations; the progress bar
runs under jit. The compiled loop is shared by every call with the same batch, steps and guidance
structure (scale values, shift, rng and task masks are arguments), which keeps this file to three
compiles (guided loop, unguided loop, step).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdit import config_lib
from mmdit.codecs.text import ByteTokenizer
from mmdit.model.diffusion import DiffusionModel
from mmdit.sample import ode
from mmdit.sample.sampler import Sampler, denoise_step_fn

B = 2
# XLA CPU compiles at optimisation level 0 take half the time; numerics agree to float rounding.
FAST = {"xla_backend_optimization_level": 0}


def fast_jit(fn):
    """``jax.jit(fn)`` compiled with ``FAST`` options, cached per argument shapes/dtypes."""
    jitted, cache = jax.jit(fn), {}

    def call(*args):
        leaves, tree = jax.tree.flatten(args)
        key = (tree, tuple((np.shape(a), str(a.dtype)) for a in leaves))
        if key not in cache:
            cache[key] = jitted.lower(*args).compile(compiler_options=FAST)
        return cache[key](*args)

    return call


@functools.lru_cache(maxsize=None)
def tiny_setup():
    """(cfg, model, params) of ``configs/demo.py:tiny``; cached so test_export reuses the init."""
    cfg = config_lib.load("configs/demo.py:tiny")
    model = DiffusionModel.from_config(cfg)
    params = fast_jit(model.init)(jax.random.key(0))
    return cfg, model, params


@functools.lru_cache(maxsize=None)
def tiny_step():
    """The in-process step function, jitted once per session (test_export compares against it)."""
    return fast_jit(denoise_step_fn(tiny_setup()[1]))


def tiny_inputs(model, batch=B, seed=1):
    """Random clean latents for every stream and byte-tokenized texts."""
    keys = jax.random.split(jax.random.key(seed), len(model.spec.streams))
    latents = {a.name: jax.random.normal(k, (batch,) + tuple(a.geometry.latent_shape)) for a, k in zip(model.spec.streams, keys)}
    texts = ["hello there", "a quiet voice", "ba mia lobo"][:batch]
    raw = {"text_tokens": ByteTokenizer().encode_batch(texts, model.spec.condition("text").length)}
    return latents, raw


@pytest.fixture(scope="module")
def setup():
    return tiny_setup()


@pytest.fixture(scope="module")
def sampler(setup):
    """The cosine schedule by default (the general path; constant is its scale-held special case),
    so that every guided call in this file shares one compiled loop."""
    cfg, model, _ = setup
    # guided at every step (the demo's default guides only while sigma > 0.5): the by-hand references below do
    cfg = config_lib.override(
        cfg.copy_and_resolve_references(), ["sample.guidance_schedule='cosine'", "sample.guidance_interval=(0.0, 1.0)"]
    )
    return Sampler(model, cfg, progress=True, compiler_options=FAST)


def test_every_task_shapes_known_tokens_and_progress(setup, sampler, capsys):
    cfg, model, params = setup
    latents, raw = tiny_inputs(model)
    rng = jax.random.key(3)
    outs = {}
    for task in ("t2av", "ti2av", "tv2a", "a2v", "tts", "inpaint"):
        outs[task] = out = sampler.sample(params, rng, task=task, batch=B, known_latents=latents, raw_conds=raw)
        assert set(out) == set(model.spec.generated)
        for name, x in out.items():
            assert x.shape == (B,) + tuple(model.spec.stream(name).geometry.latent_shape), (task, name)
            assert bool(jnp.all(jnp.isfinite(x))), (task, name)
    assert "4/4" in capsys.readouterr().err  # the tqdm bar saw every step from inside the jitted loop

    v, a = latents["video"], latents["audio"]
    # ti2av: the first latent frame is held exactly, the rest is generated.
    np.testing.assert_array_equal(outs["ti2av"]["video"][:, 0], v[:, 0])
    assert not np.allclose(outs["ti2av"]["video"][:, 1:], v[:, 1:])
    # tv2a: the whole video is given; a2v: the whole audio.
    np.testing.assert_array_equal(outs["tv2a"]["video"], v)
    assert not np.allclose(outs["tv2a"]["audio"], a)
    np.testing.assert_array_equal(outs["a2v"]["audio"], a)
    assert not np.allclose(outs["a2v"]["video"], v)
    # tts: the visual stream is absent -> zeros.
    assert not np.any(np.asarray(outs["tts"]["video"])) and np.any(np.asarray(outs["tts"]["audio"]))
    # inpaint: the random spans sample() draws (from split(rng)[1]) are held in token space.
    masks = sampler.task_masks("inpaint", jax.random.split(rng)[1], B)
    got, want = model.tokens(outs["inpaint"]), model.tokens(latents)
    assert any(bool(np.any(masks.known[n])) for n in got)
    for n in got:
        k = np.asarray(masks.known[n])
        np.testing.assert_array_equal(np.asarray(got[n])[k], np.asarray(want[n])[k])
        assert not np.allclose(np.asarray(got[n])[~k], np.asarray(want[n])[~k])
    # t2av is deterministic in the rng and knows nothing.
    again = sampler.sample(params, rng, task="t2av", batch=B, raw_conds=raw)
    np.testing.assert_allclose(again["video"], outs["t2av"]["video"], atol=1e-5)


def test_clear_errors(setup, sampler):
    _, model, params = setup
    latents, raw = tiny_inputs(model)
    rng = jax.random.key(0)
    with pytest.raises(ValueError, match=r"known_latents\['audio'\]"):
        sampler.sample(params, rng, task="a2v", batch=B, known_latents={}, raw_conds=raw)
    with pytest.raises(ValueError, match=r"known_latents\['video'\] has shape"):
        sampler.sample(params, rng, task="tv2a", batch=B, known_latents={"video": latents["video"][:1]}, raw_conds=raw)
    with pytest.raises(ValueError, match="cannot sample task 'tr2av'.*ref_audio"):
        sampler.sample(params, rng, task="tr2av", batch=B, raw_conds=raw)
    with pytest.raises(ValueError, match="unknown task"):
        sampler.sample(params, rng, task="nope", batch=B, raw_conds=raw)
    with pytest.raises(ValueError, match=r"sample.guidance \(or --guidance\) names \['ref_audio'\]"):
        sampler.sample(params, rng, task="t2av", batch=B, raw_conds=raw, guidance={"ref_audio": 2.0})
    with pytest.raises(ValueError, match=r"sample.guidance.text \(or --guidance\) names \['motion'\]"):
        sampler.sample(params, rng, task="t2av", batch=B, raw_conds=raw, guidance={"text": {"motion": 2.0}})
    with pytest.raises(ValueError, match="text_tokens"):
        sampler.sample(params, rng, task="t2av", batch=B, raw_conds={})
    with pytest.raises(ValueError, match=r"stream_shift \(or --stream-shift\) names \[.motion.\]"):
        sampler.sample(params, rng, task="t2av", batch=B, raw_conds=raw, stream_shift={"motion": 1.0})


def test_nested_cfg_at_scale_one_equals_unguided_conditional(setup, sampler):
    _, model, params = setup
    latents, raw = tiny_inputs(model)
    kw = dict(task="ti2av", batch=B, known_latents=latents, raw_conds=raw)
    guided = sampler.sample(
        params, jax.random.key(5), guidance={"text": {"video": 1.0, "audio": 1.0}}, guidance_mode="nested", **kw
    )
    plain = sampler.sample(params, jax.random.key(5), guidance={}, **kw)
    other = sampler.sample(params, jax.random.key(5), guidance={"text": {"video": 3.0, "audio": 3.0}}, **kw)
    for n in plain:
        np.testing.assert_allclose(guided[n], plain[n], atol=2e-4, rtol=1e-4)
        assert np.abs(np.asarray(other[n]) - np.asarray(plain[n])).max() > 1e-2  # guidance does act


def test_guidance_interval_guides_only_the_steps_inside_it(setup, sampler):
    """``guidance_interval``: no step inside -> the unguided sample; every step inside -> the guided one;
    a partial interval is neither (and compiles its own loop)."""
    _, model, params = setup
    latents, raw = tiny_inputs(model)
    kw = dict(task="t2av", batch=B, known_latents=latents, raw_conds=raw, guidance={"text": {"video": 3.0, "audio": 3.0}})
    guided = sampler.sample(params, jax.random.key(6), **kw)
    everywhere = sampler.sample(params, jax.random.key(6), guidance_interval=(0.0, 1.0), **kw)
    nowhere = sampler.sample(params, jax.random.key(6), guidance_interval=(1.0, 2.0), **kw)
    partial = sampler.sample(params, jax.random.key(6), guidance_interval=(0.8, 1.0), **kw)
    plain = sampler.sample(params, jax.random.key(6), **{**kw, "guidance": {}})
    for n in plain:
        np.testing.assert_array_equal(everywhere[n], guided[n])
        np.testing.assert_allclose(nowhere[n], plain[n], atol=2e-4, rtol=1e-4)
        assert np.abs(np.asarray(partial[n]) - np.asarray(plain[n])).max() > 1e-3
        assert np.abs(np.asarray(partial[n]) - np.asarray(guided[n])).max() > 1e-3


def test_batched_cfg_equals_separate_evaluations_by_hand(setup, sampler):
    """sample() stacks [uncond; cond] into ONE forward pass per step; here each row set is its own
    call, combined with per-stream scales, the cosine schedule and per-stream σ schedules (audio
    denoised ahead with a smaller shift) by hand."""
    cfg, model, params = setup
    latents, raw = tiny_inputs(model)
    scales = {"video": 3.0, "audio": 1.5}
    steps, shift, rng = 4, 2.0, jax.random.key(7)
    out = sampler.sample(
        params,
        rng,
        task="ti2av",
        batch=B,
        known_latents=latents,
        raw_conds=raw,
        steps=steps,
        shift=shift,
        stream_shift={"audio": 1.0},
        guidance={"text": scales},
    )

    step = tiny_step()
    k_noise, k_task = jax.random.split(rng)
    masks = sampler.task_masks("ti2av", k_task, B)
    x = sampler.noise(k_noise, B)
    clean = model.tokens(latents)
    hold = lambda x: {n: jnp.where(masks.known[n][..., None], clean[n], x[n]) for n in x}  # noqa: E731
    x = hold(x)
    sigmas = {"video": np.asarray(ode.sampling_sigmas(steps, shift)), "audio": np.asarray(ode.sampling_sigmas(steps, 1.0))}
    assert np.all(sigmas["audio"][1:-1] < sigmas["video"][1:-1])
    for i in range(steps):
        sig = {n: jnp.where(masks.known[n], 0.0, sigmas[n][i]) for n in x}
        common = (params, x, sig, raw)
        v_u = step(*common, {"text": jnp.zeros(B, bool)}, masks.known, masks.valid)
        v_c = step(*common, {"text": jnp.ones(B, bool)}, masks.known, masks.valid)
        w = 0.5 * (1 + np.cos(np.pi * i / (steps - 1)))  # cosine: full scale at step 0, 1.0 at the last
        x = hold(
            {n: x[n] + (sigmas[n][i + 1] - sigmas[n][i]) * (v_u[n] + (1 + (scales[n] - 1) * w) * (v_c[n] - v_u[n])) for n in x}
        )
    by_hand = model.latents(x)
    for n in out:
        np.testing.assert_allclose(out[n], by_hand[n], atol=2e-4, rtol=1e-4)
