"""Few-step DMD distillation (mmdit/distill): the losses on analytic toys, the frozen teacher, a bad
teacher refused, and the tiny config end to end through the CLI (SIGKILL-resume, export, sample)."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from student_fixtures import four_chunk_student

from mmdit import config_lib
from mmdit.distill import losses, ode_pairs
from mmdit.distill.spec import distill_spec
from mmdit.model.spec import build_spec

# ------------------------------------------------------------------------------------------------
# 1-D Gaussian toys with analytic scores


def gaussian_x0(x_t, sigma, mean, std):
    """E[x0 | x_t] for x0 ~ N(mean, std²) and x_t = (1 − σ)·x0 + σ·ε (the exact clean prediction)."""
    a = 1.0 - sigma
    gain = a * std**2 / (a**2 * std**2 + sigma**2)
    return mean + gain * (x_t - a * mean)


def kl_gauss(m1, s1, m2, s2):
    """KL(N(m1, s1²) || N(m2, s2²))."""
    return jnp.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


def dmd_toy_kl_trajectory(flip: bool, steps: int = 40, lr: float = 0.2):
    """Trains a generator ``x = θ_m + exp(θ_s)·z`` with the DMD loss against a teacher N(2, 0.5²); the
    fake score is the generator's own distribution (an ideal critic). Returns the KL per step."""
    teacher_mean, teacher_std = 2.0, 0.5
    theta = jnp.array([-1.0, jnp.log(1.5)])

    def loss(theta, key):
        kz, ks, kn = jax.random.split(key, 3)
        z = jax.random.normal(kz, (1, 2048, 1))
        x = theta[0] + jnp.exp(theta[1]) * z
        sigma = jax.random.uniform(ks, (), minval=0.05, maxval=0.95)
        x_t = (1 - sigma) * jax.lax.stop_gradient(x) + sigma * jax.random.normal(kn, x.shape)
        real = gaussian_x0(x_t, sigma, teacher_mean, teacher_std)
        fake = gaussian_x0(x_t, sigma, jax.lax.stop_gradient(theta[0]), jax.lax.stop_gradient(jnp.exp(theta[1])))
        if flip:
            real, fake = fake, real
        value, _ = losses.dmd_generator_loss({"s": x}, {"s": real}, {"s": fake})
        return value

    grad = jax.jit(jax.grad(loss))
    kls = []
    for i in range(steps):
        kls.append(float(kl_gauss(theta[0], jnp.exp(theta[1]), teacher_mean, teacher_std)))
        theta = theta - lr * grad(theta, jax.random.key(i))
    kls.append(float(kl_gauss(theta[0], jnp.exp(theta[1]), teacher_mean, teacher_std)))
    return kls


def test_dmd_moves_the_student_towards_the_teacher():
    kls = dmd_toy_kl_trajectory(flip=False)
    assert kls[-1] < 0.1 * kls[0], kls[::10]
    assert sum(b < a for a, b in zip(kls, kls[1:])) >= 0.9 * (len(kls) - 1)  # (stochastic σ: nearly monotone)


def test_dmd_with_the_scores_swapped_moves_away():
    kls = dmd_toy_kl_trajectory(flip=True, steps=4)
    assert kls[-1] > 2 * kls[0], kls


def test_dmd_gradient_is_the_normalised_score_difference():
    """d loss / d x = (x0_fake − x0_real) / mean|x − x0_real| / (elements per sample · B), per sample,
    supervised tokens only (known tokens get no gradient and do not enter the normaliser)."""
    k = jax.random.split(jax.random.key(0), 3)
    B, S, C = 2, 6, 3
    x = {"a": jax.random.normal(k[0], (B, S, C))}
    real = {"a": jax.random.normal(k[1], (B, S, C))}
    fake = {"a": 3.0 * jax.random.normal(k[2], (B, S, C))}
    known = {"a": jnp.zeros((B, S), bool).at[1, :2].set(True)}
    g = jax.grad(lambda x: losses.dmd_generator_loss(x, real, fake, known)[0])(x)["a"]
    for b in range(B):
        sup = ~np.asarray(known["a"][b])
        norm = np.mean(np.abs(np.asarray(x["a"][b] - real["a"][b]))[sup])
        expect = (np.asarray(fake["a"][b] - real["a"][b]) / norm)[sup] / (sup.sum() * C * B)
        np.testing.assert_allclose(np.asarray(g[b])[sup], expect, rtol=1e-5, atol=1e-7)
        assert np.all(np.asarray(g[b])[~sup] == 0)


def test_every_distill_loss_weighs_the_key_frame_as_the_teachers_training():
    """``token_weights`` (``flow.first_frame_weight`` via ``first_frame_weights``) scale each token's share of
    the DMD gradient, the critic's and the regression loss exactly as in training's flow loss."""
    from mmdit.train.step import first_frame_weights

    k = jax.random.split(jax.random.key(1), 3)
    B, S, C, w = 2, 6, 3, 16.0
    x = {"a": jax.random.normal(k[0], (B, S, C))}
    real = {"a": jax.random.normal(k[1], (B, S, C))}
    fake = {"a": jax.random.normal(k[2], (B, S, C))}
    weights = {"a": jnp.asarray([w] + [1.0] * (S - 1))}
    g1 = jax.grad(lambda x: losses.dmd_generator_loss(x, real, fake)[0])(x)["a"]
    gw = jax.grad(lambda x: losses.dmd_generator_loss(x, real, fake, token_weights=weights)[0])(x)["a"]
    ratio = np.asarray(gw / g1)  # per token: w_t / mean(w) of the sample, times S / S
    np.testing.assert_allclose(ratio[:, 0] / ratio[:, 1:].mean(axis=1), w, rtol=1e-4)
    # an error on token 0 alone: weight w of (w + S - 1) instead of 1 of S
    err = {"a": jnp.zeros((B, S, C)).at[:, 0].set(1.0)}
    zero = {"a": jnp.zeros((B, S, C))}
    reg, _ = losses.regression_loss(err, zero, token_weights=weights)
    np.testing.assert_allclose(float(reg), w / (w + S - 1), rtol=1e-6)
    critic, _ = losses.fake_score_loss({"a": err["a"] - 1.0}, zero, {"a": -jnp.ones((B, S, C))}, token_weights=weights)
    np.testing.assert_allclose(float(critic), w / (w + S - 1), rtol=1e-6)  # target noise − x = −1, prediction off at token 0
    # the distill step builds the same weights as training from the config (the tiny demo: residual codec, 16)
    spec = build_spec(config_lib.load("configs/demo.py:tiny").model)
    tw = first_frame_weights(spec, 16.0)
    g = spec.stream("video").geometry
    assert set(tw) == {"video"} and tw["video"][: g.tokens_per_frame].tolist() == [16.0] * g.tokens_per_frame
    assert first_frame_weights(spec, 1.0) is None


