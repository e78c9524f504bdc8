"""``sample.solver`` (mmdit/sample/ode.py ``solver_update``): ``euler`` vs ``renoise`` in the ODE loop,
the bidirectional sampler and the streaming sampler; the streaming ``renoise`` chunk reproduces the
distillation's cached rollout (the rule and noise a student is trained with); bad values are named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from student_fixtures import four_chunk_student

from mmdit import config_lib, config_spec, tasks
from mmdit.sample import ode

FAST = {"xla_backend_optimization_level": 0}


def toy_velocity(x, sigma_tokens, i):
    """A velocity that depends on x and σ (so the solvers' paths differ)."""
    return {n: jnp.tanh(x[n]) * (1.0 + sigma_tokens[n][..., None]) for n in x}


def toy_noise():
    return {"a": jax.random.normal(jax.random.key(1), (2, 5, 3)), "b": jax.random.normal(jax.random.key(2), (2, 4, 1))}


def test_one_renoise_step_is_the_euler_step_and_more_steps_differ():
    noise, rng = toy_noise(), jax.random.key(7)
    one = jnp.asarray([1.0, 0.0])
    euler = ode.euler_sample(toy_velocity, noise, one)
    renoise = ode.renoise_sample(toy_velocity, noise, one, rng=rng)
    x0 = {n: noise[n] - 1.0 * toy_velocity(noise, {m: jnp.ones(noise[m].shape[:2]) for m in noise}, 0)[n] for n in noise}
    for n in noise:
        np.testing.assert_allclose(np.asarray(renoise[n]), np.asarray(euler[n]), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(euler[n]), np.asarray(x0[n]), rtol=0, atol=1e-6)  # x − σ·v
    three = ode.sampling_sigmas(3, 3.0)
    euler3 = ode.euler_sample(toy_velocity, noise, three)
    a = ode.renoise_sample(toy_velocity, noise, three, rng=rng)
    b = ode.renoise_sample(toy_velocity, noise, three, rng=rng)
    c = ode.renoise_sample(toy_velocity, noise, three, rng=jax.random.key(8))
    for n in noise:
        np.testing.assert_array_equal(np.asarray(a[n]), np.asarray(b[n]))  # deterministic for a fixed rng
        assert float(jnp.max(jnp.abs(a[n] - euler3[n]))) > 1e-2
        assert float(jnp.max(jnp.abs(a[n] - c[n]))) > 1e-2  # the fresh noise comes from rng


def test_renoise_update_is_x0_put_back_with_fresh_noise_and_known_tokens_are_held():
    x, v, eps = (jax.random.normal(jax.random.key(i), (1, 6, 2)) for i in range(3))
    got = ode.solver_update("renoise", x, v, 0.75, 0.25, eps)
    np.testing.assert_allclose(np.asarray(got), np.asarray(0.75 * (x - 0.75 * v) + 0.25 * eps), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ode.solver_update("euler", x, v, 0.75, 0.25)), np.asarray(x - 0.5 * v))
    known = {"a": jnp.asarray([[True, False, True, False, False]] * 2), "b": jnp.zeros((2, 4), bool)}
    values = {"a": jnp.full((2, 5, 3), 3.0), "b": jnp.zeros((2, 4, 1))}
    out = ode.renoise_sample(
        toy_velocity, toy_noise(), ode.sampling_sigmas(3), rng=jax.random.key(0), known=known, known_values=values
    )
    np.testing.assert_array_equal(np.asarray(out["a"][known["a"]]), 3.0)
    with pytest.raises(ValueError, match="sample.solver='heun'"):
        ode.solver_update("heun", x, v, 1.0, 0.0)


def test_bad_solver_is_named_in_config_and_overrides():
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.sample.sampler import Sampler

    cfg = config_lib.load("configs/demo.py:tiny")
    model = DiffusionModel.from_config(cfg)
    assert config_spec.sample_spec(cfg, model.spec).solver == "euler"  # base's default
    assert config_lib.load("configs/demo_distill.py:tiny").sample.solver == "renoise"
    cfg.sample.solver = "rk4"
    with pytest.raises(ValueError, match=r"sample.solver='rk4'.*\['euler', 'renoise'\]"):
        config_spec.sample_spec(cfg, model.spec)
    with pytest.raises(ValueError, match=r"sample.solver='rk4'"):
        Sampler(model, cfg)
    cfg.sample.solver = "euler"
    with pytest.raises(ValueError, match=r"sample.solver='midpoint'"):
        Sampler(model, cfg).sample(None, jax.random.key(0), task="t2av", batch=1, raw_conds={}, solver="midpoint")


@pytest.fixture(scope="module")
def student():
    """The tiny chunk-causal student (configs/demo_distill.py:tiny) cut into 4 chunks of 2 frames,
    with perturbed params (velocities far from 0) and random text."""
    cfg, model, params = four_chunk_student()
    raw = model.input_spec().zero_conditions(1)
    raw = {
        k: jax.random.randint(jax.random.key(9), v.shape, 1, 255).astype(v.dtype) if v.dtype == jnp.int32 else v
        for k, v in raw.items()
    }
    return cfg, model, params, raw


