"""RoPE: relative-position property and cross-stream temporal alignment."""

import jax
import jax.numpy as jnp
import numpy as np

from mmdit.model import rope
from mmdit.model.streams import StreamSpec


def test_wan_band_split():
    assert rope.band_dims(128) == (44, 42, 42)
    assert rope.band_dims(64) == (24, 20, 20)
    assert sum(rope.band_dims(96)) == 96


def _score(q, k, pq, pk, rotate_hw=True, d=64):
    aq = rope.angles(*pq, d, rotate_hw=rotate_hw)
    ak = rope.angles(*pk, d, rotate_hw=rotate_hw)
    qr = rope.apply_rope(q[None, None, None], aq[None])[0, 0, 0]
    kr = rope.apply_rope(k[None, None, None], ak[None])[0, 0, 0]
    return float(jnp.dot(qr, kr))


def test_scores_depend_only_on_position_differences():
    kq, kk = jax.random.split(jax.random.key(0))
    q, k = jax.random.normal(kq, (64,)), jax.random.normal(kk, (64,))
    base = _score(q, k, (3.0, 2.0, 5.0), (1.0, 7.0, 4.0))
    for shift in [(1.0, 0.0, 0.0), (2.5, 3.0, -1.0), (10.0, 10.0, 10.0)]:
        shifted = _score(
            q, k, tuple(a + s for a, s in zip((3.0, 2.0, 5.0), shift)), tuple(a + s for a, s in zip((1.0, 7.0, 4.0), shift))
        )
        np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-4)
    # ...and they do depend on the difference
    assert abs(_score(q, k, (3.0, 2.0, 5.0), (2.0, 7.0, 4.0)) - base) > 1e-3


def test_sequence_streams_rotate_only_the_temporal_band():
    a = rope.angles(jnp.array([2.5]), jnp.array([3.0]), jnp.array([4.0]), 64, rotate_hw=False)
    t_dims = rope.band_dims(64)[0] // 2
    assert np.all(np.asarray(a[0, t_dims:]) == 0)
    assert np.all(np.asarray(a[0, 1:t_dims]) != 0)


def test_audio_token_and_video_frame_at_same_instant_share_temporal_phase():
    # Wan2.2 video: 24 fps / 4 = 6 latents/s; MMAudio: 31.25 latents/s.
    video = StreamSpec("video", "grid", 4, (8, 4, 4), (1, 2, 2), 6.0)
    audio = StreamSpec("audio", "sequence", 4, (40,), (1,), 31.25)
    tv, ta = video.aligned_time(6.0), audio.aligned_time(6.0)
    assert abs(ta[1] - 0.192) < 1e-6
    d = 64
    av = rope.stream_angles(video, tv, d)
    aa = rope.stream_angles(audio, ta, d)
    t_half = rope.band_dims(d)[0] // 2
    # audio latent 30 is at 0.96 s = 5.76 video latent frames: its temporal phase is a video
    # position's at t = 5.76.
    a_audio = aa[30, :t_half]
    a_video = rope.angles(jnp.array([5.76]), jnp.array([0.0]), jnp.array([0.0]), d)[0, :t_half]
    np.testing.assert_allclose(np.asarray(a_audio), np.asarray(a_video), rtol=1e-5)
    # audio latent 125 (4 s) and video latent frame 24 (4 s) are the same instant: same phase.
    audio_long = StreamSpec("audio", "sequence", 4, (130,), (1,), 31.25)
    video_long = StreamSpec("video", "grid", 4, (25, 2, 2), (1, 1, 1), 6.0)
    a125 = rope.stream_angles(audio_long, audio_long.aligned_time(6.0), d)[125, :t_half]
    v24 = rope.stream_angles(video_long, video_long.aligned_time(6.0), d)[24 * 4, :t_half]
    np.testing.assert_allclose(np.asarray(a125), np.asarray(v24), rtol=1e-5)
    f5 = np.where(video.positions()[:, 0] == 5)[0][0]
    np.testing.assert_allclose(
        np.asarray(av[f5, :t_half]), np.asarray(rope.angles(jnp.array([5.0]), 0.0, 0.0, d)[0, :t_half]), rtol=1e-6
    )


def test_time_factor_override():
    audio = StreamSpec("audio", "sequence", 4, (40,), (1,), 31.25)
    np.testing.assert_allclose(audio.aligned_time(6.0, factor=0.19676)[10], 1.9676, rtol=1e-6)
