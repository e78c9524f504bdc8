"""``configs/demo.py:wan4``: the demo in Wan's 1 + 4k latent layout, with the audio grouped the same
way (``MelCodec(temporal=4)``) so audio token i and video token i cover the same frames."""

import numpy as np
import pytest

from mmdit import config_lib
from mmdit.codecs.mel import MelCodec
from mmdit.model.diffusion import DiffusionModel
from mmdit.model.streams import aligned_times, build_streams


@pytest.fixture(scope="module")
def speech_like_waves():
    """Two 49-frame (1.96 s) waveforms plus 100 spare samples: a 200 Hz tone gated on and off."""
    rng = np.random.default_rng(0)
    t = np.arange(31360 + 100) / 16000
    gate = (np.sin(2 * np.pi * 3.0 * t + rng.uniform(0, 6, (2, 1))) > 0).astype(np.float32)
    return (0.3 * gate * np.sin(2 * np.pi * 200 * t)).astype(np.float32)


def test_mel_temporal_groups_like_the_pixel_codec(speech_like_waves):
    flat, grouped = MelCodec(), MelCodec(temporal=4)
    z1, z4 = flat.encode(speech_like_waves), grouped.encode(speech_like_waves)
    assert z1.shape == (2, 49, 128) and z4.shape == (2, 13, 512)  # 1 + 4*12 latents -> 1 + 12 groups
    assert grouped.latent_rate == 6.25 and grouped.latent_channels == 512
    for slot in range(4):  # latent 0 holds 25 Hz latent 0 in every slot (Wan's first-frame layout)
        np.testing.assert_array_equal(z4[:, 0, 128 * slot : 128 * (slot + 1)], z1[:, 0])
    # group g >= 1 holds 25 Hz latents 4g-3 .. 4g, slot-major in channels
    np.testing.assert_array_equal(z4[:, 5].reshape(2, 4, 128), z1[:, 17:21])
    np.testing.assert_array_equal(grouped.ungroup(z4), z1)
    # the same waveform comes back (Griffin-Lim is deterministic), the same number of samples
    np.testing.assert_array_equal(grouped.decode(z4), flat.decode(z1))


def test_mel_temporal_lengths_and_errors():
    grouped = MelCodec(temporal=4)
    assert [grouped.latent_length(640 * n) for n in (0, 1, 4, 5, 8, 49, 52)] == [0, 1, 1, 2, 2, 13, 13]
    assert grouped.num_samples(13) == 49 * 640 and grouped.latent_length(grouped.num_samples(13)) == 13
    flat = MelCodec()
    assert [flat.latent_length(640 * n + 5) for n in (0, 1, 49)] == [0, 1, 49] and flat.num_samples(49) == 49 * 640
    with pytest.raises(ValueError, match="temporal=0 must be >= 1"):
        MelCodec(temporal=0)
    with pytest.raises(ValueError, match=r"latents must be \[B, L, 512\]"):
        grouped.decode(np.zeros((1, 13, 128), np.float32))
    with pytest.raises(ValueError, match="no streaming decode.*codecs.audio.temporal=1"):
        grouped.stream_decoder(1)


def test_wan4_config_aligns_audio_and_video_tokens_one_to_one():
    cfg = config_lib.load("configs/demo.py:wan4")
    streams = build_streams(cfg.model)
    assert streams["video"].shape == (13, 4, 4) and streams["audio"].shape == (13,)
    # no token wider than the model (it could not carry its own noise through the dim-128 residual)
    assert max(s.token_dim for s in streams.values()) <= cfg.model.streams.video.dim == cfg.model.streams.audio.dim
    times = aligned_times(cfg.model, streams)
    np.testing.assert_array_equal(np.unique(times["video"]), times["audio"])  # token i <-> latent frame i
    np.testing.assert_array_equal(times["audio"], np.arange(13, dtype=np.float32))
    default = config_lib.load("configs/demo.py")
    assert "temporal" not in default.codecs.audio and default.model.streams.audio.shape == (49,)


@pytest.mark.slow
def test_wan4_tiny_synthesises_and_trains_two_steps(tmp_path):
    from mmdit.data.synth_records import synth
    from mmdit.train.loop import train

    cfg = config_lib.override(config_lib.load("configs/demo.py:tiny,wan4"), ["train.steps=2", "train.sample_every=0"])
    data = str(tmp_path / "data")
    synth(cfg, data, progress=False)
    metrics = train(cfg, str(tmp_path / "run"), data_dir=data + "/train", progress=False, log=lambda m: None)
    model = DiffusionModel.from_config(cfg)
    assert model.spec.stream("audio").geometry.num_tokens == model.spec.stream("video").geometry.token_frames() == 5
    assert np.isfinite(metrics["loss/audio"]) and np.isfinite(metrics["loss/video"])
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
