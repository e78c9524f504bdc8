"""Wan VAE 2.1 / 2.2: our jax port (``mmdit.codecs.wan_vae``) equals diffusers' ``AutoencoderKLWan``.

Fixtures: ``tests/fixtures/parity/wan_vae/{v21,v22}`` (tiny random models saved by diffusers, inputs and
reference outputs; regenerate with ``tests/fixtures/parity/make_wan_vae.py``), converted with
``mmdit.convert.run.convert_dir`` and loaded by the codec through ``mmdit.util.converted.load``; no torch here.

Tolerance (float32, max absolute difference; frames and latents are O(1) -- frames are clamped to [-1, 1] --
so this is also relative to the output scale): ``ENC_TOL = 1e-5`` for the posterior mean (measured 3e-7),
``DEC_TOL = 3e-5`` for decoded frames (measured 3e-6 .. 8e-6). The decoder is ~30 stacked 3x3x3 convolutions
with RMS norms and 2x upsamplings; XLA's and oneDNN's convolutions sum in different orders, and those float32
rounding differences (~1e-7 per layer) grow through the stack to a few 1e-6 -- above 1e-5 would signal a bug.

Chunking: our chunked encode/decode (several chunk sizes) equals the reference, which itself is diffusers'
frame-by-frame loop, so chunked == one-shot == diffusers.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from mmdit.codecs.registry import make_video_codec
from mmdit.codecs.wan_vae import WanVAECodec, WanVAEConfig, count_params
from mmdit.convert import wan_vae as family
from mmdit.convert.run import convert_dir
from mmdit.convert.source import ConvertError, DictSource, read_config

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "parity", "wan_vae")
ENC_TOL = 1e-5
DEC_TOL = 3e-5


def close(ours, ref, tol, name):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    err = float(np.max(np.abs(ours - ref)))
    assert err <= tol, f"{name}: max |ours - diffusers| = {err:.3g} > {tol}"


def npz(version, name):
    with np.load(os.path.join(FIX, version, name)) as f:
        return {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in f.items()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Both fixture folders converted through ``convert_dir`` (family auto-detected)."""
    out = tmp_path_factory.mktemp("wan_vae")
    dirs = {}
    for v in ("v21", "v22"):
        dirs[v] = str(out / v)
        manifest = convert_dir(os.path.join(FIX, v), dirs[v], log=lambda *_: None)
        assert manifest["family"] == "wan_vae" and manifest["target"]["kind"] == "wan_vae"
    return dirs


def norm(codec, z_raw):
    return (z_raw - codec.latents_mean) / codec.latents_std


@pytest.mark.parametrize("version", ["v21", "v22"])
def test_encode_decode_match_diffusers(ckpts, version):
    codec = make_video_codec({"kind": "wan_vae", "checkpoint": ckpts[version], "fps": 16.0})
    assert isinstance(codec, WanVAECodec)
    inp, ref = npz(version, "inputs.npz"), npz(version, "reference.npz")
    lat = codec.encode(inp["video"])
    assert lat.shape[1:] == codec.latent_shape(*inp["video"].shape[1:4])
    close(np.asarray(lat) * codec.latents_std + codec.latents_mean, ref["enc_mean"], ENC_TOL, f"{version} encode")
    frames = codec.decode(norm(codec, inp["z"]))
    close(frames, ref["dec"], DEC_TOL, f"{version} decode")


def test_chunked_equals_one_shot(ckpts):
    """Decode in 2- and 3-latent-frame chunks and encode in 1+4 / 4 and 9-frame chunks through the streaming
    API; all equal diffusers' frame-by-frame loop (= our one-shot). The input state is not consumed."""
    codec = WanVAECodec(checkpoint=ckpts["v21"])
    inp, ref = npz("v21", "inputs.npz"), npz("v21", "reference.npz")
    z = norm(codec, inp["z"])
    b, f, h, w, _ = z.shape
    # decode: [0:2] (first chunk: 1 + 4 frames) then [2:3] (4 frames)
    state0 = codec.decode_init(b, h, w)
    state, a = codec.decode_chunk(state0, z[:, :2])
    assert a.shape[1] == 5 and state.started and not state0.started
    state, c = codec.decode_chunk(state, z[:, 2:])
    assert c.shape[1] == 4
    close(np.concatenate([a, c], axis=1), ref["dec"], DEC_TOL, "decode in chunks of 2 + 1")
    # the untouched initial state decodes the same first chunk again
    _, a2 = codec.decode_chunk(state0, z[:, :2])
    np.testing.assert_array_equal(np.asarray(a2), np.asarray(a))
    # encode: frames [0:5] (first chunk, 1 + 4) then [5:9]; and all 9 at once
    video = inp["video"]
    st = codec.encode_init(b, *video.shape[2:4])
    st, l1 = codec.encode_chunk(st, video[:, :5])
    st, l2 = codec.encode_chunk(st, video[:, 5:])
    assert l1.shape[1] == 2 and l2.shape[1] == 1
    raw = np.concatenate([l1, l2], axis=1) * codec.latents_std + codec.latents_mean
    close(raw, ref["enc_mean"], ENC_TOL, "encode in chunks of 5 + 4")
    _, l_all = codec.encode_chunk(codec.encode_init(b, *video.shape[2:4]), video)
    close(np.asarray(l_all) * codec.latents_std + codec.latents_mean, ref["enc_mean"], ENC_TOL, "encode in one chunk")
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        codec.encode_chunk(codec.encode_init(b, *video.shape[2:4]), video[:, :4])
    with pytest.raises(ValueError, match="multiple of 4"):
        codec.encode_chunk(st, video[:, :3])
    with pytest.raises(ValueError, match="decode_init"):
        codec.decode_chunk(codec.decode_init(b, h + 1, w), z[:, :1])


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v21", "v22"])
def test_tiled_decode_matches_diffusers(ckpts, version):
    """Tiny overlapping tiles (4 tile shapes) equal diffusers' tiled_decode; tiles cached across 2-latent-frame
    chunks (v21). Tiled output differs from untiled near seams by design (each tile sees only its own
    context: up to ~1.7 on these random weights), so it is compared with diffusers' tiled decode, and a tile
    covering the whole frame must reproduce the untiled decode exactly."""
    inp, ref = npz(version, "inputs.npz"), npz(version, "reference.npz")
    tile, stride = int(inp["tile"]), int(inp["tile_stride"])
    codec = WanVAECodec(checkpoint=ckpts[version], tile=tile, tile_stride=stride, chunk=2)
    z = norm(codec, inp["z_tiled"])
    assert len(codec.decode_init(1, *z.shape[2:4]).tiles) > 1
    close(codec.decode(z), ref["dec_tiled"], DEC_TOL, f"{version} tiled decode")
    if version == "v21":
        big = WanVAECodec(checkpoint=ckpts[version], tile=64, tile_stride=64)
        zs = norm(big, inp["z"])
        assert len(big.decode_init(*zs.shape[:1], *zs.shape[2:4]).tiles) == 1
        close(big.decode(zs), ref["dec"], DEC_TOL, "tile larger than the frame = untiled")


