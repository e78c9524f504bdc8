"""The conditioning pieces of issue 14: TalkingMachines' speaking/silence embedding, face-local audio
cross-attention, JAM-Flow inpainting of chosen regions, and the CLI's condition inputs."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdit import config_lib
from mmdit import tasks as tasks_lib
from mmdit.model import inputs
from mmdit.model.diffusion import DiffusionModel
from mmdit.model.mmdit import StreamIO


def _talkingmachines(**audio_features):
    """TalkingMachines :tiny with one layer (a token's output then depends on its own cross-attention only)."""
    cfg = config_lib.load("talkingmachines:tiny")
    cfg.model.num_layers = 1
    for k, v in audio_features.items():
        cfg.model.conditions.audio_features[k] = v
    return cfg


def _init(model, seed):
    return nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed)))


def _velocity(model):
    """The jitted ``model.velocity(params, tokens, sigma, raw, cond_keep=keep)`` (one compile, not op-by-op)."""
    return jax.jit(lambda p, t, s, r, k=None: model.velocity(p, t, s, r, cond_keep=k))


def _param_paths(model) -> set[str]:
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0)))
    return {"/".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(shapes)}


def _inputs(model, batch=2, seed=0):
    """Random tokens, sigma and raw conditions for ``model``."""
    sp = model.spec
    keys = iter(jax.random.split(jax.random.key(seed), 16))
    tokens = {a.name: jax.random.normal(next(keys), (batch, a.geometry.num_tokens, a.geometry.token_dim)) for a in sp.streams}
    sigma = {n: jnp.full((batch, sp.stream(n).geometry.num_tokens), 0.7) for n in sp.generated}
    raw = {}
    for f in model.input_spec().condition_fields:
        if f.role == "tokens":
            raw[f.name] = jax.random.randint(next(keys), (batch, *f.shape), 1, 200)
        elif f.role == "features":
            raw[f.name] = jax.random.normal(next(keys), (batch, *f.shape))
    return tokens, sigma, raw


# ----------------------------------------------------------------------------------------------
# Silence embedding
# ----------------------------------------------------------------------------------------------


def test_silence_params_and_field_only_when_configured():
    plain = DiffusionModel.from_config(_talkingmachines())
    silent = DiffusionModel.from_config(_talkingmachines(silence_embedding=True))
    assert inputs.SPEAKING_FRAMES not in [f.name for f in plain.input_spec().fields]
    field = next(f for f in silent.input_spec().fields if f.name == inputs.SPEAKING_FRAMES)
    assert field.shape == (silent.spec.reference_frames,) and field.optional  # records need not carry it
    assert inputs.SPEAKING_FRAMES not in silent.input_spec().record_keys()
    labelled = DiffusionModel.from_config(_talkingmachines(silence_embedding=True, silence_labels=True))
    assert inputs.SPEAKING_FRAMES in labelled.input_spec().record_keys()
    added = _param_paths(silent) - _param_paths(plain)
    assert added == {"dit/params/video/silence_audio_features/embedding"}, added


@pytest.fixture(scope="module")
def talking():
    """TalkingMachines :tiny (one layer) with a silence embedding, face-local (``local``) and not (``full``):
    one param tree serves both (face_local adds no params); each velocity is compiled once."""
    local = DiffusionModel.from_config(_talkingmachines(silence_embedding=True, face_local=True))
    full = DiffusionModel.from_config(_talkingmachines(silence_embedding=True))
    params = _init(local, 1)
    tokens, sigma, raw = _inputs(local)
    F = local.spec.reference_frames
    raw = {**raw, inputs.SPEAKING_FRAMES: jnp.ones((2, F), jnp.int32)}
    keep = {c: jnp.ones((2,), bool) for c in local.spec.keep_names}
    return dict(
        local=local,
        full=full,
        params=params,
        tokens=tokens,
        sigma=sigma,
        raw=raw,
        keep=keep,
        v_local=_velocity(local),
        v_full=_velocity(full),
    )