def test_regression_loss_is_zero_for_the_teacher_ode_map():
    """Teacher ODE pairs on a Gaussian toy: a student whose clean prediction at each recorded state
    is the teacher's ODE map from that state has regression loss 0; a one-step student does not."""
    mean, std = 1.5, 0.3
    sigmas, positions = ode_pairs.merged_schedule(6, 3.0, (1.0, 0.75))
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and [float(sigmas[p]) for p in positions] == [1.0, 0.75]

    def velocity(x, sigma):
        return {n: (x[n] - gaussian_x0(x[n], sigma[n][..., None], mean, std)) / sigma[n][..., None] for n in x}

    noise = {"a": jax.random.normal(jax.random.key(1), (2, 8, 1))}
    known = {"a": jnp.zeros((2, 8), bool)}
    states, endpoint = ode_pairs.ode_pair(velocity, noise, noise, known, sigmas, positions)
    np.testing.assert_array_equal(np.asarray(states[0]["a"]), np.asarray(noise["a"]))
    for k, pos in enumerate(positions):
        # the ODE map from state k: the same Euler steps from its σ on
        _, from_k = ode_pairs.ode_pair(velocity, states[k], states[k], known, sigmas[pos:], [0])
        exact, _ = losses.regression_loss(from_k, endpoint, known)
        assert float(exact) < 1e-10
        sigma_k = {"a": jnp.full((2, 8), float(sigmas[pos]))}
        one_step = losses.clean_prediction(states[k], velocity(states[k], sigma_k), sigma_k)
        off, _ = losses.regression_loss(one_step, endpoint, known)
        assert float(off) > 1e-4


def test_bad_distill_fields_are_named():
    cfg = config_lib.load("configs/demo_distill.py:tiny")
    cfg.distill.teacher = "somewhere"
    assert distill_spec(cfg).denoising_step_list == (1.0, 0.75)
    for field, value, words in [
        ("rollout", "both", "self, teacher_forced"),
        ("denoising_step_list", (0.5, 0.75), "descending from 1.0"),
        ("tasks", {"tv2a": 1.0}, "t2av, a2v"),
    ]:
        bad = config_lib.load("configs/demo_distill.py:tiny")
        bad.distill.teacher = "somewhere"
        bad.distill[field] = value
        with pytest.raises(ValueError, match=f"distill.{field}") as e:
            distill_spec(bad)
        assert words in str(e.value)


# ------------------------------------------------------------------------------------------------
# the step on the tiny models


@pytest.mark.slow
def test_frozen_teacher_is_bit_identical_and_student_and_critic_update():
    from mmdit import config_spec
    from mmdit.distill import state as state_lib
    from mmdit.distill.step import make_step
    from mmdit.model.diffusion import DiffusionModel

    cfg = config_lib.load("configs/demo_distill.py:tiny")
    cfg.distill.teacher = "in-memory"
    teacher_cfg = config_lib.load("configs/demo.py:tiny,plain")
    dspec = distill_spec(cfg)
    student, teacher = DiffusionModel.from_config(cfg), DiffusionModel.from_config(teacher_cfg)
    s_tx, c_tx = state_lib.make_optimizers(config_spec.train_spec(cfg), dspec.critic_lr)
    teacher_params = nn.unbox(teacher.init(jax.random.key(0)))
    before = jax.tree.map(np.array, teacher_params)
    state = state_lib.assemble(teacher_params, s_tx, c_tx, jax.random.key(1))
    batch = {
        k: jax.random.normal(jax.random.key(2), s.shape) if s.dtype == np.float32 else jnp.zeros(s.shape, s.dtype)
        for k, s in student.input_spec().batch_shapes(2).items()
    }
    opts = {"xla_backend_optimization_level": 0}
    fns = {
        g: jax.jit(make_step(student, teacher, cfg, teacher_cfg, dspec, s_tx, c_tx, generator=g), donate_argnums=(0,))
        .lower(state, teacher_params, batch)
        .compile(compiler_options=opts)
        for g in (True, False)
    }
    for _ in range(2):  # the first update runs at lr 0 (warmup from 0)
        state, gen_metrics = fns[True](state, teacher_params, batch)
        state, critic_metrics = fns[False](state, teacher_params, batch)
    assert int(state.step) == 2 and int(state.student.step) == 2
    for m in (gen_metrics, critic_metrics):
        assert all(np.isfinite(float(v)) for v in m.values()), m
    assert gen_metrics["gen/regression_loss"] > 0 and gen_metrics["gen/grad_norm"] > 0
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, np.asarray(b))), before, teacher_params)
    assert all(jax.tree.leaves(same))  # the teacher: bit-identical
    changed = lambda tree: sum(
        not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(tree))
    )  # noqa: E731
    n = len(jax.tree.leaves(before))
    assert changed(state.student.params) > n // 2 and changed(state.critic.params) > n // 2


