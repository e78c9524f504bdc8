"""Each task yields its intended known/valid masks and conditions; multitask sampling per sample."""

import jax
import numpy as np
import pytest
from conftest import tiny_model_cfg

from mmdit import tasks
from mmdit.model.spec import build_spec


@pytest.fixture
def spec():
    cfg = tiny_model_cfg(mask="full & no_peek")
    with cfg.unlocked():
        cfg.streams.audio.cross = ("text", "ref_audio")
        cfg.conditions.ref_audio = dict(dim=6, length=4)
    return build_spec(cfg)


def run(name, spec, B=3):
    return tasks.task_masks(name, jax.random.key(0), spec, B)


def test_t2av_nothing_known(spec):
    m = run("t2av", spec)
    assert not any(bool(v.any()) for v in m.known.values())
    assert all(bool(v.all()) for v in m.valid.values())
    assert bool(m.present["text"].all()) and not bool(m.present["ref_audio"].any())


def test_ti2av_first_frame_known(spec):
    m = run("ti2av", spec)
    v = spec.stream("video").geometry
    k = np.asarray(m.known["video"])
    assert k[:, : v.tokens_per_frame].all() and not k[:, v.tokens_per_frame :].any()
    assert not bool(m.known["audio"].any())


def test_tr2av_has_reference_audio(spec):
    m = run("tr2av", spec)
    assert bool(m.present["ref_audio"].all()) and bool(m.present["text"].all())


def test_tv2a_and_a2v_know_the_given_modality(spec):
    m = run("tv2a", spec)
    assert bool(m.known["video"].all()) and not bool(m.known["audio"].any())
    m = run("a2v", spec)
    assert bool(m.known["audio"].all()) and not bool(m.known["video"].any())


def test_tts_drops_the_visual_stream(spec):
    m = run("tts", spec)
    assert not bool(m.valid["video"].any()) and bool(m.valid["audio"].all())


def test_inpaint_spans_cover_at_most_30_percent_contiguously(spec):
    B = 64
    m = tasks.task_masks("inpaint", jax.random.key(3), spec, B)
    fr = []
    for name in ("video", "audio"):
        s = spec.stream(name).geometry
        k = np.asarray(m.known[name]).reshape(B, s.token_frames(), s.tokens_per_frame)
        assert (k == k[..., :1]).all()  # whole frames
        per_frame = k[..., 0]
        frac = per_frame.mean(1)
        assert frac.max() <= tasks.INPAINT_MAX_FRACTION + 1e-6
        for row in per_frame:  # one contiguous span
            idx = np.where(row)[0]
            if len(idx):
                assert idx[-1] - idx[0] + 1 == len(idx)
        fr.append(frac)
    assert np.concatenate(fr).max() > 0.1  # spans do happen


def test_a2v_features_marks_other_generated_streams_absent():
    cfg = tiny_model_cfg(mask="no_peek")
    with cfg.unlocked():
        cfg.streams.feat = dict(kind="sequence", channels=5, shape=(8,), patch=(1,), rate=25.0, dim=32, ffn=64, condition=True)
    spec = build_spec(cfg)
    m = tasks.task_masks("a2v_features", jax.random.key(0), spec, 2)
    assert bool(m.known["feat"].all()) and bool(m.present["feat"].all())
    assert not bool(m.valid["audio"].any()) and bool(m.valid["video"].all())


def test_multitask_sampling_selects_per_sample(spec):
    B = 400
    m = tasks.sample_tasks(jax.random.key(1), spec, B, {"t2av": 1.0, "tv2a": 3.0})
    task = np.asarray(m.task)
    frac = (task == 1).mean()
    assert 0.65 < frac < 0.85
    kv = np.asarray(m.known["video"]).all(1)
    np.testing.assert_array_equal(kv, task == 1)
    # jit-able
    jax.jit(lambda r: tasks.sample_tasks(r, spec, 4, {"t2av": 1.0, "inpaint": 1.0}).known)(jax.random.key(0))


def test_task_errors_name_the_field_and_fix(spec):
    with pytest.raises(ValueError, match="unknown task 'x2y'"):
        tasks.validate_tasks({"x2y": 1.0}, spec)
    plain = build_spec(tiny_model_cfg())
    with pytest.raises(ValueError, match="config.tasks.tv2a.*no_peek"):
        tasks.validate_tasks({"tv2a": 1.0}, plain)
    with pytest.raises(ValueError, match="config.tasks.tr2av needs condition ref_audio"):
        tasks.validate_tasks({"tr2av": 1.0}, plain)
    with pytest.raises(ValueError, match="empty"):
        tasks.validate_tasks({}, plain)
