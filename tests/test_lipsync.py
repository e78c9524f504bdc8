"""Lip-sync and identity metrics on ground-truth synthetic clips, and on broken versions of them."""

import json

import numpy as np
import pytest

from mmdit.data.synthetic import SyntheticWorld, WorldConfig
from mmdit.eval import lipsync
from mmdit.eval.identity import identity_metrics, locate_portrait

SPF = 640  # samples per frame at 16 kHz / 25 fps


@pytest.fixture(scope="module")
def clips():
    world = SyntheticWorld(WorldConfig(seed=0, min_seconds=2.0, max_seconds=2.0))
    return [world.clip(i) for i in range(8)]


def _shift(audio: np.ndarray, frames: int) -> np.ndarray:
    """Audio moved ``frames`` earlier (> 0: audio leads the video) or later (< 0), zero-filled."""
    n = abs(frames) * SPF
    pad = np.zeros(n, audio.dtype)
    return np.concatenate([audio[n:], pad]) if frames > 0 else np.concatenate([pad, audio[:-n]])


def test_mouth_track_follows_ground_truth_opening(clips):
    for clip in clips:
        track = lipsync.mouth_opening_track(clip.video)
        assert np.corrcoef(track, clip.mouth_open)[0, 1] > 0.95


def test_ground_truth_clips_are_in_sync(clips):
    for clip in clips:
        result = lipsync.evaluate_clip(clip.video, clip.audio)
        assert result["sync_corr"] >= 0.6, result
        assert abs(result["sync_offset"]) <= 1, result
        assert result["sync_conf"] > 0.4
        json.dumps(result)  # JSON-able floats
        assert all(isinstance(v, float) for v in result.values())


def test_swapped_or_far_shifted_audio_loses_sync(clips):
    true, swapped, shifted, at0_swapped, at0_shifted = [], [], [], [], []
    for i, clip in enumerate(clips):
        other = clips[(i + 1) % len(clips)]
        true.append(lipsync.evaluate_clip(clip.video, clip.audio)["sync_corr"])
        r = lipsync.evaluate_clip(clip.video, other.audio)
        swapped.append(r["sync_corr"])
        at0_swapped.append(r["sync_corr_at_0"])
        r = lipsync.evaluate_clip(clip.video, _shift(clip.audio, 10))
        shifted.append(r["sync_corr"])
        at0_shifted.append(r["sync_corr_at_0"])
    # At the true alignment the correlation vanishes; the best over +-8 lags falls to chance level.
    assert abs(np.mean(at0_swapped)) < 0.2 and abs(np.mean(at0_shifted)) < 0.2
    assert np.mean(swapped) < np.mean(true) - 0.3
    assert np.mean(shifted) < np.mean(true) - 0.3


@pytest.mark.parametrize("frames", [3, -3, 5])
def test_best_offset_recovers_an_artificial_shift(clips, frames):
    # Positive offset = audio leads: the sound comes `frames` frames before the mouth shows it.
    for clip in clips[:4]:
        mouth = lipsync.mouth_opening_track(clip.video)
        env = lipsync.audio_envelope(_shift(clip.audio, frames), len(mouth))
        corr, offset = lipsync.sync_confidence(mouth, env)
        assert offset == frames and corr > 0.5


def test_envelope_windows_and_units(clips):
    clip = clips[0]
    env = lipsync.audio_envelope(clip.audio)
    assert env.shape == (50,) and env.dtype == np.float32
    # Frame n's window is samples [640 n, 640 (n + 1)): a click there raises exactly that frame.
    wave = np.full(32000, 1e-3, np.float32)
    wave[640 * 7 + 100 : 640 * 7 + 140] = 0.5
    env = lipsync.audio_envelope(wave)
    assert int(np.argmax(env)) == 7 and env[6] < env[7] - 1 and env[8] < env[7] - 1


def test_frozen_mouth_scores_zero(clips):
    clip = clips[0]
    frozen = np.repeat(clip.video[:1], len(clip.video), axis=0)
    result = lipsync.evaluate_clip(frozen, clip.audio)
    assert result["sync_corr"] == pytest.approx(0.0, abs=1e-6) and result["mouth_motion"] < 1e-3


def test_works_on_float_frames_in_minus_one_one(clips):
    clip = clips[1]
    as_float = clip.video.astype(np.float32) / 127.5 - 1.0
    a = lipsync.evaluate_clip(clip.video, clip.audio)
    b = lipsync.evaluate_clip(as_float, clip.audio)
    assert b["sync_corr"] == pytest.approx(a["sync_corr"], abs=1e-3)


def test_bad_input_raises_naming_the_argument(clips):
    clip = clips[0]
    with pytest.raises(ValueError, match="silent"):
        lipsync.evaluate_clip(clip.video, np.zeros_like(clip.audio))
    with pytest.raises(ValueError, match="sample_rate=22050"):
        lipsync.evaluate_clip(clip.video, clip.audio, sample_rate=22050)
    with pytest.raises(ValueError, match="wave lasts"):
        lipsync.evaluate_clip(clip.video, clip.audio[:16000])
    with pytest.raises(ValueError, match="frames"):
        lipsync.evaluate_clip(clip.video[..., 0], clip.audio)
    with pytest.raises(ValueError, match="too short"):
        lipsync.sync_confidence(np.ones(10), np.ones(10), max_offset=8)
    with pytest.raises(ValueError, match="no portrait"):
        locate_portrait(np.zeros((5, 64, 64, 3), np.uint8))


def test_a_clip_without_a_face_scores_instead_of_failing(clips):
    """A generated clip with no face (a failed sample) is measured at a centred face's mouth: it gets figures
    (near chance) and ``face_found`` 0, and the eval of the other clips goes on; a real clip has ``face_found`` 1."""
    clip = clips[0]
    rng = np.random.default_rng(0)
    blank = np.full_like(clip.video, 90) + rng.integers(0, 3, clip.video.shape).astype(np.uint8)
    m = lipsync.evaluate_clip(blank, clip.audio)
    assert m["face_found"] == 0.0 and np.isfinite(m["sync_corr_at_0"]) and abs(m["sync_corr_at_0"]) < 0.5
    assert lipsync.evaluate_clip(clip.video, clip.audio)["face_found"] == 1.0


def test_identity_metrics_detect_an_identity_change():
    world = SyntheticWorld(WorldConfig(seed=0, min_seconds=2.0, max_seconds=2.0))
    a = world.clip(0)
    other = next(
        i
        for i in range(1, 100)
        if world.identity_params(world.identity_of(i)).background.tolist()
        != world.identity_params(a.identity).background.tolist()
    )
    b = world.clip(other)
    same = identity_metrics(a.video)
    assert same["background_drift_max"] < 0.02 and same["skin_drift_max"] < 0.05
    assert same["identity_hist_sim_min"] > 0.9 and same["identity_thumb_cos_min"] > 0.85
    mixed = identity_metrics(np.concatenate([a.video[:25], b.video[25:]]))
    assert mixed["background_drift_max"] > 0.1
    assert mixed["identity_hist_sim_min"] < 0.6 and mixed["identity_thumb_cos_min"] < 0.7