def test_registry_round_trip(ckpts):
    codec = make_video_codec({"kind": "wan_vae", "checkpoint": ckpts["v21"], "fps": 24})
    assert (codec.latent_channels, codec.temporal_compression, codec.spatial_compression) == (4, 4, 8)
    assert codec.latent_rate == 6.0
    video = npz("v21", "inputs.npz")["video"]  # the shapes compiled by the tests above: no new compiles
    lat = codec.encode(np.concatenate([video, video[:, :2]], axis=1), trim=True)  # 11 frames -> 9
    assert lat.shape == (2, 3, 2, 2, 4)
    out = codec.decode(lat)
    assert out.shape == video.shape and float(np.max(np.abs(out))) <= 1.0
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        codec.encode(video[:, :8])
    with pytest.raises(ValueError, match="tile=12"):
        make_video_codec({"kind": "wan_vae", "checkpoint": ckpts["v21"], "fps": 24, "tile": 12})
    with pytest.raises(FileNotFoundError, match="mmdit convert"):
        WanVAECodec(checkpoint=os.path.join(FIX, "v21"))  # the diffusers folder, not converted


def test_converter_contract_and_errors():
    hf = read_config(os.path.join(FIX, "v22"))
    assert family.matches(hf) and not family.matches({"_class_name": "AutoencoderKL"})
    t = family.target(hf)
    assert t["kind"] == "wan_vae" and t["config"]["patch_size"] == 2 and json.loads(json.dumps(t)) == t
    assert family.build(t).config == WanVAEConfig.from_dict(t["config"])
    assert family.torch_name(("decoder", "up_blocks_0", "upsamplers_0", "resample_1", "kernel")) == (
        "decoder.up_blocks.0.upsamplers.0.resample.1.weight"
    )
    with pytest.raises(ConvertError, match="scale_factor_spatial"):
        family.check({**hf, "scale_factor_spatial": 8})
    with pytest.raises(ConvertError, match="clip_output"):
        family.check({**hf, "clip_output": True})
    with pytest.raises(ConvertError, match="latents_mean"):
        family.check({**hf, "latents_mean": [0.0]})
    # a checkpoint missing a tensor / with a wrong shape names it
    small = dict(base_dim=2, z_dim=2, dim_mult=[1, 1], temperal_downsample=[False], num_res_blocks=1, scale_factor_spatial=2,
                 scale_factor_temporal=1, latents_mean=[0.0, 0.0], latents_std=[1.0, 1.0])  # fmt: skip
    from mmdit.codecs.wan_vae import abstract_params

    leaves = jax.tree_util.tree_flatten_with_path(abstract_params(WanVAEConfig.from_dict(small))["params"])[0]
    tensors = {}
    for path, leaf in leaves:
        keys = tuple(k.key for k in path)
        shape = leaf.shape
        if keys[-1] == "kernel":
            shape = (shape[-1], shape[-2], *shape[:-2])  # ours [kt, kh, kw, in, out] -> torch [out, in, kt, kh, kw]
        tensors[family.torch_name(keys)] = np.zeros(shape, np.float32)
    params = family.convert(DictSource(tensors), small, "float32")
    assert params["params"]["encoder"]["conv_in"]["kernel"].shape == (3, 3, 3, 3, 2)
    WanVAECodec(config=small, params=params)  # matches
    params["params"]["decoder"]["conv_in"]["kernel"] = np.zeros((3, 3, 3, 2, 5), np.float32)
    with pytest.raises(ValueError, match="decoder/conv_in/kernel is \\(3, 3, 3, 2, 5\\)"):
        WanVAECodec(config=small, params=params)
    tensors.pop("decoder.conv_out.bias")
    with pytest.raises(ConvertError, match="decoder.conv_out.bias"):
        family.convert(DictSource(tensors), small, "float32")


def test_real_size_parameter_counts():
    """Wan2.1 (z16, base 96) and Wan2.2 (z48, base 160 / decoder 256) built abstractly vs diffusers' counts."""
    with open(os.path.join(FIX, "published_params.json")) as f:
        published = json.load(f)
    assert count_params(WanVAEConfig.wan21()) == published["wan21"]["params"]  # 126,892,531
    assert count_params(WanVAEConfig.wan22()) == published["wan22"]["params"]  # 704,688,668