def test_silence_replaces_exactly_the_condition_tokens_of_silent_frames(talking):
    model, params = talking["full"], talking["params"]
    sp = model.spec
    conds, _ = model.encode_conditions(params, talking["raw"])
    io = StreamIO(sp.stream("video"), sp)
    io_params = {"params": params["dit"]["params"]["video"]}
    embed = jax.jit(lambda c: io.apply(io_params, talking["tokens"]["video"], talking["sigma"]["video"], c, method="embed")[3])
    F = sp.reference_frames
    speaking = np.ones((2, F), np.int32)
    speaking[0, 1:3] = 0  # a listening phase in sample 0
    base = embed({**conds, inputs.SPEAKING_FRAMES: jnp.ones((2, F), jnp.int32)})
    quiet = embed({**conds, inputs.SPEAKING_FRAMES: jnp.asarray(speaking)})
    arch = sp.condition("audio_features")
    frame = np.clip(np.floor(np.arange(arch.length) * sp.reference_rate / arch.rate + 1e-4), 0, F - 1).astype(int)
    silent = np.zeros((2, arch.length), bool)
    silent[0] = (frame >= 1) & (frame < 3)
    assert silent[0].any() and not silent[0].all()
    a, b = np.asarray(base["audio_features"]), np.asarray(quiet["audio_features"])
    np.testing.assert_array_equal(a[~silent], b[~silent])  # speaking tokens bit-exact
    no_silence = embed({k: v for k, v in conds.items() if k != inputs.SPEAKING_FRAMES})  # the embedding is skipped
    np.testing.assert_array_equal(a, np.asarray(no_silence["audio_features"]))  # speaking everywhere: nothing changes
    emb = np.asarray(params["dit"]["params"]["video"]["silence_audio_features"]["embedding"])
    np.testing.assert_array_equal(b[silent], np.broadcast_to(emb, b[silent].shape))
    np.testing.assert_array_equal(np.asarray(base["text"]), np.asarray(quiet["text"]))  # other conditions untouched


def test_silence_mode_changes_the_output_and_per_clip_labels_broadcast(talking):
    model, velocity, raw = talking["full"], talking["v_full"], talking["raw"]
    args = talking["params"], talking["tokens"], talking["sigma"]
    v_speaking = np.asarray(velocity(*args, raw, talking["keep"])["video"])
    v_silent = np.asarray(
        velocity(*args, {**raw, inputs.SPEAKING_FRAMES: jnp.zeros_like(raw[inputs.SPEAKING_FRAMES])}, talking["keep"])["video"]
    )
    assert not np.allclose(v_speaking, v_silent)
    F = model.spec.reference_frames
    per_clip = model.input_spec().conditions_of({**raw, inputs.SPEAKING_CLIP: np.array([0, 1], np.int32)})
    np.testing.assert_array_equal(np.asarray(per_clip[inputs.SPEAKING_FRAMES]), np.ones((2, F)))  # frames win
    del raw[inputs.SPEAKING_FRAMES]
    per_clip = model.input_spec().conditions_of({**raw, inputs.SPEAKING_CLIP: np.array([0, 1], np.int32)})
    np.testing.assert_array_equal(np.asarray(per_clip[inputs.SPEAKING_FRAMES]), np.repeat([[0], [1]], F, axis=1))


def test_silence_config_errors_name_the_field():
    with pytest.raises(ValueError, match="silence_labels=True needs"):
        DiffusionModel.from_config(_talkingmachines(silence_labels=True))
    cfg = config_lib.load("unitalking:tiny")
    cfg.model.conditions.ref_audio.silence_embedding = True
    with pytest.raises(ValueError, match=r"model.conditions.ref_audio.silence_embedding needs .*rate"):
        DiffusionModel.from_config(cfg)


# ----------------------------------------------------------------------------------------------
# Face-local cross-attention
# ----------------------------------------------------------------------------------------------


def _video_tokens_in_box(model, box):
    g = model.spec.stream("video").geometry
    pos = g.positions()
    gh, gw = g.grid[1], g.grid[2]
    x0, y0, x1, y1 = box
    return (pos[:, 2] / gw < x1) & ((pos[:, 2] + 1) / gw > x0) & (pos[:, 1] / gh < y1) & ((pos[:, 1] + 1) / gh > y0)


