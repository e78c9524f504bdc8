"""MMAudio VAE + BigVGAN vocoder: our jax port equals diffusers' ``MMAudioVAE`` / ``MMAudioVocoder``.

Fixtures: ``tests/fixtures/parity/mmaudio/{vae,vocoder}`` (tiny random models saved by diffusers, inputs and
reference outputs; regenerate with ``tests/fixtures/parity/make_mmaudio.py``). Each is converted with
``mmdit.convert.run.convert_dir`` and loaded back with ``mmdit.util.converted.load``; no torch here.

Tolerance: max |ours - reference| <= ``REL_TOL`` x max |reference| (1e-5 of the output scale), float32. Measured
(x86 CPU): mel 6e-7, encoder moments 6e-7, decoded mel 5e-7, vocoder 2e-6 relative. Not bit-exact because the FFT
(pocketfft vs torch's) and the convolutions accumulate in a different order; the deep magnitude-preserving stack and
the vocoder's six-fold upsampling amplify those float32 rounding differences only mildly.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdit.codecs.mmaudio import MMAudioCodec
from mmdit.codecs.registry import make_audio_codec
from mmdit.convert import mmaudio_vae as vae_family
from mmdit.convert import mmaudio_vocoder as vocoder_family
from mmdit.convert.run import convert_dir
from mmdit.convert.source import ConvertError, DictSource, TensorSource, read_config
from mmdit.util import converted

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "parity", "mmaudio")
REL_TOL = 1e-5


def close(ours, ref, name):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    err, scale = float(np.max(np.abs(ours - ref))), float(np.max(np.abs(ref)))
    assert err <= REL_TOL * scale, f"{name}: max |diff| {err:.3g} > {REL_TOL} x {scale:.3g}"


def npz(*parts):
    with np.load(os.path.join(FIX, *parts)) as f:
        return dict(f)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The two fixture folders converted through ``convert_dir`` (auto-detected families)."""
    out = tmp_path_factory.mktemp("mmaudio")
    vae_dir, voc_dir = str(out / "vae"), str(out / "vocoder")
    m1 = convert_dir(os.path.join(FIX, "vae"), vae_dir, log=lambda *_: None)
    m2 = convert_dir(os.path.join(FIX, "vocoder"), voc_dir, log=lambda *_: None)
    assert m1["family"] == "mmaudio_vae" and m2["family"] == "mmaudio_vocoder"
    return vae_dir, voc_dir


@pytest.fixture(scope="module")
def codec(ckpts):
    return make_audio_codec({"kind": "mmaudio", "vae": ckpts[0], "vocoder": ckpts[1], "left_context": 4, "lookahead": 2})


def test_mel_front_end(codec):
    wave, ref = npz("vae", "inputs.npz")["wave"], npz("vae", "reference.npz")["mel"]
    assert np.abs(wave).max() > 1.0  # the clamp to [-1, 1] is exercised
    close(codec.mel(wave), ref.transpose(0, 2, 1), "mel")


def test_vae_encode(codec):
    ref = npz("vae", "reference.npz")
    mel = jnp.asarray(ref["mel"].transpose(0, 2, 1))
    moments = jax.jit(lambda p, x: codec.vae.apply(p, x, method=codec.vae.encode))(
        codec.vae_params, mel
    )  # network alone, from the reference mel
    close(moments, ref["moments"].transpose(0, 2, 1), "encoder moments")
    # end to end through the codec: waveform -> mel -> posterior mean, times scaling_factor (0.5 in the fixture)
    lat = codec.encode(npz("vae", "inputs.npz")["wave"], sample_rate=16000)
    assert codec.scaling_factor == 0.5
    close(lat, 0.5 * ref["mode"].transpose(0, 2, 1), "encode (scaled mode)")


def test_vae_decode(codec):
    z = jnp.asarray(npz("vae", "inputs.npz")["latents"].transpose(0, 2, 1))
    mel = jax.jit(lambda p, x: codec.vae.apply(p, x, method=codec.vae.decode))(codec.vae_params, z)
    close(mel, npz("vae", "reference.npz")["decoded"].transpose(0, 2, 1), "decoded mel")


