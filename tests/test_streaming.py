"""The KV-cached streaming sampler (mmdit/sample/streaming.py) against the bidirectional sampler.

* per-step cache + absolute positions: streaming N = 4 chunks equals the bidirectional sampler on the
  whole 4-chunk sequence under ``chunk_causal`` on the same noise (both streams, CFG on; t2av and a2v);
* clean cache: the cached keys/values of every chunk equal a teacher-forcing forward of the finished
  sequence;
* bounded positions: the first chunks equal the full sampler, chunk 3 and chunk 500 give identical
  outputs for identical inputs and context; one compilation for the whole stream; constant cache size;
* config errors name the fields.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo_stream
from mmdit import config_lib
from mmdit.model.diffusion import DiffusionModel
from mmdit.sample.sampler import Sampler
from mmdit.sample.streaming import StreamingSampler, chunk_layout, window_offsets

FAST = {"xla_backend_optimization_level": 0}
STEPS = 3


def _config(chunks=4):
    c = config_lib.load("configs/demo_stream.py:tiny")
    demo_stream.set_clip_chunks(c, chunks)
    c.sample.steps = STEPS
    c.model.streams.video.key_frame_embedding = True  # added in chunk 0 only: the equality tests hold it to that
    return c


@pytest.fixture(scope="module")
def setup():
    cfg = _config(4)
    model = DiffusionModel.from_config(cfg)
    params = model.init(jax.random.key(0))
    # Perturb the output heads / modulation away from init so velocities are not ~0.
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)
    text = jnp.asarray(np.random.default_rng(0).integers(1, 255, (1, cfg.model.conditions.text.length)), jnp.int32)
    return cfg, model, params, {"text_tokens": text}


def _chunked(tokens, T, c):
    return tokens[:, c * T : (c + 1) * T]


def _stream(ss, params, raw, task, noise, given=None, n=4):
    state = ss.start(params, jax.random.key(7), task=task, batch=1, raw_conds=raw)
    outs, caches = [], []
    for c in range(n):
        nz = {s: _chunked(noise[s], ss.layout.tokens[s], c) for s in noise}
        g = (
            None
            if given is None
            else {s: ss.model.latents({s: _chunked(v, ss.layout.tokens[s], c)})[s] for s, v in given.items()}
        )
        out, state = ss.step(params, state, g, noise=nz)
        outs.append(out)
        caches.append(jax.tree.map(np.asarray, state.cache))
    return {s: np.concatenate([o[s] for o in outs], axis=1) for s in outs[0]}, caches, ss


@pytest.mark.parametrize("task,interval", [("t2av", False), ("a2v", False), ("t2av", True)])
def test_per_step_stream_equals_bidirectional_chunk_causal(setup, task, interval):
    """``interval``: CFG limited to the first steps (``sample.guidance_interval``): both samplers gate the
    same steps."""
    cfg, model, params, raw = setup
    if interval:
        assert cfg.sample.guidance, "the interval case needs a guided config"
        sig = np.asarray(Sampler(model, cfg).schedules(STEPS, cfg.sample.shift)["video"])
        cfg = config_lib.override(cfg.copy_and_resolve_references(), [f"sample.guidance_interval=({(sig[1] + sig[2]) / 2}, 1.0)"])
    full = Sampler(model, cfg, compiler_options=FAST)
    k_noise, _ = jax.random.split(jax.random.key(3))
    noise = full.noise(k_noise, 1)
    known_latents = None
    given = None
    if task == "a2v":
        audio = jax.random.normal(jax.random.key(4), (1,) + tuple(model.spec.stream("audio").geometry.latent_shape))
        known_latents = {"audio": audio}
        given = {"audio": model.spec.stream("audio").geometry.patchify(audio)}
    # The bidirectional sampler on the same noise: monkeypatch its noise draw.
    full.noise = lambda rng, batch: noise
    ref = full.sample(params, jax.random.key(3), task=task, batch=1, raw_conds=raw, known_latents=known_latents)
    ss = StreamingSampler(model, cfg, cache_mode="per_step", positions="absolute", compiler_options=FAST)
    got, _, ss = _stream(ss, params, raw, task, noise, given)
    assert ss.layout.clip_chunks == 4
    for s in ref:
        np.testing.assert_allclose(got[s], np.asarray(ref[s]), atol=1e-5, rtol=1e-5)
    assert float(np.abs(np.asarray(ref["video"])).mean()) > 0.1  # a real sample, not zeros
    assert ss.compilations == 1


def test_clean_cache_equals_teacher_forcing_forward(setup):
    cfg, model, params, raw = setup
    ss = StreamingSampler(model, cfg, cache_mode="clean", positions="absolute", compiler_options=FAST)
    noise = Sampler(model, cfg).noise(jax.random.key(5), 1)
    got, caches, ss = _stream(ss, params, raw, "t2av", noise)
    # Teacher forcing: one clean forward of the whole finished sequence (sigma 0 everywhere).
    tokens = model.tokens({s: jnp.asarray(v) for s, v in got.items()})
    sigma = {s: jnp.zeros(t.shape[:2]) for s, t in tokens.items()}
    # CFG row 0 drops the text (nested plan: [uncond, cond]); row 1 keeps it.
    for row, keep in ((0, False), (1, True)):
        conds, cmasks = model.encode_conditions(params, raw)
        _, kv = model.dit.apply(params["dit"], tokens, sigma, conds, cmasks, {"text": jnp.asarray([keep])}, return_kv=True)
        for c in range(4):
            for s in ("video", "audio"):
                T = ss.layout.tokens[s]
                want_k = np.asarray(kv["k"][s][:, :, c * T : (c + 1) * T])[:, 0]
                want_v = np.asarray(kv["v"][s][:, :, c * T : (c + 1) * T])[:, 0]
                np.testing.assert_allclose(caches[c]["k"][s][:, row, T:], want_k, atol=2e-5, rtol=1e-4)
                np.testing.assert_allclose(caches[c]["v"][s][:, row, T:], want_v, atol=2e-5, rtol=1e-4)
                np.testing.assert_allclose(caches[c]["k"][s][:, row, :T], np.asarray(kv["k"][s][:, 0, :T]), atol=2e-5, rtol=1e-4)


def test_bounded_positions_translation_invariant_and_constant(setup):
    cfg, model, params, raw = setup
    ss = StreamingSampler(model, cfg, cache_mode="per_step", positions="bounded", compiler_options=FAST)
    full_noise = Sampler(model, cfg).noise(jax.random.key(3), 1)
    # While bounded == absolute (chunks 0..2), streaming equals the full sampler's first chunks.
    absolute = StreamingSampler(model, cfg, cache_mode="per_step", positions="absolute", compiler_options=FAST)
    a, _, _ = _stream(absolute, params, raw, "t2av", full_noise, n=3)
    b, _, _ = _stream(ss, params, raw, "t2av", full_noise, n=3)
    for s in a:
        np.testing.assert_array_equal(a[s], b[s])
    assert window_offsets(500, 4.0, "bounded") == window_offsets(3, 4.0, "bounded") == (8.0, 0.0, 4.0)
    # Chunk 3 and chunk 500 with identical context and noise give identical outputs.
    state = ss.start(params, jax.random.key(7), task="t2av", batch=1, raw_conds=raw)
    for _ in range(3):
        _, state = ss.step(params, state)
    cache = jax.tree.map(np.asarray, state.cache)
    nz = ss.noise(state, 3)
    out3, st3 = ss.step(params, state, noise=nz)
    state.cache, state.chunk = jax.tree.map(jnp.asarray, cache), 500
    out500, st500 = ss.step(params, state, noise=nz)
    for s in out3:
        np.testing.assert_array_equal(np.asarray(out3[s]), np.asarray(out500[s]))
    shapes = lambda st: jax.tree.map(lambda a: a.shape, st.cache)  # noqa: E731
    assert shapes(st3) == shapes(st500)
    assert ss.compilations == 1  # chunk 0 .. chunk 500: one executable
    # a second stream reuses the task's constants and the executable; a mis-shaped noise= is named
    again = ss.start(params, jax.random.key(7), task="t2av", batch=1, raw_conds=raw)
    assert again.signature == state.signature and again.cache["k"] is not state.cache["k"]
    with pytest.raises(ValueError, match=r"noise= has shapes"):
        ss.step(params, again, noise={s: v[:, :1] for s, v in nz.items()})
    out0, _ = ss.step(params, again)
    assert ss.compilations == 1 and set(out0) == set(out3)


def test_stream_generator_ends_with_source_and_checks_given(setup):
    cfg, model, params, raw = setup
    ss = StreamingSampler(model, cfg, compiler_options=FAST)
    T = ss.layout.latents["audio"]
    audio = jax.random.normal(jax.random.key(2), (1, 3 * T + 1, 128))  # 3 whole chunks + a partial one
    from mmdit.sample.streaming import latent_chunks

    state = ss.start(params, jax.random.key(1), task="a2v", batch=1, raw_conds=raw)
    chunks = list(ss.stream(params, state, given=({"audio": a} for a in latent_chunks(audio, T))))
    assert len(chunks) == 3 and state.chunk == 3
    np.testing.assert_array_equal(np.asarray(chunks[1]["audio"]), np.asarray(audio[:, T : 2 * T]))  # given audio held
    with pytest.raises(ValueError, match="needs the given stream"):
        ss.step(params, state)

    def stalled():
        yield {"audio": audio[:, :T]}
        import time

        time.sleep(5)
        yield {"audio": audio[:, T : 2 * T]}

    state = ss.start(params, jax.random.key(1), task="a2v", batch=1, raw_conds=raw)
    assert len(list(ss.stream(params, state, given=stalled(), source_timeout=1.0))) == 1


def test_config_errors_name_fields():
    cfg = _config(3)
    cfg.model.chunk_frames = 5.0
    model_spec = DiffusionModel.from_config(cfg).spec if False else None  # noqa: F841
    from mmdit.model.spec import build_spec

    with pytest.raises(ValueError, match="model.chunk_frames=5"):
        chunk_layout(build_spec(cfg.model))
    cfg = _config(3)
    cfg.model.mask = "local(1) & no_peek"
    with pytest.raises(ValueError, match="model.mask"):
        chunk_layout(build_spec(cfg.model))


def test_synthetic_records_are_random_windows_of_longer_speech():
    """configs/demo_stream.py renders 3x longer utterances; each record is an aligned clip-length window."""
    from mmdit.data.synth_records import RecordMaker, world_from_config

    cfg = config_lib.load("configs/demo_stream.py:tiny")
    maker = RecordMaker(cfg, world_from_config(cfg))
    starts = set()
    for index in range(4):
        clip = maker.world.clip(index)
        w = maker.window(clip, index)
        n, spf = w.video.shape[0], clip.sample_rate // clip.fps
        assert n == round(cfg.clip.seconds * clip.fps) and len(w.audio) == n * spf
        (start,) = [s for s in range(clip.video.shape[0] - n + 1) if np.array_equal(clip.video[s : s + n], w.video)][:1]
        np.testing.assert_array_equal(w.audio, clip.audio[start * spf : (start + n) * spf])  # audio cut at the same instant
        starts.add(start)
    assert len(starts) > 1


def test_condition_keys_values_are_computed_once_and_read_from_the_cache(setup):
    cfg, model, params, raw = setup
    ss = StreamingSampler(model, cfg, compiler_options=FAST)
    state = ss.start(params, jax.random.key(7), task="t2av", batch=1, raw_conds=raw)
    cross = state.cache["cross"]["video"]["text"]
    sp = ss.spec
    assert cross["k"].shape == (sp.num_layers, 2, sp.condition("text").length, sp.heads, sp.head_dim)  # [L, CFG rows, L_c, H, Dh]
    nz = ss.noise(state, 0)
    out, _ = ss.step(params, state, noise=nz)
    state = ss.start(params, jax.random.key(7), task="t2av", batch=1, raw_conds=raw)
    state.cache["cross"] = jax.tree.map(jnp.zeros_like, state.cache["cross"])  # the chunk reads these, not the text
    changed, _ = ss.step(params, state, noise=nz)
    assert float(np.abs(np.asarray(out["video"]) - np.asarray(changed["video"])).max()) > 1e-3
