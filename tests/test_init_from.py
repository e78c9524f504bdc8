"""``train.init_from``: a twin (video + audio) model initialised from a video-only checkpoint.

The "pretrained" source is a tiny video-only model's DiT saved as a converted checkpoint rooted at
``params/`` (the layout ``mmdit convert`` gives a Wan DiT), in bfloat16: its params must land in the
twin's video stream (cast to float32), the audio stream must stay at its fresh init, and a train
step must run. Shape mismatches and unmatched source params must fail naming the path.
"""

from __future__ import annotations

import copy
import os

import flax.linen as nn
import jax
import ml_collections as mlc
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from mmdit import config_spec
from mmdit.model.diffusion import DiffusionModel
from mmdit.train import init_from, sharding
from mmdit.train.state import init_state, make_optimizer
from mmdit.util import converted


def twin_cfg():
    return config_spec.load("configs/demo.py:tiny,plain", ["train.global_batch_size=1", "model.num_layers=1"])


def random_params(model, seed):
    """Params of ``model`` drawn at random in numpy from the abstract init (nothing compiled)."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0))))
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract)


def fresh_state(model, tx, seed=0):
    return init_state(model, tx, jax.random.key(seed), params=jax.tree.map(jax.numpy.asarray, random_params(model, seed)))


def video_only_dit_params(cfg, seed=1, **stream_overrides):
    """The DiT params of ``cfg``'s model with only its video stream (optionally changed)."""
    m = copy.deepcopy(cfg.model)
    with m.unlocked():
        del m.streams["audio"]
        for k, v in stream_overrides.items():
            m.streams.video[k] = v
    return random_params(DiffusionModel.from_config(mlc.ConfigDict(dict(model=m))), seed)["dit"]


def save_source(path, dit_params, dtype="bfloat16"):
    params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), dit_params)
    converted.save(str(path), params, {"family": "wan_dit", "target": {"kind": "test"}, "dtype": dtype})
    return str(path), params


def flat(tree):
    return {converted.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def twin_from_video_only(tmp_path):
    """(run, model, fresh state, initialised state, source params by target path, init report)."""
    cfg = twin_cfg()
    model = DiffusionModel.from_config(cfg)
    tx = make_optimizer(config_spec.train_spec(cfg))
    run = sharding.setup(cfg, model, tx)
    fresh = jax.device_put(fresh_state(model, tx), run.state_shardings)
    src_path, src = save_source(tmp_path / "wan", video_only_dit_params(cfg))
    notes = []
    state = init_from.init_state_from(fresh, src_path, shardings=run.state_shardings.params, log=notes.append)
    return run, model, fresh, state, {"dit/" + k: v for k, v in flat(src).items()}, notes[0]


def test_twin_from_video_only_checkpoint(tmp_path):
    run, _, fresh, state, src_flat, report = twin_from_video_only(tmp_path)
    fresh_flat, got = flat(fresh.params), flat(state.params)
    video = [k for k in got if "/video/" in k]
    audio = [k for k in got if "/audio/" in k]
    assert video and audio and set(video) <= set(src_flat)
    for k in video:  # loaded: the bf16 source, upcast to the float32 master weights
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], src_flat[k].astype(np.float32), err_msg=k)
    for k in audio + [k for k in got if k.startswith("text_encoder/")]:  # fresh init, untouched
        np.testing.assert_array_equal(got[k], fresh_flat[k], err_msg=k)
    q = "dit/params/blocks/video/attn/to_q/kernel"
    assert not np.array_equal(got[q], fresh_flat[q])
    for k, v in flat(state.ema).items():
        np.testing.assert_array_equal(v, got[k])
    shardings = jax.tree.leaves(run.state_shardings.params)
    assert [x.sharding for x in jax.tree.leaves(state.params)] == shardings  # placed in the run's shardings
    assert f"{len(src_flat)} loaded" in report and "(source placed under 'dit/')" in report
    assert "fresh    dit/params/blocks/audio" in report