def test_face_local_zeroes_the_contribution_outside_the_box_exactly(talking):
    local, velocity = talking["local"], talking["v_local"]
    assert inputs.FACE_BOX in local.input_spec().record_keys()  # the ingest's face boxes are read in training
    assert inputs.FACE_BOX not in talking["full"].input_spec().record_keys()
    args, raw, keep = (talking["params"], talking["tokens"], talking["sigma"]), talking["raw"], talking["keep"]
    box = (0.0, 0.0, 0.5, 0.5)
    inside = _video_tokens_in_box(local, box)
    assert inside.any() and not inside.all()
    raw_box = {**raw, inputs.FACE_BOX: jnp.asarray([box, box], jnp.float32)}
    drop = {**keep, "audio_features": jnp.zeros((2,), bool)}
    with_audio = np.asarray(velocity(*args, raw_box, keep)["video"])
    without = np.asarray(velocity(*args, raw_box, drop)["video"])
    np.testing.assert_array_equal(with_audio[:, ~inside], without[:, ~inside])  # no contribution outside
    assert not np.allclose(with_audio[:, inside], without[:, inside])
    reference = np.asarray(talking["v_full"](*args, raw, keep)["video"])
    np.testing.assert_allclose(with_audio[:, inside], reference[:, inside], rtol=0, atol=1e-6)  # inside unchanged
    whole = {**raw, inputs.FACE_BOX: jnp.asarray([inputs.FULL_FRAME_BOX] * 2, jnp.float32)}
    np.testing.assert_allclose(np.asarray(velocity(*args, whole, keep)["video"]), reference, rtol=0, atol=1e-6)


def test_face_local_config_error_names_the_field():
    cfg = config_lib.load("unitalking:tiny")
    cfg.model.conditions.ref_audio.face_local = True  # only the audio (sequence) stream attends it
    with pytest.raises(ValueError, match="model.conditions.ref_audio.face_local"):
        DiffusionModel.from_config(cfg)


# ----------------------------------------------------------------------------------------------
# Inpainting regions
# ----------------------------------------------------------------------------------------------


def test_region_known_marks_the_overlapping_tokens():
    model = DiffusionModel.from_config(config_lib.load("demo:tiny"))
    sp = model.spec
    g = sp.stream("audio").geometry
    step = g.patch[0] / g.rate
    known = tasks_lib.region_known(sp, {"audio": [(2 * step, 4.5 * step)]}, 1)
    regenerate = ~np.asarray(known["audio"][0]).reshape(g.token_frames(), -1)[:, 0]
    np.testing.assert_array_equal(np.flatnonzero(regenerate), [2, 3, 4])
    assert np.asarray(known["video"]).all()  # a stream not named is kept whole
    seconds = tasks_lib.stream_seconds(sp, "audio")
    for bad, match in (
        ({"audio": [(0.5 * seconds, 2 * seconds)]}, "--inpaint: audio span"),
        ({"audio": [(0.3, 0.1)]}, "--inpaint: audio span"),
        ({"audio": [(-0.1, 0.1)]}, "--inpaint: audio span"),
        ({"text": [(0.0, 0.1)]}, "--inpaint: stream 'text' is not a generated stream"),
    ):
        with pytest.raises(ValueError, match=match):
            tasks_lib.region_known(sp, bad, 1, label="--inpaint")


@pytest.mark.slow
def test_sampler_regions_regenerate_exactly_the_span():
    from mmdit.sample.sampler import Sampler

    cfg = config_lib.load("demo:tiny")
    model = DiffusionModel.from_config(cfg)
    sp = model.spec
    params = _init(model, 4)
    sampler = Sampler(model, cfg, compiler_options={"xla_backend_optimization_level": 0})
    rng = np.random.default_rng(0)
    clean = {n: rng.standard_normal((1, *sp.stream(n).geometry.latent_shape)).astype(np.float32) for n in sp.generated}
    _, _, raw = _inputs(model, batch=1)
    g = sp.stream("audio").geometry
    span = (3 * g.patch[0] / g.rate, 6 * g.patch[0] / g.rate)
    out = sampler.sample(
        params, jax.random.key(5), task="inpaint", batch=1, known_latents=clean, raw_conds=raw, steps=2, regions={"audio": [span]}
    )
    np.testing.assert_array_equal(np.asarray(out["video"]), clean["video"])
    audio, given = np.asarray(out["audio"])[0], clean["audio"][0]
    inside = np.zeros(g.shape[0], bool)
    inside[3 * g.patch[0] : 6 * g.patch[0]] = True
    np.testing.assert_array_equal(audio[~inside], given[~inside])
    assert np.all(np.any(audio[inside] != given[inside], axis=-1))
    with pytest.raises(ValueError, match="regions= chooses the spans task 'inpaint'"):
        sampler.sample(params, jax.random.key(5), task="t2av", batch=1, raw_conds=raw, steps=2, regions={"audio": [span]})