@pytest.mark.slow
def test_bidirectional_sampler_one_step_renoise_equals_euler(student):
    from mmdit.sample.sampler import Sampler

    cfg, model, params, raw = student
    sampler = Sampler(model, cfg, compiler_options=FAST)
    run = lambda steps, solver, seed=3: sampler.sample(  # noqa: E731
        params, jax.random.key(seed), task="t2av", batch=1, raw_conds=raw, steps=steps, solver=solver
    )
    e1, r1 = run(1, "euler"), run(1, "renoise")
    for n in e1:
        np.testing.assert_allclose(np.asarray(r1[n]), np.asarray(e1[n]), rtol=0, atol=1e-6)
    e2, r2, r2_again = run(2, "euler"), run(2, "renoise"), run(2, "renoise")
    for n in e2:
        assert float(jnp.max(jnp.abs(r2[n] - e2[n]))) > 1e-3
        np.testing.assert_array_equal(np.asarray(r2[n]), np.asarray(r2_again[n]))


@pytest.mark.slow
@pytest.mark.parametrize("task", ["t2av", "a2v"])
def test_streaming_renoise_reproduces_the_cached_distill_rollout(student, task):
    """StreamingSampler(solver="renoise") chunk by chunk == CachedRollout.sample at the last exit step
    (same cache mode and positions: the student config's), fed the same starting noise; the fresh
    noise is the same ode.chunk_noise draw in both."""
    from mmdit.distill.cached_rollout import CachedRollout
    from mmdit.sample.streaming import StreamingSampler

    cfg, model, params, raw = student
    ss = StreamingSampler(model, cfg, compiler_options=FAST)
    state = ss.start(params, jax.random.key(5), task=task, batch=1, raw_conds=raw, guidance={}, solver="renoise")
    assert state.solver == "renoise" and state.needs == (("audio",) if task == "a2v" else ())
    clean = model.tokens(
        {
            a.name: jax.random.normal(jax.random.key(2 + i), (1,) + tuple(a.geometry.latent_shape))
            for i, a in enumerate(model.spec.streams)
        }
    )
    order, T = sorted(ss.generated), ss.layout.tokens
    outs = []
    for c in range(ss.layout.clip_chunks):
        noise = {n: ode.chunk_noise(state.rng, c, 0, order.index(n), (1, T[n], clean[n].shape[2])) for n in order}
        given = None
        if task == "a2v":
            given = {"audio": ss.model.latents({"audio": clean["audio"][:, c * T["audio"] : (c + 1) * T["audio"]]})["audio"]}
        out, state = ss.step(params, state, given, noise=noise)
        outs.append(ss.model.tokens(out))
    streamed = {n: jnp.concatenate([o[n] for o in outs], axis=1) for n in order}
    assert ss.compilations == 1

    steps = state.sigmas[order[0]][:-1]
    step_list = tuple(float(s) for s in steps)
    masks = tasks.task_masks(task, jax.random.key(0), model.spec, 1, cfg.model)
    keep = {c: jnp.ones((1,), bool) for c in model.spec.keep_names}
    rollout = CachedRollout(model, cfg)
    assert (rollout.cache_mode, rollout.positions) == (ss.cache_mode, ss.positions)
    ref = jax.jit(
        lambda p: rollout.sample(
            p, state.rng, clean, masks, raw, keep, step_list, exit_step=len(step_list) - 1, teacher_forced=False
        )
    )(params)
    for n in order:
        assert float(jnp.std(ref[n])) > 0.1
        np.testing.assert_allclose(np.asarray(streamed[n]), np.asarray(ref[n]), rtol=0, atol=2e-5)
    if task == "a2v":
        np.testing.assert_array_equal(np.asarray(streamed["audio"]), np.asarray(clean["audio"]))


def test_streaming_draws_its_noise_inside_and_euler_is_the_default(student):
    """The jitted chunk's own noise is bit-identical to ``ss.noise(state, c)`` passed in (one executable
    for both); ``solver=None`` takes the config's; a given stream the task does not take is refused."""
    from mmdit.sample.streaming import StreamingSampler

    cfg, model, params, raw = student
    ss = StreamingSampler(model, cfg, compiler_options=FAST)
    state = ss.start(params, jax.random.key(5), task="t2av", batch=1, raw_conds=raw, guidance={})
    assert state.solver == "renoise"  # demo_distill's sample.solver
    cache = jax.tree.map(np.asarray, state.cache)
    drawn, _ = ss.step(params, state)
    state.cache = jax.tree.map(jnp.asarray, cache)
    given, _ = ss.step(params, state, noise=ss.noise(state, 0))
    for n in drawn:
        np.testing.assert_array_equal(np.asarray(drawn[n]), np.asarray(given[n]))
    assert ss.compilations == 1
    audio = jnp.zeros((1,) + tuple(ss.spec.stream("audio").geometry.latent_shape))
    with pytest.raises(ValueError, match="takes no given 'audio'"):
        ss.step(params, state, {"audio": audio})