def test_shape_mismatch_names_the_param_and_ignore_allows_it(tmp_path):
    cfg = twin_cfg()
    model = DiffusionModel.from_config(cfg)
    tx = optax.sgd(0.1)
    fresh = fresh_state(model, tx)
    src_path, _ = save_source(tmp_path / "wide", video_only_dit_params(cfg, ffn=64))
    with pytest.raises(ValueError, match=r"dit/params/blocks/video/ffn/down/kernel: source \[1, 64, 48\], model \[1, 96, 48\]"):
        init_from.init_state_from(fresh, src_path, log=lambda *_: None)
    state = init_from.init_state_from(fresh, src_path, ignore=["params/blocks/video/ffn/*"], log=lambda *_: None)
    got, before = flat(state.params), flat(fresh.params)
    np.testing.assert_array_equal(got["dit/params/blocks/video/ffn/up/kernel"], before["dit/params/blocks/video/ffn/up/kernel"])
    assert not np.array_equal(got["dit/params/blocks/video/attn/to_q/kernel"], before["dit/params/blocks/video/attn/to_q/kernel"])


def test_unmatched_source_param_is_an_error():
    target = {"dit/params/video/w": [[2, 2], "float32"], "dit/params/audio/w": [[2, 2], "float32"]}
    source = {"params/video/w": [[2, 2], "bfloat16"], "params/face/w": [[2, 2], "bfloat16"]}
    with pytest.raises(ValueError, match=r"1 .*param\(s\) with no counterpart in the model: params/face/w"):
        init_from.plan(source, target)
    p = init_from.plan(source, target, ignore=["params/face/*"])
    assert p.loaded == {"dit/params/video/w": "params/video/w"} and p.fresh == ["dit/params/audio/w"]
    assert p.ignored == ["params/face/w"] and p.prefix == "dit/"
    with pytest.raises(ValueError, match="no param of the source matches"):
        init_from.plan({"x/y": [[1], "float32"]}, target, ignore=["x/*"])


def test_from_training_workdir_ema(tmp_path, caplog):
    """A training workdir (checkpoints/<step>/state) initialises from its EMA, text encoder included, without
    orbax's warning that the state item has no step metadata of its own."""
    cfg = twin_cfg()
    model = DiffusionModel.from_config(cfg)
    tx = optax.sgd(0.1)
    src_state = fresh_state(model, tx, seed=7)
    src_state = src_state.replace(ema=jax.tree.map(lambda x: x + 1.0, src_state.params))
    with ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints")) as mgr:
        mgr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(src_state)))
        mgr.wait_until_finished()
    fresh = fresh_state(model, tx)
    notes = []
    state = init_from.init_state_from(fresh, str(tmp_path), log=notes.append)
    assert "workdir, step 3 ema" in notes[0] and " 0 fresh" in notes[0]
    for k, v in flat(state.params).items():
        np.testing.assert_allclose(v, flat(src_state.ema)[k], err_msg=k)
    assert not [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()]
    # heads trained for another prediction: noted, not refused (the weights still load)
    assert init_from.source_prediction(init_from.open_source(str(tmp_path))) is None  # no config.json: unknown
    (tmp_path / "config.json").write_text('{"model": {"prediction": "velocity"}}')
    notes = []
    init_from.init_state_from(fresh, str(tmp_path), log=notes.append, prediction="x0")
    assert any("trained with velocity heads" in n and "predicts x0" in n for n in notes), notes
    notes = []
    init_from.init_state_from(fresh, str(tmp_path), log=notes.append, prediction="velocity")
    assert not any("heads" in n for n in notes[1:]), notes
    converted_source = init_from.Source("converted", str(tmp_path), "", "", {})
    assert init_from.source_prediction(converted_source) == "velocity"