def test_vocoder(codec):
    mel = jnp.asarray(npz("vocoder", "inputs.npz")["mel"].transpose(0, 2, 1))
    wave = jax.jit(codec.vocoder.apply)(codec.vocoder_params, mel)
    close(wave, npz("vocoder", "reference.npz")["wave"][:, 0], "vocoder")


def test_codec_decode_and_geometry(codec):
    """Latents -> waveform through the registry-built codec equals diffusers' VAE decode + vocoder."""
    assert (codec.sample_rate, codec.latent_channels, codec.latent_rate) == (16000, 4, 500.0)
    assert codec.latent_length(512) == 16 and codec.latent_length(543) == 16 and codec.num_samples(12) == 384
    z = npz("vae", "inputs.npz")["latents"].transpose(0, 2, 1) * codec.scaling_factor
    wave = codec.decode(z)
    assert wave.dtype == np.float32 and wave.shape == (2, codec.num_samples(12))
    close(wave, npz("vocoder", "reference.npz")["chain"][:, 0], "decode (VAE decoder + vocoder)")
    with pytest.raises(ValueError, match="resample"):
        codec.encode(np.zeros((1, 1024), np.float32), sample_rate=44100)
    with pytest.raises(ValueError, match=r"\[B, L, 4\]"):
        codec.decode(np.zeros((1, 5, 3), np.float32))


@pytest.mark.slow
def test_chunked_decode(codec):
    """Chunked decode: exact once the window holds the whole clip; otherwise a bounded seam error (measured)."""
    z = np.random.default_rng(1).standard_normal((1, 16, 4)).astype(np.float32)
    one = codec.decode(z)
    # the stream API: nothing final until `lookahead` latents are past it; final=True flushes the rest
    state = codec.decode_init(1)
    sizes = []
    for i in range(0, 16, 6):
        state, wave = codec.decode_chunk(state, z[:, i : i + 6], final=i + 6 >= 16)
        sizes.append(wave.shape[1] // codec.samples_per_latent)
    assert sizes == [4, 6, 6] and state["held"] == 0 and state["emitted"] == 16
    chunked = codec.decode_chunked(z, 6)
    assert chunked.shape == one.shape
    # left_context 4, lookahead 2 on this random tiny model: the seam error is large (random weights do not decay
    # with distance and the middle block attends over the whole clip); measured rms 0.056 of an rms-0.54 signal.
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))  # noqa: E731
    err_small = rms(chunked - one)
    assert 0 < err_small < 0.5 * rms(one)
    wide = MMAudioCodec.from_params(
        codec.vae_target, codec.vae_params, codec.vocoder_target, codec.vocoder_params, left_context=16, lookahead=16
    )
    np.testing.assert_array_equal(wide.decode_chunked(z, 6), wide.decode(z))  # window = whole clip: exact


@pytest.mark.slow
def test_original_mmaudio_16k_layout(tmp_path):
    """MMAudio's own 16 kHz checkpoints (un-normalised MPConv weights, weight-normed BigVGAN with conv_post bias and
    tanh, log10 mels) re-saved as safetensors with the config.json BUILD.md gives: equal to MMAudio's own code
    (``original_16k/``, made by make_mmaudio.py from hkchengrex/MMAudio 974010a0). Measured: mel 1.3e-6, encode
    3.2e-6, decode 4.7e-7, VAE decode + vocoder 7.8e-7 of the output scale."""
    d = os.path.join(FIX, "original_16k")
    convert_dir(os.path.join(d, "vae"), str(tmp_path / "vae"), log=lambda *_: None)
    m = convert_dir(os.path.join(d, "vocoder"), str(tmp_path / "voc"), log=lambda *_: None)
    assert m["target"]["final_bias"] and m["target"]["final_activation"] == "tanh"
    codec = MMAudioCodec(str(tmp_path / "vae"), str(tmp_path / "voc"))
    assert codec.front_end.log_base == "10" and codec.latent_rate == 31.25
    inp, ref = npz("original_16k", "vae", "inputs.npz"), npz("original_16k", "vae", "reference.npz")
    close(codec.mel(inp["wave"]), ref["mel"].transpose(0, 2, 1), "mel (log10)")
    close(codec.encode(inp["wave"]), ref["mode"].transpose(0, 2, 1), "encode")
    z = inp["latents"].transpose(0, 2, 1)
    close(codec.decode(z), npz("original_16k", "vocoder", "reference.npz")["chain"][:, 0], "decode + vocoder")


