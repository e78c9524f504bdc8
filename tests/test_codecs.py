"""Weight-free codecs (pixels, mel) and the byte text path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdit.codecs.base import AudioCodec, VideoCodec
from mmdit.codecs.mel import MelCodec
from mmdit.codecs.pixels import PixelCodec
from mmdit.codecs.text import BOS, EOS, PAD, ByteTokenizer
from mmdit.model.text_encoder import ByteTextEncoder
from mmdit.data.synthetic import SyntheticWorld, WorldConfig
from mmdit.eval import lipsync


@pytest.fixture(scope="module")
def clips():
    world = SyntheticWorld(WorldConfig(seed=0, min_seconds=2.0, max_seconds=2.0, num_identities=64))
    return [world.clip(i) for i in range(6)]


def _frames(clip, n=49):
    return clip.video[None, :n].astype(np.float32) / 127.5 - 1.0


# ------------------------------------------------------------------------------------------- pixels
def test_pixel_codec_shapes_and_frame_counts():
    codec = PixelCodec()
    assert isinstance(codec, VideoCodec)
    assert (codec.latent_channels, codec.temporal_compression, codec.spatial_compression) == (64, 4, 8)
    assert codec.latent_rate == 6.25
    assert codec.latent_frames(49) == 13 and codec.num_frames(13) == 49 and codec.latent_frames(1) == 1
    assert codec.valid_num_frames(50) == 49 and codec.valid_num_frames(53) == 53
    assert codec.latent_shape(49, 64, 64) == (13, 8, 8, 64)
    with pytest.raises(ValueError, match=r"1 \+ 4k.*trim"):
        codec.latent_frames(50)
    with pytest.raises(ValueError, match="multiple of spatial_compression"):
        codec.latent_shape(49, 60, 64)


def test_pixel_codec_encode_decode_shapes_and_scale(clips):
    codec = PixelCodec()
    x = np.concatenate([_frames(c) for c in clips])
    z = codec.encode(x)
    assert z.shape == (len(clips), 13, 8, 8, 64) and z.dtype == np.float32
    assert abs(float(z.mean())) < 0.3 and 0.6 < float(z.std()) < 1.6  # roughly unit scale
    y = codec.decode(z)
    assert y.shape == x.shape and y.dtype == np.float32 and y.min() >= -1 and y.max() <= 1
    assert np.abs(y - x).mean() < 0.06  # a low-pass, not a different picture


def test_pixel_codec_trims_other_frame_counts(clips):
    codec = PixelCodec()
    x = _frames(clips[0], 50)
    with pytest.raises(ValueError, match="trim=True"):
        codec.encode(x)
    np.testing.assert_array_equal(codec.encode(x, trim=True), codec.encode(x[:, :49]))


def test_pixel_codec_lossless_when_keeping_every_coefficient(clips):
    codec = PixelCodec(luma_coeffs=64, chroma_coeffs=64)
    assert codec.latent_channels == 4 * 192
    x = _frames(clips[0])
    np.testing.assert_allclose(codec.decode(codec.encode(x)), x, atol=1e-5)


@pytest.mark.parametrize("temporal", [1, 4])
def test_pixel_codec_residual_frames(clips, temporal):
    """``residual_gain``: frame 0 absolute, later latent frames g * (difference from frame 0); the same pictures
    out, and a static clip codes as exact zeros after its first latent frame."""
    absolute = PixelCodec(temporal=temporal, luma_coeffs=64, chroma_coeffs=64)
    residual = PixelCodec(temporal=temporal, luma_coeffs=64, chroma_coeffs=64, residual_gain=4.0)
    x = _frames(clips[0])
    za, zr = absolute.encode(x), residual.encode(x)
    np.testing.assert_array_equal(zr[:, :1], za[:, :1])
    np.testing.assert_allclose(zr[:, 1:], 4.0 * (za[:, 1:] - za[:, :1]), atol=1e-4)
    np.testing.assert_allclose(residual.decode(zr, clip=False), x, atol=1e-5)
    static = np.repeat(x[:, :1], 49, axis=1)
    assert np.abs(residual.encode(static)[:, 1:]).max() < 1e-5
    # an error e in a later latent frame decodes to e / gain of a change
    bump = np.zeros_like(zr)
    bump[:, 3] = 1.0
    change = residual.decode(zr + bump, clip=False) - residual.decode(zr, clip=False)
    np.testing.assert_allclose(
        change, absolute.decode(za + bump, clip=False) / 4.0 - absolute.decode(za, clip=False) / 4.0, atol=1e-5
    )
    with pytest.raises(ValueError, match="residual_gain"):
        PixelCodec(residual_gain=0.0)


def test_pixel_codec_is_a_projection():
    codec = PixelCodec()
    z = np.random.default_rng(0).standard_normal((1, 3, 8, 8, 64)).astype(np.float32)
    again = codec.encode(codec.decode(z, clip=False))
    np.testing.assert_allclose(again[:, 1:], z[:, 1:], atol=1e-4)  # every latent is a valid code...
    # ... except latent frame 0, whose 4 slots hold one frame: decoding averages them.
    slot_mean = z[:, 0].reshape(1, 8, 8, 4, 16).mean(axis=3, keepdims=True)
    np.testing.assert_allclose(again[:, 0].reshape(1, 8, 8, 4, 16), np.broadcast_to(slot_mean, (1, 8, 8, 4, 16)), atol=1e-4)


def test_pixel_codec_temporal_layout(clips):
    """Frame 0 -> latent 0 alone; frames 4f-3..4f -> latent f; every frame is kept (no averaging)."""
    codec = PixelCodec(luma_coeffs=64, chroma_coeffs=64)
    x = _frames(clips[0], 9)
    z = codec.encode(x)
    for frame, latent in ((0, 0), (1, 1), (4, 1), (5, 2), (8, 2)):
        bumped = x.copy()
        bumped[:, frame, 10:20, 10:20] += 0.1
        changed = np.abs(codec.encode(bumped) - z).max(axis=(0, 2, 3, 4)) > 1e-4
        assert changed.tolist() == [i == latent for i in range(3)], (frame, changed)
        np.testing.assert_allclose(codec.decode(codec.encode(bumped))[:, frame], bumped[:, frame], atol=1e-5)


def test_pixel_codec_accepts_jax_arrays_under_jit(clips):
    codec = PixelCodec()
    x = _frames(clips[0])
    z = jax.jit(codec.encode)(jnp.asarray(x))
    assert isinstance(z, jax.Array)
    np.testing.assert_allclose(np.asarray(z), codec.encode(x), atol=1e-4)
    np.testing.assert_allclose(np.asarray(jax.jit(codec.decode)(z)), codec.decode(codec.encode(x)), atol=1e-4)


def test_lip_sync_survives_the_pixel_codec(clips):
    codec = PixelCodec()
    for clip in clips[:4]:
        decoded = codec.decode(codec.encode(_frames(clip)))[0]
        original = lipsync.mouth_opening_track(clip.video[:49])
        assert np.corrcoef(lipsync.mouth_opening_track(decoded), original)[0, 1] > 0.98
        result = lipsync.evaluate_clip(decoded, clip.audio)  # 49 frames against the full 2 s waveform
        assert result["sync_corr"] >= 0.6 and abs(result["sync_offset"]) <= 1


def test_pixel_codec_rejects_bad_input():
    codec = PixelCodec()
    with pytest.raises(ValueError, match="dtype uint8"):
        codec.encode(np.zeros((1, 5, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[B, N, H, W, 3\]"):
        codec.encode(np.zeros((5, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="latents must be"):
        codec.decode(np.zeros((1, 2, 8, 8, 32), np.float32))


# ---------------------------------------------------------------------------------------------- mel
def test_mel_codec_rate_and_shapes(clips):
    codec = MelCodec()
    assert isinstance(codec, AudioCodec)
    assert codec.latent_rate == 25.0 and codec.latent_channels == 128
    assert codec.latent_length(32000) == 50 and codec.latent_length(32639) == 50 and codec.num_samples(50) == 32000
    wave = np.stack([c.audio for c in clips[:2]])
    z = codec.encode(wave, sample_rate=16000)
    assert z.shape == (2, 50, 128) and z.dtype == np.float32
    assert abs(float(z.mean())) < 0.5 and 0.5 < float(z.std()) < 1.5
    # Latent j covers 40 ms starting at j / 25 s: a burst in [1.0, 1.04) s lands in latent 25.
    burst = np.zeros((1, 32000), np.float32)
    burst[0, 16000 + 100 : 16000 + 540] = np.sin(np.arange(440) * 0.3)
    energy = codec.encode(burst).mean(axis=-1)[0]
    assert int(np.argmax(energy)) == 25


def test_mel_codec_round_trip_keeps_the_energy_envelope(clips):
    codec = MelCodec()
    wave = np.stack([c.audio for c in clips[:2]])
    recon = codec.decode(codec.encode(wave))
    assert recon.shape == wave.shape and recon.dtype == np.float32
    for original, rebuilt in zip(wave, recon):
        env_a, env_b = lipsync.audio_envelope(original), lipsync.audio_envelope(rebuilt)
        assert np.corrcoef(env_a, env_b)[0, 1] > 0.8
    np.testing.assert_array_equal(codec.decode(codec.encode(wave)), recon)  # deterministic
    np.testing.assert_allclose(codec.decode(codec.encode(wave[:1])), recon[:1], atol=1e-5)  # batch-independent


def test_mel_codec_rejects_bad_input():
    codec = MelCodec()
    with pytest.raises(ValueError, match="sample_rate=22050.*librosa.resample"):
        codec.encode(np.zeros((1, 32000), np.float32), sample_rate=22050)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        codec.encode(np.zeros(32000, np.float32))
    with pytest.raises(ValueError, match="shorter than one latent"):
        codec.encode(np.zeros((1, 100), np.float32))
    with pytest.raises(ValueError, match="latents must be"):
        codec.decode(np.zeros((1, 5, 64), np.float32))


# --------------------------------------------------------------------------------------------- text
def test_tokenizer_round_trip_and_layout():
    tok = ByteTokenizer()
    assert tok.vocab_size == 259
    for text in ("mama lobo tuki", "héllo wörld ✓", ""):
        ids = tok.encode(text, 48)
        assert ids.shape == (48,) and ids.dtype == np.int32
        n = len(text.encode("utf-8"))
        assert ids[0] == BOS and ids[n + 1] == EOS and (ids[n + 2 :] == PAD).all() and (ids[1 : n + 1] >= 3).all()
        assert tok.decode(ids) == text
    cut = tok.encode("ééééé", 6)  # 4 byte slots: exactly two 2-byte characters, never half of one
    assert tok.decode(cut) == "éé" and cut[-1] == EOS
    assert tok.decode(tok.encode("aéé", 4)) == "a"
    assert tok.encode_batch(["a", "bc"], 8).shape == (2, 8)
    with pytest.raises(ValueError, match="max_len"):
        tok.encode("x", 1)


def test_text_encoder_shapes_mask_and_padding_invariance():
    tok = ByteTokenizer()
    model = ByteTextEncoder(dim=32, layers=2, heads=4, max_len=32)
    apply = jax.jit(model.apply)
    tokens = jnp.asarray(tok.encode_batch(["mama lobo", "tuki"], 16))
    params = jax.jit(model.init)(jax.random.key(0), tokens)
    features, mask = apply(params, tokens)
    assert features.shape == (2, 16, 32) and features.dtype == jnp.float32
    assert mask.shape == (2, 16) and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(tokens) != PAD)
    assert float(jnp.abs(features[~mask]).max()) == 0.0 and bool(jnp.isfinite(features).all())
    # More padding changes nothing at the real tokens: padding keys are masked out.
    longer, _ = apply(params, jnp.asarray(tok.encode_batch(["mama lobo", "tuki"], 32)))
    np.testing.assert_allclose(np.asarray(longer[:, :16]), np.asarray(features), atol=1e-5)
    # ... while the text itself matters.
    other, _ = apply(params, jnp.asarray(tok.encode_batch(["mama lobi", "tuki"], 16)))
    assert float(jnp.abs(other[0] - features[0]).max()) > 1e-3
    # Layers are scanned (one stacked tree, leading axis `layers`) and params carry logical axis names.
    kernel = params["params"]["blocks"]["qkv"]["kernel"]
    assert kernel.names[0] == "layers" and kernel.unbox().shape[0] == 2
    with pytest.raises(ValueError, match="max_len"):
        model.apply(params, jnp.zeros((1, 40), jnp.int32))