def test_missing_source_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        init_from.open_source(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="not a converted checkpoint.*mmdit convert"):
        init_from.open_source(str(tmp_path))


WAN_T2V_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "parity", "wan_dit", "t2v")


@pytest.mark.skipif(not os.path.isdir(WAN_T2V_FIXTURE), reason="wan_dit parity fixture not present")
def test_converted_wan_fixture_initialises_twin_video_stream(tmp_path):
    """End to end: `mmdit convert` of the tiny Wan T2V fixture, then a twin (its video stream + a new
    audio stream) initialised from it: every converted param lands unchanged, the audio stream is fresh."""
    from mmdit.convert.run import convert_dir

    out = str(tmp_path / "wan")
    manifest = convert_dir(WAN_T2V_FIXTURE, out, log=lambda *_: None)
    m = mlc.ConfigDict(manifest["target"]["model"])
    with m.unlocked():
        m.streams.audio = dict(kind="sequence", channels=6, shape=(12,), patch=(1,), rate=25.0, dim=m.streams.video.dim, ffn=64)
        m.streams.audio.cross = ("text",)
        m.streams.video.shape = (3, 4, 4)  # clip size: no param depends on it
    model = DiffusionModel.from_config(mlc.ConfigDict(dict(model=m)))
    fresh = fresh_state(model, optax.sgd(0.1))
    notes = []
    state = init_from.init_state_from(fresh, out, log=notes.append)
    _, src = converted.load(out)
    got, before = flat(state.params), flat(fresh.params)
    src_flat = {"dit/" + k: v for k, v in flat(src).items()}
    for k, v in src_flat.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    audio = [k for k in got if "/audio/" in k]
    assert audio and all(np.array_equal(got[k], before[k]) for k in audio)
    assert f"{len(src_flat)} loaded, {len(audio)} fresh, 0 ignored" in notes[0]


def test_config_fields_validated():
    cfg = config_spec.load("configs/demo.py:tiny,plain", ["train.init_from=/some/ckpt"])
    spec = config_spec.train_spec(cfg)
    assert spec.init_from == "/some/ckpt" and spec.init_from_ignore == ()
    with cfg.unlocked():
        cfg.train.init_from_ignore = (3,)
    with pytest.raises(ValueError, match=r"train.init_from_ignore=\(3,\): expected a tuple of fnmatch patterns"):
        config_spec.train_spec(cfg)


@pytest.mark.slow  # data synthesis + one compiled train step (~1.5 min on 2 busy cores)
def test_train_loop_initialises_fresh_run_only(tmp_path):
    """``train.init_from`` through :func:`mmdit.train.loop.train`: the fresh run prints the report,
    starts from the source and trains a step; rerunning the same workdir resumes its checkpoint
    without re-initialising."""
    from mmdit.data.synth_records import synth
    from mmdit.train.loop import train

    base = ["model.num_layers=1", "train.global_batch_size=1", "train.async_checkpoint=False", "train.sample_every=0"]
    cfg = config_spec.load("configs/demo.py:tiny,plain", base)
    synth(cfg, str(tmp_path / "data"), num=2, num_eval=0, progress=False)
    src_path, _ = save_source(tmp_path / "wan", video_only_dit_params(cfg))
    notes = []
    run_cfg = config_spec.load("configs/demo.py:tiny,plain", base + ["train.steps=1", f"train.init_from={src_path}"])
    train(run_cfg, str(tmp_path / "run"), data_dir=str(tmp_path / "data" / "train"), progress=False, log=notes.append)
    assert any(n.startswith(f"init_from {src_path} (converted") and "loaded" in n for n in notes), notes
    notes.clear()  # same command again: resumes (and, at train.steps, stops before compiling)
    train(run_cfg, str(tmp_path / "run"), data_dir=str(tmp_path / "data" / "train"), progress=False, log=notes.append)
    assert any(n.startswith("resuming from step 1") for n in notes) and not any(n.startswith("init_from") for n in notes), notes
