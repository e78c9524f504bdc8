"""The synthetic talking-portrait world: determinism, exact durations, identity-dependent voice, speed."""

import time

import numpy as np
import pytest

from mmdit.data.synthetic import Clip, SyntheticWorld, WorldConfig


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(WorldConfig(seed=0))


def _pitch(wave: np.ndarray, sr: int, phones) -> float:
    """Median autocorrelation pitch (Hz) over the middle 60 ms of each open vowel."""
    estimates = []
    for p, s, e in phones:
        if p not in "aoe" or e - s < 0.09:
            continue
        mid = int((s + e) / 2 * sr)
        seg = wave[mid - int(0.03 * sr) : mid + int(0.03 * sr)].astype(np.float64)
        seg = (seg - seg.mean()) * np.hanning(len(seg))
        ac = np.fft.irfft(np.abs(np.fft.rfft(seg, 4 * len(seg))) ** 2)[: len(seg)]
        lo, hi = int(sr / 300), int(sr / 80)
        lag = lo + int(np.argmax(ac[lo:hi]))
        estimates.append(sr / lag)
    assert estimates, "clip has no long open vowel"
    return float(np.median(estimates))


def test_same_seed_and_index_gives_identical_bytes():
    a, b = SyntheticWorld(WorldConfig(seed=3)).clip(7), SyntheticWorld(WorldConfig(seed=3)).clip(7)
    assert a.video.tobytes() == b.video.tobytes()
    assert a.audio.tobytes() == b.audio.tobytes()
    assert a.mouth_open.tobytes() == b.mouth_open.tobytes()
    assert (a.text, a.identity, a.phones) == (b.text, b.identity, b.phones)


def test_other_index_or_seed_gives_another_clip(world):
    a, b = world.clip(0), world.clip(1)
    c = SyntheticWorld(WorldConfig(seed=1)).clip(0)
    for other in (b, c):
        assert a.audio.shape != other.audio.shape or not np.array_equal(a.audio, other.audio)
        assert a.text != other.text or a.video.shape != other.video.shape or not np.array_equal(a.video, other.video)


def test_shapes_dtypes_and_exact_durations(world):
    cfg = world.cfg
    for i in range(8):
        clip = world.clip(i)
        assert isinstance(clip, Clip)
        n = clip.video.shape[0]
        assert clip.video.shape == (n, 64, 64, 3) and clip.video.dtype == np.uint8
        assert round(cfg.min_seconds * 25) <= n <= round(cfg.max_seconds * 25)
        assert clip.audio.dtype == np.float32 and clip.audio.shape == (n * 640,)  # exactly n / 25 s at 16 kHz
        assert np.abs(clip.audio).max() <= 1.0
        assert clip.mouth_open.shape == (n,) and clip.mouth_open.dtype == np.float32
        assert 0.0 <= clip.mouth_open.min() and clip.mouth_open.max() <= 1.0
        assert world.num_frames(i) == n and clip.seconds == pytest.approx(n / 25)
        # Phones tile [0, n/25] exactly, start and end with a pause, and spell the transcript.
        assert clip.phones[0][1] == 0.0 and clip.phones[-1][2] == pytest.approx(n / 25)
        assert clip.phones[0][0] == "_" and clip.phones[-1][0] == "_"
        for (_, _, end), (_, start, _) in zip(clip.phones, clip.phones[1:]):
            assert start == pytest.approx(end)
        assert "".join(p for p, _, _ in clip.phones if p != "_") == clip.text.replace(" ", "")
        assert all(w in cfg.vocabulary for w in clip.text.split())
        assert 0 <= clip.identity < cfg.num_identities


def test_fixed_length_clips():
    world = SyntheticWorld(WorldConfig(min_seconds=2.0, max_seconds=2.0))
    for i in range(4):
        clip = world.clip(i)
        assert clip.video.shape[0] == 50 and clip.audio.shape == (32000,)
        assert len(clip.text) > 0


def test_speech_is_silent_in_pauses_and_loud_in_vowels(world):
    clip = world.clip(2)
    sr = 16000

    def rms(p):
        segs = [clip.audio[int(s * sr) + 320 : int(e * sr) - 320] for q, s, e in clip.phones if q == p and e - s > 0.06]
        return np.sqrt(np.mean(np.concatenate(segs) ** 2)) if segs else None

    assert rms("_") < 0.01
    vowels = [v for v in (rms(p) for p in "aoe") if v is not None]
    assert vowels and min(vowels) > 10 * rms("_")


def test_voice_is_a_function_of_identity(world):
    indices: dict[int, list[int]] = {}
    for i in range(80):  # cheap: identity_of renders nothing
        indices.setdefault(world.identity_of(i), []).append(i)
    f0 = {k: world.identity_params(k).f0 for k in indices if len(indices[k]) >= 2}
    low, high = min(f0, key=f0.get), max(f0, key=f0.get)
    assert f0[high] > 1.4 * f0[low]
    clips = {k: [world.clip(i) for i in indices[k][:2]] for k in (low, high)}
    for k in (low, high):
        for clip in clips[k]:
            assert clip.identity == k
            # Measured pitch matches the identity's voice (within declination and vibrato).
            assert _pitch(clip.audio, 16000, clip.phones) == pytest.approx(f0[k], rel=0.12)
    # Same identity in two clips: the same face colours; another identity's differ.
    a, b = clips[low]
    np.testing.assert_array_equal(a.video[0, :2, :2], b.video[0, :2, :2])
    assert np.abs(a.video[0, :2, :2].astype(int) - clips[high][0].video[0, :2, :2]).max() > 5
    # Higher voices have higher formants (a smaller vocal tract), as in people.
    params = [world.identity_params(k) for k in range(world.cfg.num_identities)]
    assert np.corrcoef([np.log(p.f0) for p in params], [p.formant_scale for p in params])[0, 1] > 0.5
    np.testing.assert_array_equal(SyntheticWorld(WorldConfig(seed=0)).identity_params(low).skin, world.identity_params(low).skin)


def test_mouth_opens_on_vowels_and_closes_in_pauses(world):
    clip = world.clip(4)
    t = (np.arange(len(clip.mouth_open)) + 0.5) / 25
    for p, s, e in clip.phones:
        inside = (t > s + 0.04) & (t < e - 0.04)
        if not inside.any():
            continue
        if p == "a":
            assert clip.mouth_open[inside].max() > 0.8
        if p in "_mbp":
            assert clip.mouth_open[inside].max() < 0.15


def test_generation_is_fast():
    world = SyntheticWorld(WorldConfig(min_seconds=3.0, max_seconds=3.0))
    world.clip(0)
    start = time.perf_counter()
    for i in range(5):
        world.clip(i)
    per_clip = (time.perf_counter() - start) / 5
    assert per_clip < 0.4, f"a 3 s clip took {per_clip:.3f} s (target well under 0.2 s)"


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="sample_rate"):
        SyntheticWorld(WorldConfig(sample_rate=16001))
    with pytest.raises(ValueError, match="vocabulary"):
        SyntheticWorld(WorldConfig(vocabulary=("hello",)))
    with pytest.raises(ValueError, match="min_seconds"):
        SyntheticWorld(WorldConfig(min_seconds=3.0, max_seconds=2.0))
