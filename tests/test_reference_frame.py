"""TI2AV's given first frame as per-token condition channels (``configs/demo.py:ref``, condition
``first_frame`` with ``derived="first_frame"``, mmdit/model/derived_conditions.py).

* the derived condition is the visual stream's first latent frame tiled over every latent frame, and
  no record / sampler input field;
* through the task masks and the sampler's input assembly the model sees it in ti2av and zeros in
  t2av / tv2a / a2v (and in a CFG row that drops it);
* config errors name the field and the expected value;
* the streaming sampler gives every chunk the tiled image: per-step cache + absolute positions equal
  the bidirectional sampler on the whole sequence (ti2av);
* ``mmdit data synth`` -> ``mmdit train`` -> ``mmdit sample --task ti2av`` -> ``mmdit eval`` run on
  ``configs/demo.py:tiny,plain,ref``.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo, demo_stream
from mmdit import config_lib, tasks
from mmdit.model.derived_conditions import derived_conditions, first_frame_condition
from mmdit.model.diffusion import DiffusionModel
from mmdit.sample import guidance as guidance_lib
from mmdit.sample.sampler import Sampler
from mmdit.sample.streaming import StreamingSampler

FAST = {"xla_backend_optimization_level": 0}


def _perturbed(model, seed=0):
    """Init params moved off init (so velocities are not ~0), in one compiled call."""

    def init(key):
        params = model.init(key)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(jax.tree.leaves(params)))
        leaves, tree = jax.tree.flatten(params)
        return jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])

    key = jax.random.key(seed)
    return jax.jit(init).lower(key).compile(compiler_options=FAST)(key)


@pytest.fixture(scope="module")
def tiny_ref():
    cfg = config_lib.load("configs/demo.py:tiny,plain,ref")
    model = DiffusionModel.from_config(cfg)
    return cfg, model, _perturbed(model)


@pytest.mark.parametrize("variant", ["tiny,plain,ref", "tiny,plain,ref,wan4"])
def test_first_frame_condition_is_the_first_frame_tiled(variant):
    cfg = config_lib.load(f"configs/demo.py:{variant}")
    model = DiffusionModel.from_config(cfg)
    g = model.spec.stream("video").geometry
    arch = model.spec.condition("first_frame")
    assert (arch.dim, arch.length) == (g.token_dim, g.num_tokens) == (128, g.num_tokens)
    latents = jax.random.normal(jax.random.key(0), (2,) + tuple(g.latent_shape))
    tokens = g.patchify(latents)
    cond = derived_conditions(model.spec, {"video": tokens, "audio": None})["first_frame"]
    assert cond.shape == (2, g.num_tokens, g.token_dim)
    per_frame = g.tokens_per_frame  # 1 (a token per frame) / 4 (wan4: 2x2 tokens per latent frame)
    for t in range(g.token_frames()):
        np.testing.assert_array_equal(cond[:, t * per_frame : (t + 1) * per_frame], tokens[:, :per_frame])
    # Only the first latent frame is read: changing any later frame changes nothing.
    later = latents.at[:, g.patch[0] :].set(7.0)
    np.testing.assert_array_equal(first_frame_condition(g, g.patchify(later)), cond)
    # Never an input: the record / batch / sampler fields are those of the model without it.
    plain = DiffusionModel.from_config(config_lib.load(f"configs/demo.py:{variant.replace(',ref', '')}"))
    assert model.input_spec() == plain.input_spec()


def test_present_only_in_ti2av(tiny_ref):
    cfg, model, _ = tiny_ref
    for task in ("t2av", "ti2av", "tv2a", "a2v"):
        present = tasks.task_masks(task, jax.random.key(0), model.spec, 3, cfg.model).present
        assert np.asarray(present["first_frame"]).tolist() == [task == "ti2av"] * 3, task
        assert np.asarray(present["text"]).all()
    drawn = tasks.sample_tasks(jax.random.key(1), model.spec, 64, dict(cfg.tasks), cfg.model)
    ti2av = list(cfg.tasks).index("ti2av")
    np.testing.assert_array_equal(np.asarray(drawn.present["first_frame"]), np.asarray(drawn.task) == ti2av)


def test_sampler_step_sees_the_given_frame_only_in_ti2av(tiny_ref):
    """One guided step assembled by the Sampler (task masks -> present -> CFG keep flags -> step function)
    equals the DiT given the tiled first frame in ti2av and zeros in t2av / tv2a / a2v, in every CFG row."""
    cfg, model, params = tiny_ref
    sampler = Sampler(model, cfg)
    B = 2
    g = model.spec.stream("video").geometry
    clean = g.patchify(jax.random.normal(jax.random.key(2), (B,) + tuple(g.latent_shape)))
    noise = sampler.noise(jax.random.key(3), B)
    text = jnp.asarray(np.random.default_rng(0).integers(1, 255, (B, cfg.model.conditions.text.length)), jnp.int32)
    raw = {"text_tokens": text}
    guidance = sampler.resolve_guidance({"text": 2.0})

    @jax.jit
    def guided(x, sigma, m):  # the sampler's own assembly
        masks = tasks.TaskMasks(m["known"], m["valid"], m["present"], None)
        return sampler.guided_velocity(params, x, sigma, raw, masks, guidance)

    @jax.jit
    def explicit(x, sigma, first_frame, known, valid, text_keep):  # the DiT given first_frame by hand, always kept
        conds, cmasks = model.encode_conditions(params, raw)
        keep = {"text": text_keep, "first_frame": jnp.ones_like(text_keep)}
        conds = {**conds, "first_frame": first_frame}
        return model.dit.apply(params["dit"], x, sigma, conds, cmasks, keep, known, valid)

    for task in ("t2av", "ti2av", "tv2a", "a2v"):
        masks = sampler.task_masks(task, jax.random.key(0), B)
        assert guidance == sampler.resolve_guidance({"text": 2.0}, present=masks.present)
        x = {n: jnp.where(masks.known[n][..., None], clean if n == "video" else noise[n], noise[n]) for n in noise}
        sigma = {n: jnp.where(masks.known[n], 0.0, 0.7) for n in x}
        got = guided(x, sigma, {"known": masks.known, "valid": masks.valid, "present": masks.present})
        want_cond = first_frame_condition(g, x["video"]) if task == "ti2av" else jnp.zeros_like(x["video"])
        rows = [explicit(x, sigma, want_cond, masks.known, masks.valid, jnp.full((B,), k)) for k in (False, True)]
        want = guidance_lib.combine_cfg(  # the nested plan's rows: [text dropped, text kept]
            {n: jnp.concatenate([r[n] for r in rows]) for n in rows[0]}, guidance.plan(), dict(guidance.scales)
        )
        for n in want:
            np.testing.assert_allclose(np.asarray(got[n]), np.asarray(want[n]), atol=1e-5, rtol=1e-5, err_msg=task)
        if task == "ti2av":  # the condition matters: the same step without it differs
            zero = explicit(x, sigma, jnp.zeros_like(x["video"]), masks.known, masks.valid, jnp.ones((B,), bool))
            assert float(jnp.abs(zero["video"] - rows[1]["video"]).max()) > 1e-3


def test_guidance_on_first_frame_drops_it_in_the_unconditional_row(tiny_ref):
    cfg, model, params = tiny_ref
    sampler = Sampler(model, cfg)
    masks = sampler.task_masks("ti2av", jax.random.key(0), 1)
    guidance = sampler.resolve_guidance({"first_frame": 3.0}, present=masks.present)
    flags = guidance_lib.cfg_keep_flags(guidance.plan(), 1)
    assert np.asarray(flags["first_frame"]).tolist() == [False, True]
    t2av = sampler.task_masks("t2av", jax.random.key(0), 1)  # absent in t2av: its guidance term is dropped
    assert sampler.resolve_guidance({"first_frame": 3.0}, present=t2av.present).conditions == []


def test_training_loss_with_first_frame_dropout(tiny_ref):
    from mmdit.train.step import make_loss_fn

    cfg, model, params = tiny_ref
    cfg = config_lib.override(cfg, ["flow.condition_dropout.first_frame=0.5"])
    B = 4
    batch = {f.name: jnp.zeros(f.struct(B).shape, f.dtype) for f in model.input_spec().record_fields}
    batch["video_latents"] = jax.random.normal(jax.random.key(0), batch["video_latents"].shape)
    args = (params, batch, jax.random.key(1))
    loss, metrics = jax.jit(make_loss_fn(model, cfg)).lower(*args).compile(compiler_options=FAST)(*args)
    assert np.isfinite(float(loss)) and np.isfinite(float(metrics["loss_task/ti2av"]))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: c.model.conditions.first_frame.update(dim=64), r"first_frame\.dim=64.*token width 128"),
        (lambda c: c.model.conditions.first_frame.update(derived="last_frame"), r"first_frame\.derived='last_frame'"),
        (lambda c: setattr(c.model.streams.video, "concat", ()), r"model\.streams\.video\.concat = \('first_frame',\)"),
        (lambda c: c.model.conditions.first_frame.update(length=5), r"first_frame\.length=5.*17 tokens"),
    ],
)
def test_config_errors_name_the_field(change, match):
    cfg = config_lib.load("configs/demo.py:tiny,plain,ref")
    change(cfg)
    with pytest.raises(ValueError, match=match):
        DiffusionModel.from_config(cfg)


def test_no_grid_stream_is_refused():
    cfg = config_lib.load("configs/demo.py:tiny,plain,ref")
    cfg.model.streams.video.kind = "sequence"
    cfg.model.streams.video.shape = (17,)
    cfg.model.streams.video.patch = (1,)
    cfg.model.streams.video.channels = 128
    with pytest.raises(ValueError, match=r"first_frame\.derived='first_frame'.*no generated grid stream"):
        DiffusionModel.from_config(cfg)


@pytest.mark.slow
def test_streaming_ti2av_gives_every_chunk_the_image_and_equals_bidirectional():
    cfg = config_lib.load("configs/demo_stream.py:tiny")
    demo_stream.set_clip_chunks(cfg, 3)
    demo.use_reference_frame(cfg)
    cfg.sample.steps = 2
    model = DiffusionModel.from_config(cfg)
    params = _perturbed(model)
    raw = {"text_tokens": jnp.asarray(np.random.default_rng(0).integers(1, 255, (1, cfg.model.conditions.text.length)))}
    g = model.spec.stream("video").geometry
    image = jax.random.normal(jax.random.key(4), (1, 1) + tuple(g.latent_shape[1:]))
    full = Sampler(model, cfg, compiler_options=FAST)
    noise = full.noise(jax.random.split(jax.random.key(3))[0], 1)
    full.noise = lambda rng, batch: noise
    video = jnp.zeros((1,) + tuple(g.latent_shape)).at[:, :1].set(image)
    ref = full.sample(params, jax.random.key(3), task="ti2av", batch=1, raw_conds=raw, known_latents={"video": video})
    ss = StreamingSampler(model, cfg, cache_mode="per_step", positions="absolute", compiler_options=FAST)
    state = ss.start(params, jax.random.key(7), task="ti2av", batch=1, raw_conds=raw, image_latents=image)
    T = ss.layout.tokens
    np.testing.assert_array_equal(
        np.asarray(state.conds["first_frame"]), np.tile(np.asarray(g.patchify(video))[:, :1], (1, T["video"], 1))
    )
    outs = []
    for c in range(3):
        out, state = ss.step(params, state, noise={s: noise[s][:, c * T[s] : (c + 1) * T[s]] for s in noise})
        outs.append(out)
    for s in ref:
        np.testing.assert_allclose(np.concatenate([o[s] for o in outs], 1), np.asarray(ref[s]), atol=1e-5, rtol=1e-5)
    # The later chunks do see the image: another image changes chunk 2.
    other = ss.start(params, jax.random.key(7), task="ti2av", batch=1, raw_conds=raw, image_latents=image + 1.0)
    for c in range(3):
        out2, other = ss.step(params, other, noise={s: noise[s][:, c * T[s] : (c + 1) * T[s]] for s in noise})
    assert float(np.abs(np.asarray(out2["video"]) - np.asarray(outs[2]["video"])).max()) > 1e-4


@pytest.mark.slow
def test_cli_train_sample_eval_ti2av(tmp_path, monkeypatch):
    import librosa.feature.inverse

    from mmdit.cli import data as data_cli
    from mmdit.cli import eval as eval_cli
    from mmdit.cli import sample as sample_cli
    from mmdit.cli import train as train_cli

    def fast_mel_to_stft(M, *, sr, n_fft, power=2.0, **kw):  # librosa's NNLS is slow on untrained latents
        basis = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=M.shape[-2], **kw)
        return np.maximum(np.einsum("fm,...mt->...ft", np.linalg.pinv(basis), M), 0.0) ** (1.0 / power)

    monkeypatch.setattr(librosa.feature.inverse, "mel_to_stft", fast_mel_to_stft)
    config, wd = "configs/demo.py:tiny,plain,ref", tmp_path / "run"
    small = ["--set", "data.num_train=4", "--set", "data.num_eval=2"]
    assert data_cli.main(["synth", "--config", config, "--out", str(wd / "data"), "--no-progress", *small]) == 0
    sets = ["--set", "train.steps=2", "--set", "train.sample_every=0", "--set", "train.checkpoint_every=2"]
    assert train_cli.main(["--config", config, "--workdir", str(wd), "--no-progress", *sets]) == 0
    resolved = json.loads((wd / "config.json").read_text())
    assert resolved["model"]["conditions"]["first_frame"]["derived"] == "first_frame"
    out = tmp_path / "samples"
    argv = ["--workdir", str(wd), "--task", "ti2av", "--num", "1", "--steps", "2", "--out", str(out), "--no-progress"]
    assert sample_cli.main(argv) == 0
    assert (out / "ti2av_0.mp4").exists()
    argv = ["--workdir", str(wd), "--tasks", "ti2av,t2av", "--num", "1", "--out", str(tmp_path / "eval")]
    assert eval_cli.main(argv) == 0
    summary = json.loads((tmp_path / "eval" / "eval.json").read_text())["summary"]
    assert np.isfinite(summary["ti2av"]["identity_ref_hist_sim"])
