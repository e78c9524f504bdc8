"""Stream batch (mmdit/sample/stream_batch.py): consecutive chunks' steps as row groups of one forward.

* the chunks, and the cache left behind, equal the sequential stream's (guided t2av with the Euler solver,
  unguided a2v with the distilled students' ``renoise`` solver), for streams shorter than, as long as and
  longer than the pipeline; one executable serves fill, steady state and drain;
* a given stream that ends drains the chunks in flight; a stream closed with chunks in flight is refused;
* the cache folding is a bijection; the config is refused where the schedule would not be exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo_stream
from mmdit import config_lib
from mmdit.model.diffusion import DiffusionModel
from mmdit.sample import stream_batch
from mmdit.sample.streaming import StreamingSampler, latent_chunks

FAST = {"xla_backend_optimization_level": 0}
STEPS = 3  # three row groups: fill and drain take two calls each


@pytest.fixture(scope="module")
def setup():
    cfg = config_lib.load("configs/demo_stream.py:tiny")
    demo_stream.set_clip_chunks(cfg, 4)
    cfg.sample.steps = STEPS
    assert cfg.sample.guidance, "the guided case needs a guided config"
    model = DiffusionModel.from_config(cfg)
    params = model.init(jax.random.key(0))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)
    text = jnp.asarray(np.random.default_rng(0).integers(1, 255, (1, cfg.model.conditions.text.length)), jnp.int32)
    samplers = {sb: StreamingSampler(model, cfg, stream_batch=sb, compiler_options=FAST) for sb in (False, True)}
    return cfg, model, params, {"text_tokens": text}, samplers


def _run(ss, params, raw, task, n, solver, guidance=None, given=None):
    state = ss.start(params, jax.random.key(7), task=task, batch=1, raw_conds=raw, solver=solver, guidance=guidance)
    chunks = [jax.tree.map(np.asarray, c) for c in ss.stream(params, state, given=given, num_chunks=n)]
    return chunks, state


@pytest.mark.parametrize("task,solver,guided", [("t2av", "euler", True), ("a2v", "renoise", False)])
def test_stream_batch_equals_sequential_stream(setup, task, solver, guided):
    cfg, model, params, raw, samplers = setup
    T = samplers[False].layout.latents["audio"]
    audio = np.asarray(jax.random.normal(jax.random.key(2), (1, 8 * T, 128)))
    guidance = None if guided else {}
    compiled = samplers[True].compilations
    for n in (1, 2, 3, 4, 7):  # fewer chunks than enter the pipeline, a partial fill, steady state
        given = lambda: ({"audio": a} for a in latent_chunks(audio, T)) if task == "a2v" else None  # noqa: E731
        seq, seq_state = _run(samplers[False], params, raw, task, n, solver, guidance, given())
        bat, bat_state = _run(samplers[True], params, raw, task, n, solver, guidance, given())
        assert len(seq) == len(bat) == n and seq_state.chunk == bat_state.chunk == n
        for a, b in zip(seq, bat):
            for s in a:
                np.testing.assert_allclose(b[s], a[s], atol=2e-5, rtol=1e-5)
        for a, b in zip(
            jax.tree.leaves({k: seq_state.cache[k] for k in ("k", "v", "known")}),
            jax.tree.leaves({k: bat_state.cache[k] for k in ("k", "v", "known")}),
        ):
            np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), atol=2e-5, rtol=1e-5)
        assert not bat_state.unfinished
        # the drained state goes on exactly like the sequential one
        if n == 7:
            g = {"audio": audio[:, 7 * T : 8 * T]} if task == "a2v" else None
            a, _ = samplers[False].step(params, seq_state, g)
            b, _ = samplers[True].step(params, bat_state, g)
            for s in a:
                np.testing.assert_allclose(np.asarray(b[s]), np.asarray(a[s]), atol=2e-5, rtol=1e-5)
    if task == "a2v":
        np.testing.assert_array_equal(bat[1]["audio"], audio[:, T : 2 * T])  # the given audio is held
    assert float(np.abs(bat[-1]["video"]).mean()) > 0.1  # a real sample
    # at most the sequential chunk (chunks 0 and 1) and ONE stream-batch executable for fill, steady state and drain
    assert samplers[True].compilations - compiled <= 2


def test_a_stream_continued_in_a_second_call_counts_its_chunks_from_there(setup):
    """``num_chunks`` counts the chunks of this call, whatever chunk the state is at (3 + 4 = 7 chunks)."""
    cfg, model, params, raw, samplers = setup
    outs = {}
    for sb, ss in samplers.items():
        state = ss.start(params, jax.random.key(5), task="t2av", batch=1, raw_conds=raw, guidance={}, solver="renoise")
        outs[sb] = [jax.tree.map(np.asarray, c) for n in (3, 4) for c in ss.stream(params, state, num_chunks=n)]
        assert state.chunk == 7 and not state.unfinished
    assert len(outs[True]) == len(outs[False]) == 7
    for a, b in zip(outs[False], outs[True]):
        for s in a:
            np.testing.assert_allclose(b[s], a[s], atol=2e-5, rtol=1e-5)


def test_stream_batch_drains_when_the_source_ends_and_refuses_a_closed_stream(setup):
    cfg, model, params, raw, samplers = setup
    ss = samplers[True]
    T = ss.layout.latents["audio"]
    audio = np.asarray(jax.random.normal(jax.random.key(3), (1, 5 * T, 128)))
    state = ss.start(params, jax.random.key(1), task="a2v", batch=1, raw_conds=raw, guidance={}, solver="renoise")
    chunks = list(ss.stream(params, state, given=({"audio": a} for a in latent_chunks(audio, T))))
    assert len(chunks) == 5 and state.chunk == 5 and not state.unfinished
    # closed after the fourth chunk (the fifth and sixth are in flight): the state is refused, not silently reused
    state = ss.start(params, jax.random.key(1), task="t2av", batch=1, raw_conds=raw, guidance={}, solver="renoise")
    it = ss.stream(params, state)
    for _ in range(4):
        next(it)
    it.close()
    assert state.unfinished
    with pytest.raises(ValueError, match="closed with chunks still in flight"):
        ss.step(params, state)
    # a wrong given chunk is named as in the sequential step
    state = ss.start(params, jax.random.key(1), task="a2v", batch=1, raw_conds=raw, guidance={})
    bad = [{"audio": a} for a in latent_chunks(audio, T)][:2] + [{"audio": audio[:, : T - 1]}]
    with pytest.raises(ValueError, match=r"given\['audio'\] chunk 2 has shape"):
        list(ss.stream(params, state, given=iter(bad)))


def test_fold_steps_is_a_bijection_and_config_is_checked(setup):
    cfg, model, params, raw, samplers = setup
    P, B, S = 2, 3, 4
    a = jnp.arange(S * 5 * P * B * 7, dtype=jnp.float32).reshape(S, 5, P * B, 7)
    folded = stream_batch.fold_steps(a, P, B, S)
    assert folded.shape == (5, P * S * B, 7)
    # row (p, j, b) of the folded entry is step j's row (p, b)
    np.testing.assert_array_equal(folded[:, (1 * S + 2) * B + 1], a[2, :, 1 * B + 1])
    np.testing.assert_array_equal(stream_batch.unfold_steps(folded, P, B, S), a)
    spread = stream_batch.spread_groups(jnp.arange(P * B, dtype=jnp.float32)[None, :, None], 1, P, B, S)
    np.testing.assert_array_equal(spread[0, (1 * S + 3) * B + 2, 0], 1 * B + 2)
    for field, value in (("sample.stream_cache", "clean"), ("sample.stream_positions", "absolute")):
        bad = config_lib.override(cfg.copy_and_resolve_references(), [f"{field}={value}", "sample.stream_batch=True"])
        with pytest.raises(ValueError, match=r"sample.stream_batch needs sample.stream_cache='per_step'"):
            StreamingSampler(model, bad)