def test_real_size_param_counts():
    """Our modules at MMAudio's real configurations have diffusers' parameter counts (meta-device counts committed
    in published_params.json; our VAE also holds the per-bin data_mean/data_std, which diffusers keeps as buffers)."""
    with open(os.path.join(FIX, "published_params.json")) as f:
        published = json.load(f)

    def count(module, x):
        shapes = jax.eval_shape(lambda a: module.init(jax.random.PRNGKey(0), a), x)["params"]
        import flax.linen as nn

        flat = jax.tree_util.tree_flatten_with_path(nn.unbox(shapes))[0]
        return sum(int(np.prod(v.shape)) for p, v in flat if getattr(p[-1], "key", "") not in ("data_mean", "data_std"))

    for name in ("mmaudio_16k_vae", "mmaudio_44k_vae"):
        cfg = dict(vae_family.DEFAULTS, **published[name]["config"])
        model = vae_family.build(vae_family.target({"_class_name": "MMAudioVAE", **cfg}))
        assert count(model, jax.ShapeDtypeStruct((1, 8, cfg["mel_bins"]), jnp.float32)) == published[name]["params"], name
    for name in ("mmaudio_16k_vocoder", "mmaudio_44k_vocoder"):
        tgt = vocoder_family.target({"_class_name": "MMAudioVocoder", **published[name]["config"]})
        mel = jax.ShapeDtypeStruct((1, 4, tgt["num_mels"]), jnp.float32)
        assert count(vocoder_family.build(tgt), mel) == published[name]["params"], name
    # MMAudio's own 16 kHz BigVGAN adds the conv_post bias
    tgt = vocoder_family.target(
        {"_class_name": "MMAudioVocoder", "use_bias_at_final": True, **published["mmaudio_16k_vocoder"]["config"]}
    )
    mel = jax.ShapeDtypeStruct((1, 4, 80), jnp.float32)
    assert count(vocoder_family.build(tgt), mel) == published["mmaudio_16k_vocoder"]["params"] + 1


def test_convert_refuses_mismatched_input(tmp_path):
    vae_dir = os.path.join(FIX, "vae")
    cfg = read_config(vae_dir)
    with pytest.raises(ConvertError, match="config.json does not describe"):
        vae_family.convert(TensorSource(vae_dir), dict(cfg, hidden_channels=16), np.float32)
    with pytest.raises(ConvertError, match="not a mmaudio_vocoder checkpoint"):
        convert_dir(vae_dir, str(tmp_path / "x"), family="mmaudio_vocoder", log=lambda *_: None)
    with pytest.raises(ConvertError, match="channel_multipliers"):
        vae_family.check(dict(cfg, channel_multipliers=[1]))
    src = TensorSource(os.path.join(FIX, "vocoder"))
    tensors = {n: src.get(n) for n in src.names()}
    tensors["resblocks.0.activations.0.upsample.filter"] = tensors["resblocks.0.activations.0.upsample.filter"] * 2
    with pytest.raises(ConvertError, match="anti-aliasing filter"):
        vocoder_family.convert(DictSource(tensors), read_config(os.path.join(FIX, "vocoder")), np.float32)


def test_codec_refuses_mismatched_pair(ckpts):
    with pytest.raises(ValueError, match="holds a 'mmaudio_vocoder' checkpoint"):
        MMAudioCodec(vae=ckpts[1], vocoder=ckpts[1])
    vae_manifest, vae_params = converted.load(ckpts[0])
    voc_manifest, voc_params = converted.load(ckpts[1])
    with pytest.raises(ValueError, match="upsamples 16x"):
        MMAudioCodec.from_params(
            dict(vae_manifest["target"], hop_length=32, n_fft=64), vae_params, voc_manifest["target"], voc_params
        )