# ----------------------------------------------------------------------------------------------
# Sampling inputs: spans from strings, silence frames, silence dropout, conditions from files
# ----------------------------------------------------------------------------------------------


def test_parse_regions_and_silence():
    from mmdit.sample import inputs as sample_inputs

    assert sample_inputs.parse_regions(["audio:1.0-2.5,3-3.5", "video:0:0.5", "audio:4-5"]) == {
        "audio": [(1.0, 2.5), (3.0, 3.5), (4.0, 5.0)],
        "video": [(0.0, 0.5)],
    }
    assert sample_inputs.parse_regions(None) is None and sample_inputs.parse_silence([]) is None
    assert sample_inputs.parse_silence(["0:1.5,3.0:4.0"]) == [(0.0, 1.5), (3.0, 4.0)]
    for bad in (["audio"], ["audio:"], ["audio:1.0"], ["audio:a-b"]):
        with pytest.raises(ValueError, match="--inpaint"):
            sample_inputs.parse_regions(bad)
    with pytest.raises(ValueError, match="--silence"):
        sample_inputs.parse_silence(["1.5"])


def test_silence_spans_map_to_reference_frames():
    from mmdit.sample import inputs as sample_inputs

    spec = DiffusionModel.from_config(_talkingmachines(silence_embedding=True)).spec
    g = spec.stream(spec.time_reference).geometry
    frames = sample_inputs.speaking_frames(spec, [(1.0 / g.rate, 2.5 / g.rate)])
    expect = np.ones(g.shape[0], np.int32)
    expect[1:3] = 0
    np.testing.assert_array_equal(frames, expect)
    with pytest.raises(ValueError, match="--silence: span"):
        sample_inputs.speaking_frames(spec, [(0.0, 10 * g.shape[0] / g.rate)])
    with pytest.raises(ValueError, match="--silence: this model has no silence embedding"):
        sample_inputs.speaking_frames(DiffusionModel.from_config(_talkingmachines()).spec, [(0.0, 0.1)])


def test_silence_dropout_and_its_config():
    from mmdit import config_spec, flow

    speaking = np.ones((4000, 3), np.int32)
    speaking[:, 0] = 0  # a labelled silent frame stays silent
    out = np.asarray(flow.silence_dropout(jax.random.key(0), speaking, 0.25))
    silent_clips = (out == 0).all(axis=1)
    assert 0.2 < silent_clips.mean() < 0.3
    np.testing.assert_array_equal(out[~silent_clips], speaking[~silent_clips])
    cfg = _talkingmachines()
    cfg.flow.silence_dropout = 0.1
    spec = DiffusionModel.from_config(cfg).spec
    with pytest.raises(ValueError, match="flow.silence_dropout=0.1 trains a silence embedding"):
        config_spec.flow_spec(cfg, spec)
    cfg = _talkingmachines(silence_embedding=True)
    cfg.flow.silence_dropout = 0.1
    assert config_spec.flow_spec(cfg, DiffusionModel.from_config(cfg).spec).silence_dropout == 0.1


def _wav(tmp_path, seconds: float, rate: int = 16000) -> str:
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    path = str(tmp_path / "voice.wav")
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)
    return path


def _prepare(cfg, task, tmp_path, **kw):
    from mmdit.sample import inputs as sample_inputs
    from mmdit.sample.sampler import Sampler

    model = DiffusionModel.from_config(cfg)
    sampler = Sampler(model, cfg)
    roles = tasks_lib.roles(model.spec, cfg.model)
    media = sample_inputs.MediaEncoder.from_config(cfg, model.spec, roles, note=lambda m: None)
    evals = sample_inputs.EvalRecords(None)
    return sample_inputs.prepare_task_inputs(sampler, task, 2, 0, media, roles, evals, text="hello", **kw)