def test_the_real_score_is_guided_only_inside_the_teachers_interval():
    """``distill.guidance_interval`` (None: the teacher's ``sample.guidance_interval``) gates the teacher's CFG by
    the σ each sample is queried at: a sample re-noised above ``lo`` gets the guided velocity, one below it
    the conditional one (nested CFG at scale 1), in one batch; the full interval guides both."""
    from mmdit import tasks
    from mmdit.distill.step import guided_teacher
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.sample.sampler import Sampler

    teacher_cfg = config_lib.load("configs/demo.py:tiny")
    assert tuple(teacher_cfg.sample.guidance_interval) == (0.5, 1.0)
    teacher = DiffusionModel.from_config(teacher_cfg)
    params = nn.unbox(teacher.init(jax.random.key(0)))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)
    B = 2
    masks = tasks.task_masks("t2av", jax.random.key(0), teacher.spec, B, teacher_cfg.model)
    tokens = teacher.tokens(
        {
            a.name: jax.random.normal(jax.random.key(3 + i), (B,) + tuple(a.geometry.latent_shape))
            for i, a in enumerate(teacher.spec.streams)
        }
    )
    per_sample = jnp.asarray([0.8, 0.3])  # sample 0 inside (0.5, 1], sample 1 below it
    sigma = {n: jnp.broadcast_to(per_sample[:, None], tokens[n].shape[:2]) for n in tokens}
    raw = teacher.input_spec().zero_conditions(B)
    sampler = Sampler(teacher, teacher_cfg)
    full = sampler.resolve_guidance(None, interval=(0.0, 1.0))
    assert full.conditions == ["text", "joint"]
    guided = sampler.guided_velocity(params, tokens, sigma, raw, masks, full)
    conditional = sampler.guided_velocity(params, tokens, sigma, raw, masks, full, {c: 1.0 for c in full.scales})
    got = guided_teacher(teacher, teacher_cfg, None)(params, tokens, sigma, raw, masks)
    every = guided_teacher(teacher, teacher_cfg, None, (0.0, 1.0))(params, tokens, sigma, raw, masks)
    for n in tokens:
        assert float(jnp.max(jnp.abs(guided[n] - conditional[n]))) > 1e-3  # guidance matters here
        np.testing.assert_allclose(got[n][0], guided[n][0], atol=1e-5)
        np.testing.assert_allclose(got[n][1], conditional[n][1], atol=1e-5)
        np.testing.assert_allclose(every[n], guided[n], atol=1e-5)


def test_a_bad_distill_guidance_interval_is_named():
    cfg = config_lib.load("configs/demo_distill.py:tiny")
    cfg.distill.teacher = "somewhere"
    assert distill_spec(cfg).guidance_interval is None
    cfg.distill.guidance_interval = (0.2, 0.9)
    assert distill_spec(cfg).guidance_interval == (0.2, 0.9)
    cfg.distill.guidance_interval = (0.9, 0.2)
    with pytest.raises(ValueError, match=r"distill.guidance_interval.*0 <= lo < hi"):
        distill_spec(cfg)


# ------------------------------------------------------------------------------------------------
# CLI: a bad teacher, and the tiny run end to end


def run(args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=1800, **kw)


