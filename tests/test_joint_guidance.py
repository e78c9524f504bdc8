"""Cross-stream ("joint") classifier-free guidance (``model.joint_guidance``, issue 15).

* model: ``cond_keep["joint"]`` False confines one sample's tokens to their own stream in every layer --
  its video ignores its audio and equals a model without joint layers on the same params; the other
  sample is untouched; the flag adds no params; every attention path (XLA, cuDNN's group split, the
  interpreted Pallas kernel's block maps, Ulysses / ring sequence parallelism) honours it, including the
  mask-free "full" shortcut;
* sampling: ``sample.guidance.joint`` with per-stream scales through the bidirectional sampler and the
  KV-cached streaming sampler (guiding video at 0 by the partner: video independent of the given audio;
  streaming equals bidirectional under CFG);
* config: ``configs/demo.py:jointcfg``; ``joint`` without the flag names ``model.joint_guidance``;
* CLI: ``configs/demo.py:tiny,plain,jointcfg`` trains a few steps and samples T2AV with the joint guidance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_cfg

from mmdit import config_lib, config_spec
from mmdit import tasks as tasks_lib
from mmdit.model.mmdit import MMDiT
from mmdit.model.spec import build_spec

FAST = {"xla_backend_optimization_level": 0}


def _inputs(spec, batch=2, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    tokens = {
        a.name: jax.random.normal(keys[i], (batch, a.geometry.num_tokens, a.geometry.token_dim))
        for i, a in enumerate(spec.streams)
    }
    sigma = {a.name: jnp.full((batch, a.geometry.num_tokens), 0.5) for a in spec.streams}
    conds = {c.name: jax.random.normal(keys[3], (batch, c.length, c.dim)) for c in spec.conditions}
    return tokens, sigma, conds


# Attention paths that derive masks from the groups, all with the full mask and no `valid`: the setting
# where the model would take its mask-free shortcut, and where the Pallas kernel (interpreted, 16-token
# tiles) skips the in-kernel mask on tiles its precomputed block map calls FULL (cross-stream tiles, unless
# the map honours the per-sample groups).
PATHS = {
    "xla": dict(mask="full"),
    "cudnn": dict(mask="full", attention=dict(impl="cudnn", cross_impl="xla")),
    "pallas": dict(mask="full", attention=dict(impl="pallas_gpu", cross_impl="xla", interpret=True, block_q=16, block_k=16)),
}


def _jitted(over, **flags):
    """A tiny MMDiT (``tiny_model_cfg`` plus ``over``/``flags``) and its jitted ``(params, tokens, sigma, conds,
    cond_keep) -> velocities``."""
    model = MMDiT(build_spec(tiny_model_cfg(**flags, **over)))
    return model, jax.jit(lambda p, t, s, c, keep: model.apply(p, t, s, c, None, keep), compiler_options=FAST)


@pytest.mark.parametrize("path", [p if p != "pallas" else pytest.param(p, marks=pytest.mark.slow) for p in PATHS])
def test_keep_joint_false_confines_that_sample_to_its_own_stream(path):
    over = PATHS[path]
    model, apply = _jitted(over, joint_guidance=True)
    tokens, sigma, conds = _inputs(model.spec)
    params = jax.jit(model.init, compiler_options=FAST)(jax.random.key(0), tokens, sigma, conds)
    # rows: samples 0 and 1 as drawn, then both with their audio changed; keep-joint False, True, False, True
    louder = dict(tokens, audio=tokens["audio"] + 1.0)
    twice = lambda tree: jax.tree.map(lambda a: jnp.concatenate([a, a]), tree)  # noqa: E731
    rows = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), tokens, louder)
    out = apply(params, rows, twice(sigma), twice(conds), {"joint": jnp.array([False, True, False, True])})
    v_diff = np.abs(np.asarray(out["video"][2:] - out["video"][:2])).max(axis=(1, 2))
    assert v_diff[0] < 1e-6, v_diff  # keep False: the video never sees its audio
    assert v_diff[1] > 1e-3, v_diff  # keep True: it does
    # keep False is exactly a model without joint layers on the same params, keep True the flag-off joint
    # model: each sample as if alone in its batch (separate forwards of the two unchanged samples)
    apart = _jitted(over, joint_layers=())[1](params, tokens, sigma, conds, None)
    joint = _jitted(over)[1](params, tokens, sigma, conds, None)
    for s in ("video", "audio"):
        np.testing.assert_allclose(np.asarray(out[s][0]), np.asarray(apart[s][0]), atol=2e-5)
        np.testing.assert_allclose(np.asarray(out[s][1]), np.asarray(joint[s][1]), atol=2e-5)


def test_flag_adds_no_params_and_only_the_keep_name():
    off, on = build_spec(tiny_model_cfg()), build_spec(tiny_model_cfg(joint_guidance=True))
    assert off.keep_names == ("text",) and on.keep_names == ("text", "joint")
    tokens, sigma, conds = _inputs(off, batch=1)
    shapes = [
        jax.tree.map(lambda a: a.shape, jax.eval_shape(lambda: MMDiT(s).init(jax.random.key(0), tokens, sigma, conds)))
        for s in (off, on)
    ]
    assert shapes[0] == shapes[1]
    with pytest.raises(ValueError, match="cond_keep\\['joint'\\].*model.joint_guidance=True"):
        MMDiT(off).init(jax.random.key(0), tokens, sigma, conds, None, {"joint": jnp.array([False])})


def test_spec_errors_name_the_fields():
    with pytest.raises(ValueError, match="model.joint_guidance=True.*model.joint_layers is empty"):
        build_spec(tiny_model_cfg(joint_guidance=True, joint_layers=()))
    cfg = tiny_model_cfg(joint_guidance=True)
    with cfg.unlocked():
        cfg.conditions.joint = dict(dim=4, length=2)
    with pytest.raises(ValueError, match="reserves the keep-name 'joint'"):
        build_spec(cfg)


def test_config_errors_without_the_flag_name_model_joint_guidance():
    base = config_lib.load("configs/demo.py:tiny,plain")
    assert base.model.joint_guidance is False and "joint" not in base.flow.condition_dropout
    for section in ("flow.condition_dropout", "sample.guidance"):
        cfg = config_lib.load("configs/demo.py:tiny,plain")
        if section == "flow.condition_dropout":
            cfg.flow.condition_dropout.joint = 0.1
        else:
            cfg.sample.guidance.joint = 2.0
        with pytest.raises(ValueError, match=f"^{section}.* names 'joint'.*needs model.joint_guidance=True"):
            config_spec.build_run_spec(cfg)


def test_jointcfg_variant_and_tasks_present():
    cfg = config_lib.load("configs/demo.py:tiny,plain,jointcfg")
    run = config_spec.build_run_spec(cfg)
    assert run.model.joint_guidance and run.flow.condition_dropout["joint"] == 0.1
    assert run.sample.guidance["joint"] == {"video": 3.0, "audio": 3.0}
    assert list(run.sample.guidance) == ["text", "joint"]  # sample.guidance_order, not the ConfigDict's sorted keys
    cfg.sample.guidance_order = ("joint",)
    with pytest.raises(ValueError, match="sample.guidance_order=.*each condition of sample.guidance"):
        config_spec.build_run_spec(cfg)
    cfg.sample.guidance_order = ()
    assert list(config_spec.build_run_spec(cfg).sample.guidance) == ["joint", "text"]
    for task in tasks_lib.TASKS:
        try:
            masks = tasks_lib.task_masks(task, jax.random.key(0), run.model, 2, cfg.model)
        except ValueError:  # a task this model cannot run (e.g. no_peek / roles it lacks)
            continue
        np.testing.assert_array_equal(np.asarray(masks.present["joint"]), [True, True])
    assert "joint" not in tasks_lib.task_masks("t2av", jax.random.key(0), build_spec(tiny_model_cfg()), 1).present


def _trained_like(model, seed=1):
    params = model.init(jax.random.key(0))
    return jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(seed), p.shape, p.dtype), params)


@pytest.mark.slow  # ~25 s on idle cores (the 3-pattern sampling loop's compile)
def test_sampler_guides_video_by_the_partner_per_stream():
    """a2v: with the joint term at 0 for video (audio at 2), the video is the no-cross-stream model's:
    independent of the given audio; at 1 it follows the audio."""
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.sample.sampler import Sampler

    cfg = config_lib.override(config_lib.load("configs/demo.py:tiny,plain,jointcfg"), ["sample.steps=2"])
    model = DiffusionModel.from_config(cfg)
    params = _trained_like(model)
    text = jnp.asarray(np.random.default_rng(0).integers(1, 255, (1, cfg.model.conditions.text.length)), jnp.int32)
    shape = (1,) + tuple(model.spec.stream("audio").geometry.latent_shape)
    audios = [jax.random.normal(jax.random.key(k), shape) for k in (4, 5)]
    sampler = Sampler(model, cfg, compiler_options=FAST)

    def video(scale, audio):
        guidance = {"text": {"video": 2.0, "audio": 2.0}, "joint": {"video": scale, "audio": 2.0}}
        out = sampler.sample(
            params,
            jax.random.key(3),
            task="a2v",
            batch=1,
            raw_conds={"text_tokens": text},
            known_latents={"audio": audio},
            guidance=guidance,
        )
        return np.asarray(out["video"])

    np.testing.assert_allclose(video(0.0, audios[0]), video(0.0, audios[1]), atol=1e-5)
    assert np.abs(video(1.0, audios[0]) - video(1.0, audios[1])).max() > 1e-3


@pytest.mark.slow
def test_streaming_sampler_honours_the_joint_keep():
    """The KV-cached chunk path: per-step cache + absolute positions equals the bidirectional sampler on
    the chunk-causal model under text + joint CFG (per-stream joint scales); with the joint term at 0 for
    video, the streamed video ignores the given audio in every chunk (cached context included)."""
    from configs import demo_stream
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.sample.sampler import Sampler
    from mmdit.sample.streaming import StreamingSampler

    cfg = config_lib.load("configs/demo_stream.py:tiny")
    demo_stream.set_clip_chunks(cfg, 3)
    cfg.sample.steps = 2
    cfg.model.joint_guidance = True
    model = DiffusionModel.from_config(cfg)
    params = _trained_like(model)
    raw = {"text_tokens": jnp.asarray(np.random.default_rng(0).integers(1, 255, (1, cfg.model.conditions.text.length)))}
    full = Sampler(model, cfg, compiler_options=FAST)
    noise = full.noise(jax.random.key(3), 1)
    full.noise = lambda rng, batch: noise
    audio_shape = (1,) + tuple(model.spec.stream("audio").geometry.latent_shape)
    audios = [jax.random.normal(jax.random.key(k), audio_shape) for k in (4, 5)]
    ss = StreamingSampler(model, cfg, cache_mode="per_step", positions="absolute", compiler_options=FAST)
    T = ss.layout.tokens

    def stream(guidance, audio):
        given = model.spec.stream("audio").geometry.patchify(audio)
        state = ss.start(params, jax.random.key(7), task="a2v", batch=1, raw_conds=raw, guidance=guidance)
        outs = []
        for c in range(ss.layout.clip_chunks):
            nz = {s: noise[s][:, c * T[s] : (c + 1) * T[s]] for s in noise}
            g = {"audio": ss.model.latents({"audio": given[:, c * T["audio"] : (c + 1) * T["audio"]]})["audio"]}
            out, state = ss.step(params, state, g, noise=nz)
            outs.append(np.asarray(out["video"]))
        return np.concatenate(outs, axis=1)

    guided = {"text": 2.0, "joint": {"video": 2.0, "audio": 0.5}}
    ref = full.sample(
        params, jax.random.key(3), task="a2v", batch=1, raw_conds=raw, known_latents={"audio": audios[0]}, guidance=guided
    )
    np.testing.assert_allclose(stream(guided, audios[0]), np.asarray(ref["video"]), atol=1e-5, rtol=1e-5)
    apart = {"text": 2.0, "joint": {"video": 0.0, "audio": 1.0}}
    np.testing.assert_allclose(stream(apart, audios[0]), stream(apart, audios[1]), atol=1e-5)
    assert np.abs(stream(guided, audios[0]) - stream(guided, audios[1])).max() > 1e-3


@pytest.mark.slow
def test_cli_trains_and_samples_t2av_with_joint_guidance(tmp_path):
    import json
    import os

    from mmdit.cli import sample as sample_cli
    from mmdit.data.synth_records import synth
    from mmdit.train.loop import train

    cfg = config_lib.override(config_lib.load("configs/demo.py:tiny,plain,jointcfg"), ["train.steps=2", "train.sample_every=0"])
    work = str(tmp_path / "run")
    synth(cfg, os.path.join(work, "data"), progress=False)
    metrics = train(cfg, work, progress=False, log=lambda *_: None)
    assert np.isfinite(metrics["loss/video"]) and np.isfinite(metrics["loss/audio"])
    out = str(tmp_path / "samples")
    argv = ["--workdir", work, "--task", "t2av", "--num", "1", "--steps", "2", "--out", out, "--no-progress"]
    assert sample_cli.main(argv + ["--guidance", "text=2;joint=video:2,audio:1.5", "--guidance-interval", "0.5,1"]) == 0
    with open(os.path.join(out, "samples.json")) as f:
        saved = json.load(f)
    assert saved["samples"][0]["task"] == "t2av"
    assert saved["guidance"] == {"text": 2.0, "joint": {"video": 2.0, "audio": 1.5}}  # (written with sorted keys)
    assert saved["guidance_order"] == ["text", "joint"]  # the nested order used (sorted keys would say joint first)
    assert saved["guidance_interval"] == [0.5, 1.0]
    assert sample_cli.main(argv + ["--guidance-interval", "1,0.5"]) == 2  # one error line naming the field


_SEQUENCE_PARALLEL_SCRIPT = """
import jax
jax.config.update("jax_num_cpu_devices", 2)
import json, sys
import jax.numpy as jnp
sys.path.insert(0, "tests")
from conftest import tiny_model_cfg
from test_joint_guidance import _inputs
from mmdit.model.mmdit import MMDiT
from mmdit.model.spec import build_spec
from mmdit.parallel import make_mesh