def test_ref_audio_and_audio_features_from_files(tmp_path):
    cfg = config_lib.load("unitalking:tiny")
    with pytest.raises(ValueError, match="--ref-audio"):
        _prepare(cfg, "tr2av", tmp_path)  # TR2AV without its reference voice: the error names the flag
    p = _prepare(cfg, "tr2av", tmp_path, ref_audio=_wav(tmp_path, 0.3))
    ref = DiffusionModel.from_config(cfg).spec.condition("ref_audio")
    assert p.raw["ref_audio"].shape == (2, ref.length, ref.dim) and np.abs(p.raw["ref_audio"]).sum() > 0
    assert p.sources["ref_audio"].startswith("--ref-audio")
    t2av = _prepare(cfg, "t2av", tmp_path)  # the task drops ref_audio: zeros fill the schema
    assert not t2av.raw["ref_audio"].any()

    cfg = _talkingmachines(silence_embedding=True, face_local=True)
    with pytest.raises(ValueError, match="--audio"):
        _prepare(cfg, "ti2av", tmp_path)
    feats_cfg = DiffusionModel.from_config(cfg).spec.condition("audio_features")
    wav = _wav(tmp_path, 5.0)
    from PIL import Image

    image = str(tmp_path / "face.png")
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(image)
    p = _prepare(cfg, "ti2av", tmp_path, audio=wav, image=image, silence=[(0.0, 0.2)])
    assert p.raw["audio_features"].shape == (2, feats_cfg.length, feats_cfg.dim)
    assert p.sources["audio_features"] == f"--audio {wav}"
    assert p.raw[inputs.FACE_BOX].shape == (2, 4) and p.sources[inputs.FACE_BOX] == "whole frame"
    speaking = p.raw[inputs.SPEAKING_FRAMES]
    assert speaking.shape == (2, DiffusionModel.from_config(cfg).spec.reference_frames) and speaking[:, 0].sum() == 0


def test_sample_cli_flags_are_checked_before_loading(tmp_path, capsys):
    from mmdit.cli import sample as sample_cli

    missing = str(tmp_path / "no_such_bundle")
    for argv, message in (
        (["--inpaint", "audio"], "--inpaint 'audio': use STREAM:START-END"),
        (["--silence", "1.5"], "--silence '1.5'"),
        (["--ref-audio", str(tmp_path / "none.wav")], "--ref-audio"),
        (["--face-box", "0.5,0.2,0.4,0.8"], "--face-box '0.5,0.2,0.4,0.8'"),
    ):
        assert sample_cli.main(["--bundle", missing, "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "no_such_bundle" not in err, err
    help_text = sample_cli._parser().format_help()
    assert "--inpaint" in help_text and "--silence" in help_text and "--ref-audio" in help_text


def test_face_boxes_for_sampling():
    from mmdit.sample import inputs as sample_inputs

    assert sample_inputs.parse_face_box("0.25,0.1,0.75,0.9") == (0.25, 0.1, 0.75, 0.9)
    assert sample_inputs.parse_face_box(None) is None
    notes = []
    evals = sample_inputs.EvalRecords(None)
    box, source = sample_inputs.face_boxes(evals, 2, (0.25, 0.1, 0.75, 0.9))
    np.testing.assert_array_equal(box, np.float32([[0.25, 0.1, 0.75, 0.9]] * 2))
    assert source == "--face-box 0.25,0.1,0.75,0.9"
    box, source = sample_inputs.face_boxes(evals, 1, None, note=notes.append)
    np.testing.assert_array_equal(box, np.float32([inputs.FULL_FRAME_BOX]))
    assert source == "whole frame" and "--face-box" in notes[0]


def test_synthetic_records_carry_the_face_box_for_face_local():
    from mmdit.data.synth_records import RecordMaker, world_from_config

    cfg = config_lib.load("configs/talkingmachines.py:tiny")
    cfg.model.conditions.audio_features.face_local = True
    maker = RecordMaker(cfg, world_from_config(cfg))
    rec = maker.record(3)
    ident = maker.world.identity_params(rec["identity"])
    x0, y0, x1, y1 = rec["face_box"]
    size = maker.world.cfg.video_size
    assert 0 <= x0 < ident.cx / size < x1 <= 1 and 0 <= y0 < ident.cy / size < y1 <= 1
    cfg.model.conditions.audio_features.face_local = False
    assert "face_box" not in RecordMaker(cfg, world_from_config(cfg)).record(3)