def tree_snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def test_a_teacher_with_other_streams_is_refused_and_the_workdir_untouched(tmp_path):
    teacher_cfg = config_lib.load("configs/demo.py:tiny,plain")
    teacher_cfg.model.streams.audio.channels = 64
    del teacher_cfg.model.streams["video"]
    teacher_cfg.model.roles.visual = "audio"
    teacher = tmp_path / "teacher"
    config_lib.write_resolved(teacher_cfg, str(teacher))
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    snapshot = tree_snapshot(work)
    out = run(
        ["-m", "mmdit.cli.main", "distill", "--config", "configs/demo_distill.py:tiny", "--teacher", str(teacher)]
        + ["--workdir", str(work), "--no-progress"]
    )
    assert out.returncode == 2, out.stderr[-2000:]
    msg = out.stderr
    assert "does not match the student" in msg
    assert "model.streams.audio.channels: teacher 64, student 128" in msg
    assert "model.streams.video" in msg
    assert tree_snapshot(work) == snapshot


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from mmdit import config_spec
    from mmdit.distill.loop import distill
    cfg = config_spec.load(sys.argv[1], sys.argv[5:])
    kill_at = int(sys.argv[4])
    def hook(done, state):
        if done == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    distill(cfg, sys.argv[2], data_dir=sys.argv[3], progress=False, iteration_hook=hook)
    """
)

# checkpoint_every=3 is not a multiple of critic_steps=2: the resumed run starts on a critic-only iteration
DISTILL_OVERRIDES = ["train.steps=5", "train.checkpoint_every=3", "train.async_checkpoint=False", "distill.critic_steps=2"]


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_tiny_distill_end_to_end_resume_export_sample(tmp_path):
    from mmdit.data.synth_records import synth

    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    teacher = tmp_path / "teacher"
    synth(untrained_teacher(teacher), str(teacher / "data"), num_eval=2, progress=False)
    data = str(teacher / "data" / "train")
    sets = sum([["--set", o] for o in DISTILL_OVERRIDES], [])
    cli = ["-m", "mmdit.cli.main", "distill", "--config", "configs/demo_distill.py:tiny", "--teacher", str(teacher)]
    full = run(cli + ["--workdir", str(tmp_path / "a"), "--data", data, "--no-progress"] + sets, env=env)
    assert full.returncode == 0, full.stderr[-3000:]

    script = tmp_path / "kill_distill.py"
    script.write_text(KILL_SCRIPT)
    b = tmp_path / "b"
    killed = run(
        [str(script), "configs/demo_distill.py:tiny", str(b), data, "4", f"distill.teacher={teacher}", *DISTILL_OVERRIDES],
        env=env,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [m["step"] for m in metrics(b)] == [1, 2, 3, 4] and os.path.isdir(b / "checkpoints" / "3")
    resumed = run(cli + ["--workdir", str(b), "--data", data, "--no-progress"] + sets, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 3" in resumed.stdout
    ma, mb = metrics(tmp_path / "a"), metrics(b)
    assert [m["step"] for m in mb] == [1, 2, 3, 4, 5]
    # generator metrics only on the iterations that ran the generator (0, 2, 4: steps 1, 3, 5)
    assert [m["step"] for m in ma if "gen/loss" in m] == [1, 3, 5]
    for x, y in zip(ma, mb):
        assert set(x) == set(y), x["step"]
        for key in set(x) - {"steps_per_sec"}:
            assert x[key] == y[key], (x["step"], key, x[key], y[key])  # exact on CPU
    assert ma[-1]["critic/loss"] > 0 and ma[-1]["gen/dmd_loss"] > 0

    student = tmp_path / "a" / "student"
    assert json.loads((student / "config.json").read_text())["sample"]["steps"] == 2
    bundle = tmp_path / "bundle"
    exported = run(["-m", "mmdit.cli.main", "export", "--workdir", str(student), "--out", str(bundle)], env=env)
    assert exported.returncode == 0, exported.stderr[-3000:]
    sampled = run(
        ["-m", "mmdit.cli.main", "sample", "--bundle", str(bundle), "--task", "t2av", "--text", "hello"]
        + ["--out", str(tmp_path / "samples")],
        env=env,
    )
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert any(f.endswith(".mp4") for f in os.listdir(tmp_path / "samples"))


def test_plan_counts_three_param_sets_and_two_optimizer_states():
    from mmdit.train.plan import parse_topology, plan

    topo = parse_topology("8xH100")
    student = plan(config_lib.load("configs/demo_distill.py"), topo, compile_=False, check=False)
    trained = plan(config_lib.load("configs/demo.py:plain"), topo, compile_=False, check=False)
    parts = student["estimate"]["parts_gb"]
    for name in ("teacher_params", "critic_params"):
        assert parts[name] == parts["params"]
    assert parts["critic_optimizer"] == parts["optimizer"] > 0
    assert student["distill"]["rollout_passes"] == 7 * 2  # 7 chunks of 7 frames, 2 steps
    assert student["estimate"]["total_gb"] > trained["estimate"]["total_gb"] + 2 * parts["params"]


def untrained_teacher(workdir, cfg_path="configs/demo.py:tiny,plain"):
    """A teacher workdir without training: config.json + a step-0 checkpoint of freshly initialised
    params (what restore_inference reads), so tests need not compile a train step."""
    from mmdit import config_spec
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.train import checkpoint
    from mmdit.train.state import init_state, make_optimizer

    cfg = config_lib.load(cfg_path)
    config_lib.write_resolved(cfg, str(workdir))
    model = DiffusionModel.from_config(cfg)
    state = init_state(model, make_optimizer(config_spec.train_spec(cfg)), jax.random.key(0))
    manager = checkpoint.make_manager(str(workdir), config_spec.train_spec(cfg))
    checkpoint.save(manager, 0, state)
    checkpoint.finish(manager)
    return cfg


@pytest.mark.slow
def test_prepared_pairs_feed_the_regression_loss(tmp_path):
    from mmdit.data import records
    from mmdit.data.synth_records import synth
    from mmdit.distill.loop import distill, eval_dir_for
    from mmdit.distill.prepare import prepare_pairs

    teacher_cfg = untrained_teacher(tmp_path / "teacher")
    synth(teacher_cfg, str(tmp_path / "data"), num=4, num_eval=1, progress=False)
    cfg = config_lib.override(
        config_lib.load("configs/demo_distill.py:tiny"),
        [f"distill.teacher={tmp_path / 'teacher'}", "distill.regression_pairs=records", "train.steps=2"]
        + ["train.async_checkpoint=False", "distill.critic_steps=1", "data.examples_per_shard=4"],
    )
    manifest = prepare_pairs(cfg, str(tmp_path / "data" / "train"), str(tmp_path / "pairs"), batch=3, progress=False)
    assert manifest["num_examples"] == 4
    # the loop's TensorBoard samples find the eval records beside the records the pairs came from
    assert manifest["metadata"]["distill_pairs"]["source"] == str(tmp_path / "data" / "train")
    assert eval_dir_for(str(tmp_path / "w"), str(tmp_path / "pairs")) == str(tmp_path / "data" / "eval")
    ds = records.open_dataset(str(tmp_path / "pairs"))
    assert sorted(manifest["metadata"]["distill_pairs"]["tasks"]) == ["a2v", "t2av"]  # the tiny config's distill.tasks
    ex = ds[3]
    for task, streams in (("t2av", ("video", "audio")), ("a2v", ("video",))):
        for s in streams:
            noise, state1, target = (np.asarray(ex[f"ode_{task}_{f}_{s}"]) for f in ("state0", "state1", "target"))
            assert noise.shape == target.shape == state1.shape and np.all(np.isfinite(target))
            assert 0.8 < noise.std() < 1.2 and not np.allclose(state1, noise) and not np.allclose(target, noise)
    assert not [k for k in ex if k.startswith("ode_a2v_") and k.endswith("_audio")]  # a2v's audio is given, not paired
    assert not np.allclose(ex["ode_a2v_target_video"], ex["ode_t2av_target_video"])  # its own ODE, to the given audio
    last = distill(
        cfg,
        str(tmp_path / "run"),
        data_dir=str(tmp_path / "pairs"),
        progress=False,
        compiler_options={"xla_backend_optimization_level": 0},
    )
    assert np.isfinite(last["gen/regression_loss"]) and last["gen/regression_loss"] > 0


def test_prepared_pairs_are_read_per_sample_for_the_task_it_drew():
    """Records mode: a sample reads the pair of its drawn task; a stream its task gives (a2v's audio) is its clean
    tokens, as the ODE held it; the fields :func:`pair_fields` lists are exactly those read."""
    from mmdit.distill import ode_pairs
    from mmdit.model.diffusion import DiffusionModel

    cfg = config_lib.load("configs/demo_distill.py:tiny")
    spec = DiffusionModel.from_config(cfg).spec
    assert ode_pairs.paired_streams(spec, "t2av", cfg.model) == ("audio", "video")
    assert ode_pairs.paired_streams(spec, "a2v", cfg.model) == ("video",)
    names, K, B = ["t2av", "a2v"], 2, 2
    fields = ode_pairs.pair_fields(spec, names, K, cfg.model)
    rng = np.random.default_rng(0)
    shapes = {a.name: (B, a.geometry.num_tokens, a.geometry.token_dim) for a in spec.streams if a.name in spec.generated}
    batch = {f: rng.normal(size=shapes[f.rsplit("_", 1)[1]]).astype(np.float32) for f in fields}
    clean = {n: rng.normal(size=shp).astype(np.float32) for n, shp in shapes.items()}
    states, endpoint = ode_pairs.pairs_of_batch(spec, batch, clean, np.array([0, 1]), names, K, cfg.model)
    np.testing.assert_array_equal(endpoint["video"][0], batch["ode_t2av_target_video"][0])
    np.testing.assert_array_equal(endpoint["audio"][0], batch["ode_t2av_target_audio"][0])
    np.testing.assert_array_equal(endpoint["video"][1], batch["ode_a2v_target_video"][1])
    np.testing.assert_array_equal(endpoint["audio"][1], clean["audio"][1])
    with pytest.raises(KeyError, match="ode_a2v_target_video"):  # a task that can be drawn needs its pairs
        ode_pairs.pairs_of_batch(spec, {k: v for k, v in batch.items() if "a2v" not in k}, clean, np.array([0, 0]), names, K)
    only_t2av = {k: v for k, v in batch.items() if "a2v" not in k}  # a2v at weight 0: never drawn, no fields needed
    ode_pairs.pairs_of_batch(spec, only_t2av, clean, np.array([0, 0]), names, K, cfg.model, drawn=["t2av"])
    for k in range(K):
        np.testing.assert_array_equal(states[k]["video"][1], batch[f"ode_a2v_state{k}_video"][1])
        np.testing.assert_array_equal(states[k]["audio"][0], batch[f"ode_t2av_state{k}_audio"][0])
        np.testing.assert_array_equal(states[k]["audio"][1], clean["audio"][1])


def reference_frame_student(teacher):
    """``configs/demo_distill.py:tiny,full``: the twin of the default tiny demo, with its derived ``first_frame``
    condition, joint guidance's keep-name ``joint`` (the student still samples without CFG), the residual codec and
    x-prediction."""
    cfg = config_lib.load("configs/demo_distill.py:tiny,full")
    assert cfg.model.prediction == "x0" and cfg.codecs.video.residual_gain
    return config_lib.override(
        cfg,
        [f"distill.teacher={teacher}", "train.steps=2", "train.async_checkpoint=False", "distill.critic_steps=1"]
        + ["data.examples_per_shard=4"],
    )


@pytest.mark.slow
def test_a_teacher_with_a_reference_frame_and_joint_guidance_distils(tmp_path):
    """The default tiny demo (derived ``first_frame`` + joint guidance, residual codec, x0) as the teacher: two DMD + regression
    iterations run end to end on the KV-cached rollouts. In the distill tasks (t2av, a2v) the first frame is
    never given: ``first_frame`` is absent (dropped) and zeros in every pass, as in training; cross-stream
    attention (``joint``) is kept in every pass, and only the teacher is guided by it."""
    from mmdit import tasks
    from mmdit.data.synth_records import synth
    from mmdit.distill.cached_rollout import CachedRollout
    from mmdit.distill.loop import distill
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.sample.sampler import Sampler

    teacher_cfg = untrained_teacher(tmp_path / "teacher", "configs/demo.py:tiny")
    assert teacher_cfg.model.conditions.first_frame.derived == "first_frame" and teacher_cfg.model.joint_guidance
    cfg = reference_frame_student(tmp_path / "teacher")
    teacher, student = DiffusionModel.from_config(teacher_cfg), DiffusionModel.from_config(cfg)
    assert Sampler(teacher, teacher_cfg).resolve_guidance(None).conditions == ["text", "joint"]  # the real score's CFG
    assert Sampler(student, cfg).resolve_guidance(None).conditions == []  # the student: no CFG

    B = 4
    tm = tasks.sample_tasks(jax.random.key(0), student.spec, B, dict(t2av=0.5, a2v=0.5), cfg.model)
    assert not np.any(np.asarray(tm.present["first_frame"])) and np.all(np.asarray(tm.present["joint"]))
    params = nn.unbox(student.init(jax.random.key(0)))
    clean = student.tokens({a.name: jnp.ones((B,) + tuple(a.geometry.latent_shape)) for a in student.spec.streams})
    given = {n: jnp.where(tm.known[n][..., None], clean[n], 0.0) for n in student.spec.generated}
    cached = CachedRollout(student, cfg)
    conds, _ = cached.conditions(params, student.input_spec().zero_conditions(B), given)
    assert conds["first_frame"].shape[1] == cached.layout.tokens["video"] < clean["video"].shape[1]  # one chunk's
    assert not np.any(np.asarray(conds["first_frame"]))  # no sample gives its video's first frame

    synth(teacher_cfg, str(tmp_path / "data"), num=4, num_eval=0, progress=False)
    last = distill(
        cfg,
        str(tmp_path / "run"),
        data_dir=str(tmp_path / "data" / "train"),
        progress=False,
        compiler_options={"xla_backend_optimization_level": 0},
    )
    for key in ("gen/dmd_loss", "gen/regression_loss", "critic/loss"):
        assert np.isfinite(last[key]) and last[key] > 0, (key, last)
    assert (tmp_path / "run" / "student" / "checkpoints" / "2").is_dir()


# ------------------------------------------------------------------------------------------------
# the distill section's defaults (configs/base.py), the logging rule, the warm-up and student_init


def test_distill_defaults_live_in_base_and_overrides_are_checked():
    from mmdit import config_spec
    from mmdit.train.plan import distill_estimate

    base = config_lib.load("configs/base.py").distill
    assert base.teacher is None and base.critic_steps == 5 and base.student_init is None
    cfg = config_spec.load("configs/demo_distill.py:tiny", ["distill.teacher=T", "distill.tasks.a2v=1.0"])
    d = distill_spec(cfg)
    assert d.tasks == (("a2v", 1.0), ("t2av", 0.5)) and d.dmd_sigma_max == base.dmd_sigma_max  # a base default
    only_a2v = config_spec.load("configs/demo_distill.py:tiny", ["distill.teacher=T", "distill.tasks={'a2v': 1.0}"])
    assert distill_spec(only_a2v).tasks == (("a2v", 1.0),)  # base's t2av is not merged into a named mapping
    with pytest.raises(KeyError, match="distill.critic_step"):
        config_spec.load("configs/demo_distill.py:tiny", ["distill.critic_step=3"])
    trained = config_spec.load("configs/demo.py:tiny,plain")  # a training config: base's section, no teacher
    with pytest.raises(ValueError, match="distill.teacher"):
        distill_spec(trained)
    assert distill_estimate(trained, None, None) is None  # mmdit-plan: not a distillation config


@pytest.mark.parametrize(
    "log_every, critic_steps, dmd_weight, end, logged",
    [
        (1, 2, 1.0, 9, [1, 3, 5, 7, 9]),  # every generator iteration
        (10, 5, 1.0, 30, [6, 16, 26]),  # the last generator iteration of each window
        (4, 3, 1.0, 10, [4, 7, 10]),  # windows (0, 4], (4, 8], (8, 10]: generator at 1, 4, 7, 10
        (5, 3, 0.0, 10, [5, 10]),  # the warm-up: every iteration runs the generator
    ],
)
def test_generator_metrics_are_logged_once_per_window_at_generator_iterations(log_every, critic_steps, dmd_weight, end, logged):
    from mmdit.distill.loop import logs_generator

    cfg = config_lib.override(
        config_lib.load("configs/demo_distill.py:tiny"),
        ["distill.teacher=T", f"distill.critic_steps={critic_steps}", f"distill.dmd_weight={dmd_weight}"],
    )
    d = distill_spec(cfg)
    ran = [it + 1 for it in range(end) if d.runs_generator(it)]
    assert [done for done in ran if logs_generator(done, log_every, d, end)] == logged


WARMUP_OVERRIDES = ["train.steps=2", "train.async_checkpoint=False", "train.sample_every=2", "data.examples_per_shard=4"]


@pytest.fixture(scope="module")
def warmup_run(tmp_path_factory):
    """A tiny regression-only warm-up (``demo_distill.py:tiny,warmup``, 2 iterations) from an untrained
    teacher, on the ODE pairs ``prepare`` wrote (the variant's ``regression_pairs="records"``) beside the
    eval records (for the TensorBoard samples)."""
    from mmdit.data.synth_records import synth
    from mmdit.distill.loop import distill
    from mmdit.distill.prepare import prepare_pairs

    root = tmp_path_factory.mktemp("warmup")
    teacher_cfg = untrained_teacher(root / "teacher")
    synth(teacher_cfg, str(root / "data"), num=4, num_eval=1, progress=False)
    cfg = config_lib.override(
        config_lib.load("configs/demo_distill.py:tiny,warmup"), [f"distill.teacher={root / 'teacher'}", *WARMUP_OVERRIDES]
    )
    assert cfg.distill.regression_pairs == "records"
    prepare_pairs(cfg, str(root / "data" / "train"), str(root / "data" / "pairs"), batch=4, progress=False)
    opts = {"xla_backend_optimization_level": 0}
    last = distill(cfg, str(root / "warmup"), data_dir=str(root / "data" / "pairs"), progress=False, compiler_options=opts)
    return root, cfg, last


@pytest.mark.xdist_group("warmup_run")  # shares the module fixture warmup_run (pytest.ini)
@pytest.mark.slow
def test_the_warmup_trains_only_the_student_and_logs_samples(warmup_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, last = warmup_run
    lines = metrics(root / "warmup")
    assert [m["step"] for m in lines] == [1, 2]
    assert all("gen/regression_loss" in m and not any(k.startswith("critic/") for k in m) for m in lines)
    assert not any("gen/dmd_loss" in m for m in lines)  # no rollout, teacher or critic pass at dmd_weight=0
    assert last["gen/regression_loss"] > 0
    acc = EventAccumulator(str(root / "warmup" / "tensorboard"), size_guidance={"images": 0, "audio": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"samples/t2av", "samples/a2v"} <= set(tags["images"]), tags["images"]
    assert "samples/t2av_audio" in tags["audio"], tags["audio"]
    assert (root / "warmup" / "student" / "checkpoints" / "2").is_dir()


@pytest.mark.xdist_group("warmup_run")  # shares the module fixture warmup_run (pytest.ini)
@pytest.mark.slow
def test_student_init_starts_the_student_from_the_warmup(warmup_run, tmp_path):
    from mmdit.distill import student_init
    from mmdit.distill.loop import distill
    from mmdit.train import checkpoint

    root, cfg, _ = warmup_run
    _, warm_ema, _ = checkpoint.restore_inference(str(root / "warmup" / "student"))
    _, teacher, _ = checkpoint.restore_inference(str(root / "teacher"))
    flat = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]  # noqa: E731
    assert any(not np.array_equal(a, b) for a, b in zip(flat(warm_ema), flat(teacher)))  # the warm-up moved it
    # the distill workdir itself is a source too: its latest checkpoint's EMA student
    source = student_init.open_source(str(root / "warmup"))
    assert source.kind == "distill workdir"
    for a, b in zip(flat(student_init.load(source, warm_ema)), flat(warm_ema)):
        np.testing.assert_array_equal(a, b)

    seen = {}

    def hook(done, state):  # the first update runs at lr 0 (train.warmup_steps=1): params still the init
        seen.update(student=flat(state.student.params), ema=flat(state.student.ema), critic=flat(state.critic.params))

    run_cfg = config_lib.override(cfg, [f"distill.student_init={root / 'warmup' / 'student'}", "train.sample_every=0"])
    distill(
        run_cfg,
        str(tmp_path / "run"),
        data_dir=str(root / "data" / "pairs"),
        progress=False,
        stop_after=1,
        iteration_hook=hook,
        compiler_options={"xla_backend_optimization_level": 0},
    )
    for key, want in (("student", warm_ema), ("critic", teacher)):
        for a, b in zip(seen[key], flat(want)):
            np.testing.assert_array_equal(a, b, err_msg=key)
    for a, b in zip(seen["ema"], flat(warm_ema)):  # ema·d + params·(1 − d) of equal trees: equal up to rounding
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)


def test_a_student_init_of_another_model_is_refused_and_the_workdir_untouched(tmp_path):
    from mmdit.distill.loop import distill

    untrained_teacher(tmp_path / "teacher")
    (tmp_path / "other.py").write_text(
        "from mmdit import config_lib\n\n\ndef get_config(arg=None):\n"
        "    c = config_lib.load('configs/demo.py:tiny,plain')\n    c.model.num_layers = 1\n    return c\n"
    )
    untrained_teacher(tmp_path / "other", str(tmp_path / "other.py"))
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    snapshot = tree_snapshot(work)
    cfg = config_lib.override(
        config_lib.load("configs/demo_distill.py:tiny"),
        [f"distill.teacher={tmp_path / 'teacher'}", f"distill.student_init={tmp_path / 'other'}"],
    )
    with pytest.raises(ValueError, match="distill.student_init=.*does not hold the student's params") as e:
        distill(cfg, str(work), data_dir=str(tmp_path / "nowhere"), progress=False)
    assert "dit/params/" in str(e.value)  # names the differing params
    assert tree_snapshot(work) == snapshot


def test_a_warmup_on_records_without_ode_pairs_is_refused_and_the_workdir_untouched(tmp_path):
    from mmdit.data.synth_records import synth
    from mmdit.distill.loop import distill

    teacher_cfg = untrained_teacher(tmp_path / "teacher")
    synth(teacher_cfg, str(tmp_path / "data"), num=2, num_eval=0, progress=False)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    snapshot = tree_snapshot(work)
    cfg = config_lib.override(config_lib.load("configs/demo_distill.py:tiny,warmup"), [f"distill.teacher={tmp_path / 'teacher'}"])
    with pytest.raises(ValueError, match=r"lacks record field\(s\) \['ode_") as e:
        distill(cfg, str(work), data_dir=str(tmp_path / "data" / "train"), progress=False)
    assert "mmdit distill prepare" in str(e.value) and str(tmp_path / "data" / "train") in str(e.value)
    assert "'ode_t2av_target_video'" in str(e.value) and "'ode_a2v_target_video'" in str(e.value)  # both drawn tasks
    assert tree_snapshot(work) == snapshot


# ------------------------------------------------------------------------------------------------
# the student's rollout on the streaming KV cache (mmdit/distill/cached_rollout.py) vs full passes

STEP_LIST = (1.0, 0.75)


@pytest.fixture(scope="module")
def four_chunks():
    """The tiny student cut into 4 chunks of 2 frames (> 3: bounded positions differ from chunk 3
    on), perturbed params, ground truth, a batch of one t2av and one a2v sample."""
    import dataclasses

    from mmdit import tasks

    cfg, model, params = four_chunk_student()
    B = 2
    clean = model.tokens(
        {
            a.name: jax.random.normal(jax.random.key(2 + i), (B,) + tuple(a.geometry.latent_shape))
            for i, a in enumerate(model.spec.streams)
        }
    )
    raw = model.input_spec().zero_conditions(B)
    raw = {
        k: jax.random.randint(jax.random.key(9), v.shape, 1, 255).astype(v.dtype) if v.dtype == jnp.int32 else v
        for k, v in raw.items()
    }
    t2av, a2v = (tasks.task_masks(t, jax.random.key(0), model.spec, B, cfg.model) for t in ("t2av", "a2v"))
    masks = dataclasses.replace(t2av, known={n: jnp.stack([t2av.known[n][0], a2v.known[n][1]]) for n in t2av.known})
    keep = {c: jnp.ones((B,), bool) for c in model.spec.keep_names}
    return cfg, model, params, clean, masks, raw, keep


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(a[n] - b[n]))) for n in a)


def chunk_slices(model, out, chunks):
    from mmdit.model.chunks import chunk_tokens

    T = chunk_tokens(model.spec)
    return {n: out[n][:, chunks[0] * T[n] : chunks[1] * T[n]] for n in out}


@pytest.mark.xdist_group("four_chunks")  # shares the module fixture four_chunks (pytest.ini)
@pytest.mark.slow
@pytest.mark.parametrize("teacher_forced", [False, True])
def test_cached_rollout_equals_the_full_sequence_rollout(four_chunks, teacher_forced):
    """Clean cache + absolute positions: the cached rollout is the full-sequence rollout (values, and
    with ``context_gradient`` the parameter gradient); the default (Self-Forcing: no gradient through
    the cached context) differs from it only in the gradient."""
    from mmdit.distill.cached_rollout import CachedRollout
    from mmdit.distill.rollout import student_rollout

    cfg, model, params, clean, masks, raw, keep = four_chunks
    cached = CachedRollout(model, cfg, cache_mode="clean", positions="absolute")
    assert cached.num_chunks == 4
    args = (jax.random.key(11), clean, masks, raw, keep, STEP_LIST)
    weights = {n: jax.random.normal(jax.random.key(20 + i), clean[n].shape) for i, n in enumerate(sorted(clean))}

    def loss(out):
        return sum(jnp.sum(out[n] * weights[n]) for n in out)

    def full(p, exit_step):
        return student_rollout(model, p, *args, exit_step=exit_step, teacher_forced=teacher_forced)

    def cache(p, exit_step, context_gradient=False):
        return cached.sample(p, *args, exit_step=exit_step, teacher_forced=teacher_forced, context_gradient=context_gradient)

    for exit_step in (0, 1):
        a, b = jax.jit(full, static_argnums=1)(params, exit_step), jax.jit(cache, static_argnums=1)(params, exit_step)
        assert max_diff(a, b) < 1e-5, (exit_step, max_diff(a, b))
        assert min(float(jnp.std(a[n])) for n in a) > 0.1
        for n in a:  # A2V (sample 1): the given audio is kept
            np.testing.assert_array_equal(np.asarray(b[n][masks.known[n]]), np.asarray(clean[n][masks.known[n]]))
    exit_step = jnp.int32(1)  # a jit argument: traced, as in training
    g_full = jax.jit(jax.grad(lambda p, e: loss(full(p, e))))(params, exit_step)
    g_ctx = jax.jit(jax.grad(lambda p, e: loss(cache(p, e, True))))(params, exit_step)
    g_sf = jax.jit(jax.grad(lambda p, e: loss(cache(p, e))))(params, exit_step)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_full))
    err = lambda g: max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(g_full), jax.tree.leaves(g)))  # noqa: E731
    assert scale > 1e-3 and err(g_ctx) < 1e-5 * max(1.0, scale), (err(g_ctx), scale)
    assert err(g_sf) > 1e-3 * scale  # the context's gradient path is really cut


def shared_sigma_rollout(model, params, rng, clean, masks, raw, keep, exit_step):
    """The per-step cache's oracle: every chunk denoised in parallel, one full-sequence forward per
    step (chunk c at step i sees the others at step i), the chunks' own noise."""
    from mmdit.distill.losses import clean_prediction
    from mmdit.distill.rollout import chunk_noise
    from mmdit.model.chunks import chunk_tokens, num_chunks

    T, C = chunk_tokens(model.spec), num_chunks(model.spec)
    gen = sorted(model.spec.generated)

    def noise(draw):
        return {
            n: jnp.concatenate([chunk_noise(rng, c, draw, i, (clean[n].shape[0], T[n], clean[n].shape[2])) for c in range(C)], 1)
            for i, n in enumerate(gen)
        }

    hold = lambda x: {n: jnp.where(masks.known[n][..., None], clean[n], x[n]) for n in gen}  # noqa: E731
    x = hold(noise(0))
    for k, sigma in enumerate(STEP_LIST[: exit_step + 1]):
        sig = {n: jnp.where(masks.known[n], 0.0, sigma) for n in gen}
        v = model.velocity(params, x, sig, raw, cond_keep=keep, known=masks.known, valid=masks.valid)
        x0 = hold(clean_prediction(x, v, sig))
        if k < exit_step:
            nxt, eps = STEP_LIST[k + 1], noise(1 + k)
            x = hold({n: (1 - nxt) * x0[n] + nxt * eps[n] for n in gen})
    return x0


@pytest.mark.xdist_group("four_chunks")  # shares the module fixture four_chunks (pytest.ini)
@pytest.mark.slow
def test_cached_per_step_rollout_equals_shared_sigma_full_passes(four_chunks):
    """Per-step cache (TalkingMachines; chunk c at step i reads chunk c−1 at step i) + absolute
    positions = all chunks denoised together by full-sequence passes at a shared σ."""
    from mmdit.distill.cached_rollout import CachedRollout

    cfg, model, params, clean, masks, raw, keep = four_chunks
    cached = CachedRollout(model, cfg, cache_mode="per_step", positions="absolute")
    for exit_step in (0, 1):
        want = jax.jit(lambda p: shared_sigma_rollout(model, p, jax.random.key(11), clean, masks, raw, keep, exit_step))(params)
        got = jax.jit(
            lambda p, e: cached.sample(
                p, jax.random.key(11), clean, masks, raw, keep, STEP_LIST, exit_step=e, teacher_forced=False
            )
        )(params, jnp.int32(exit_step))
        assert max_diff(want, got) < 1e-5, (exit_step, max_diff(want, got))


@pytest.mark.xdist_group("four_chunks")  # shares the module fixture four_chunks (pytest.ini)
@pytest.mark.slow
def test_bounded_positions_match_the_full_rollout_up_to_chunk_2(four_chunks):
    """Bounded positions (the default ``sample.stream_positions``): chunks 0-2 sit where the full
    sequence has them; chunk 3 is read at chunk 2's window position, so it differs."""
    from mmdit.distill.cached_rollout import CachedRollout
    from mmdit.distill.rollout import student_rollout

    cfg, model, params, clean, masks, raw, keep = four_chunks
    cached = CachedRollout(model, cfg, cache_mode="clean")
    assert cached.positions == "bounded"
    args = (jax.random.key(11), clean, masks, raw, keep, STEP_LIST)
    a = jax.jit(lambda p: student_rollout(model, p, *args, exit_step=1, teacher_forced=False))(params)
    b = jax.jit(lambda p: cached.sample(p, *args, exit_step=1, teacher_forced=False))(params)
    head = (0, 3)
    assert max_diff(chunk_slices(model, a, head), chunk_slices(model, b, head)) < 1e-5
    assert max_diff(chunk_slices(model, a, (3, 4)), chunk_slices(model, b, (3, 4))) > 1e-3


@pytest.mark.xdist_group("four_chunks")  # shares the module fixture four_chunks (pytest.ini)
@pytest.mark.slow
def test_cached_teacher_forced_predictions_equal_full_passes(four_chunks):
    """The regression loss's predictions (every chunk from its noisy state, clean context) on the cache."""
    from mmdit.distill.cached_rollout import CachedRollout
    from mmdit.distill.rollout import predict_chunks

    cfg, model, params, clean, masks, raw, keep = four_chunks
    cached = CachedRollout(model, cfg, cache_mode="per_step", positions="absolute")
    gen = sorted(model.spec.generated)
    x = {n: jax.random.normal(jax.random.key(30 + i), clean[n].shape) for i, n in enumerate(gen)}
    context = {**clean, **{n: clean[n] + 0.3 for n in gen}}
    sigma = jnp.float32(0.6)
    want = jax.jit(lambda p: predict_chunks(model, p, x, context, sigma, masks, raw, keep))(params)
    got = jax.jit(lambda p: cached.predict(p, x, context, sigma, masks, raw, keep))(params)
    assert max_diff(want, got) < 1e-5