reference = MMDiT(build_spec(tiny_model_cfg(joint_guidance=True)))
tokens, sigma, conds = _inputs(reference.spec)
params = reference.init(jax.random.key(0), tokens, sigma, conds)
keep = {"joint": jnp.array([False, True])}
want = reference.apply(params, tokens, sigma, conds, None, keep)
louder = dict(tokens, audio=tokens["audio"] + 1.0)
out = {}
for strategy in ("ulysses", "ring"):
    model = MMDiT(build_spec(tiny_model_cfg(joint_guidance=True, sequence_parallel=strategy)))
    with jax.set_mesh(make_mesh(dict(sequence=2))):
        fn = jax.jit(lambda t: model.apply(params, t, sigma, conds, None, keep))
        got, got_louder = fn(tokens), fn(louder)
    out[strategy] = {
        "vs_reference": float(max(jnp.abs(got[n] - want[n]).max() for n in want)),
        "video_change": [float(jnp.abs(got_louder["video"][b] - got["video"][b]).max()) for b in (0, 1)],
    }
print(json.dumps(out))
"""


@pytest.mark.slow  # one subprocess with 2 CPU devices, ~40 s
def test_sequence_parallel_honours_the_joint_keep():
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", _SEQUENCE_PARALLEL_SCRIPT], capture_output=True, text=True, timeout=600, cwd=repo, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for strategy, res in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert res["vs_reference"] < 1e-4, (strategy, res)
        assert res["video_change"][0] == 0.0 and res["video_change"][1] > 1e-3, (strategy, res)
