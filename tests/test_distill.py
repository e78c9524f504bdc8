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

from mmdit import config_lib
from mmdit.distill import losses, ode_pairs
from mmdit.distill.spec import distill_spec

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
    teacher_cfg = config_lib.load("configs/demo.py:tiny")
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
    teacher_cfg = config_lib.load("configs/demo.py:tiny")
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

DISTILL_OVERRIDES = ["train.steps=5", "train.checkpoint_every=2", "train.async_checkpoint=False", "distill.critic_steps=2"]


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_tiny_distill_end_to_end_resume_export_sample(tmp_path):
    from mmdit.data.synth_records import synth

    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    teacher = tmp_path / "teacher"
    synth(config_lib.load("configs/demo.py:tiny"), str(teacher / "data"), num_eval=2, progress=False)
    out = run(
        ["-m", "mmdit.cli.main", "train", "--config", "configs/demo.py:tiny", "--workdir", str(teacher), "--no-progress"]
        + ["--set", "train.steps=2", "--set", "train.sample_every=0"],
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    data = str(teacher / "data" / "train")
    sets = sum([["--set", o] for o in DISTILL_OVERRIDES], [])
    cli = ["-m", "mmdit.cli.main", "distill", "--config", "configs/demo_distill.py:tiny", "--teacher", str(teacher)]
    full = run(cli + ["--workdir", str(tmp_path / "a"), "--data", data, "--no-progress"] + sets, env=env)
    assert full.returncode == 0, full.stderr[-3000:]

    script = tmp_path / "kill_distill.py"
    script.write_text(KILL_SCRIPT)
    b = tmp_path / "b"
    killed = run(
        [str(script), "configs/demo_distill.py:tiny", str(b), data, "3", f"distill.teacher={teacher}", *DISTILL_OVERRIDES],
        env=env,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [m["step"] for m in metrics(b)] == [1, 2, 3] and os.path.isdir(b / "checkpoints" / "2")
    resumed = run(cli + ["--workdir", str(b), "--data", data, "--no-progress"] + sets, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 2" in resumed.stdout
    ma, mb = metrics(tmp_path / "a"), metrics(b)
    assert [m["step"] for m in mb] == [1, 2, 3, 4, 5]
    for x, y in zip(ma, mb):
        for key in ("gen/loss", "gen/dmd_loss", "gen/regression_loss", "critic/loss", "gen/grad_norm", "critic/grad_norm"):
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
    trained = plan(config_lib.load("configs/demo.py"), topo, compile_=False, check=False)
    parts = student["estimate"]["parts_gb"]
    for name in ("teacher_params", "critic_params"):
        assert parts[name] == parts["params"]
    assert parts["critic_optimizer"] == parts["optimizer"] > 0
    assert student["distill"]["rollout_passes"] == 7 * 2  # 7 chunks of 7 frames, 2 steps
    assert student["estimate"]["total_gb"] > trained["estimate"]["total_gb"] + 2 * parts["params"]


def untrained_teacher(workdir, cfg_path="configs/demo.py:tiny"):
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
    from mmdit.distill.loop import distill
    from mmdit.distill.prepare import prepare_pairs

    teacher_cfg = untrained_teacher(tmp_path / "teacher")
    synth(teacher_cfg, str(tmp_path / "data"), num=4, num_eval=0, progress=False)
    cfg = config_lib.override(
        config_lib.load("configs/demo_distill.py:tiny"),
        [f"distill.teacher={tmp_path / 'teacher'}", "distill.regression_pairs=records", "train.steps=2"]
        + ["train.async_checkpoint=False", "distill.critic_steps=1", "data.examples_per_shard=4"],
    )
    manifest = prepare_pairs(cfg, str(tmp_path / "data" / "train"), str(tmp_path / "pairs"), batch=3, progress=False)
    assert manifest["num_examples"] == 4
    ds = records.open_dataset(str(tmp_path / "pairs"))
    ex = ds[3]
    for s in ("video", "audio"):
        noise, state1, target = (np.asarray(ex[f"ode_{f}_{s}"]) for f in ("state0", "state1", "target"))
        assert noise.shape == target.shape == state1.shape and np.all(np.isfinite(target))
        assert 0.8 < noise.std() < 1.2 and not np.allclose(state1, noise) and not np.allclose(target, noise)
    last = distill(
        cfg,
        str(tmp_path / "run"),
        data_dir=str(tmp_path / "pairs"),
        progress=False,
        compiler_options={"xla_backend_optimization_level": 0},
    )
    assert np.isfinite(last["gen/regression_loss"]) and last["gen/regression_loss"] > 0
