"""Wan DiT parity: converted diffusers ``WanTransformer3DModel`` checkpoints run as an mmdit video
stream (no audio stream) and reproduce diffusers' forward in float32.

Fixtures: tests/fixtures/parity/wan_dit/ (made by make_wan_dit.py with torch + diffusers; this test
needs neither). Tolerance: max abs difference <= 1e-5 on outputs of magnitude ~2 (float32 rounding).
Cases: Wan2.1 T2V, Wan2.1 I2V (36->16-style channel concat + CLIP image cross-attention), Wan2.2
TI2V (per-token timesteps, first latent frame at t = 0), one sampler Euler step against diffusers'
FlowMatchEulerDiscreteScheduler, and the real-size parameter counts of four published checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from mmdit import config_lib
from mmdit.convert import wan_dit
from mmdit.convert.source import ConvertError, TensorSource, read_config, unused
from mmdit.model.accounting import abstract_params
from mmdit.model.mmdit import MMDiT
from mmdit.model.spec import build_spec

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "parity", "wan_dit")
LATENT = (3, 4, 4)  # make_wan_dit.LATENT
TOL = 1e-5


def _inputs():
    return dict(np.load(os.path.join(FIX, "inputs.npz"))), dict(np.load(os.path.join(FIX, "reference.npz")))


def _converted(case: str):
    """(hf config, params) of a fixture checkpoint through the wan_dit family (every tensor used)."""
    d = os.path.join(FIX, case)
    hf = read_config(d)
    src = TensorSource(d)
    params = wan_dit.convert(src, hf, "float32")
    assert unused(src, ()) == [], "every checkpoint tensor must be mapped"
    n_src = sum(int(np.prod(src.shape(n))) for n in src.names())
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == n_src
    return hf, params


def _model_config(hf, text_length, image_length=5):
    return wan_dit.model_config(hf, shape=LATENT, text_length=text_length, image_length=image_length)


def _our_forward(case: str, inputs: dict):
    hf, params = _converted(case)
    hidden = inputs[f"{case}.hidden_states"].transpose(0, 2, 3, 4, 1)  # [B, F, H, W, C_in]
    text = inputs[f"{case}.encoder_hidden_states"]
    spec = build_spec(mlc.ConfigDict(_model_config(hf, text.shape[1])))
    geo = spec.stream("video").geometry
    cout = geo.channels
    tokens = {"video": geo.patchify(hidden[..., :cout])}
    conds = {"text": text}
    if "image_latents" in [c.name for c in spec.conditions]:
        conds["image_latents"] = dataclasses.replace(geo, channels=hidden.shape[-1] - cout).patchify(hidden[..., cout:])
    if f"{case}.encoder_hidden_states_image" in inputs:
        conds["image"] = inputs[f"{case}.encoder_hidden_states_image"]
    t = inputs[f"{case}.timestep"]
    sigma = t / 1000.0 if t.ndim == 2 else np.repeat(t[:, None] / 1000.0, geo.num_tokens, axis=1)
    out = jax.jit(MMDiT(spec).apply)(params, tokens, {"video": jnp.asarray(sigma, jnp.float32)}, conds)
    return np.asarray(geo.unpatchify(out["video"])).transpose(0, 4, 1, 2, 3)  # [B, C, F, H, W] like diffusers


@pytest.mark.parametrize("case", ["t2v", "i2v", "ti2v"])
def test_forward_matches_diffusers(case):
    inputs, ref = _inputs()
    ours = _our_forward(case, inputs)
    want = ref[f"{case}.output"]
    assert ours.shape == want.shape
    err = float(np.abs(ours - want).max())
    assert err <= TOL, f"{case}: max |ours - diffusers| = {err:.2e} (output scale {np.abs(want).max():.2f})"


@pytest.mark.parametrize("case, task", [("t2v", "t2av"), ("ti2v", "ti2av")])
def test_sampler_euler_step_matches_diffusers(tmp_path, case, task):
    """diffusers-saved tiny Wan -> convert_dir -> converted.load -> one mmdit Sampler Euler step (sigma 1 -> 0)
    equals FlowMatchEulerDiscreteScheduler.step on diffusers' prediction from the same noise, run as
    WanPipeline (t2v) / WanImageToVideoPipeline with expand_timesteps (ti2v: known first latent frame,
    per-token timesteps) run it."""
    from mmdit.convert.run import convert_dir
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.sample.sampler import Sampler
    from mmdit.util import converted

    _, ref = _inputs()
    r = {k.split(".", 1)[1]: v for k, v in ref.items() if k.startswith(f"step_{case}.")}
    manifest = convert_dir(os.path.join(FIX, case), str(tmp_path / "wan"), log=lambda *_: None)
    assert manifest["family"] == wan_dit.NAME and manifest["target"]["kind"] == "mmdit_dit"
    _, params = converted.load(str(tmp_path / "wan"))
    cfg = config_lib.load(os.path.join(os.path.dirname(__file__), "..", "configs", "base.py"))
    wan_dit.apply_model_config(cfg, _model_config(read_config(os.path.join(FIX, case)), r["text"].shape[1]))
    model = DiffusionModel.from_config(cfg)
    sampler = Sampler(model, cfg, compiler_options={"xla_backend_optimization_level": 0})
    known = {"video": r["known"]} if "known" in r else None
    out = sampler.sample(
        {"dit": params},
        jax.random.key(7),
        task=task,
        batch=1,
        known_latents=known,
        raw_conds={"text": r["text"]},
        steps=1,
        shift=1.0,
        guidance={},
    )
    k_noise, _ = jax.random.split(jax.random.key(7))
    noise = model.latents(sampler.noise(k_noise, 1))["video"]
    # the fixture saw the same noise: the same draw, up to the last bit XLA's codegen level may move
    np.testing.assert_allclose(np.asarray(noise), r["noise"], rtol=0, atol=1e-6)
    err = float(np.abs(np.asarray(out["video"]) - r["latents"]).max())
    assert err <= TOL, f"{case}: one Euler step: max |ours - diffusers| = {err:.2e}"


PUBLISHED = json.load(open(os.path.join(FIX, "published_params.json")))["models"]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_size_param_count(name):
    """Our model built from the published config (abstractly) has exactly diffusers' parameter count."""
    entry = PUBLISHED[name]
    spec = build_spec(mlc.ConfigDict(wan_dit.model_config(entry["config"])))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(abstract_params(spec))))
    assert n == entry["params"], f"{name}: ours {n:,} vs diffusers {entry['params']:,}"


@pytest.mark.parametrize(
    "field, value",
    [
        ("patch_size", [2, 2, 2]),
        ("qk_norm", "rms_norm"),
        ("cross_attn_norm", False),
        ("pos_embed_seq_len", 514),
        ("added_kv_proj_dim", 32),  # image_dim missing
        ("out_channels", 8),  # more outputs than inputs
    ],
)
def test_check_refuses_unsupported_configs(field, value):
    hf = read_config(os.path.join(FIX, "t2v"))
    with pytest.raises(ConvertError, match=field):
        wan_dit.check({**hf, field: value})


def test_detected_as_wan_dit():
    from mmdit.convert import registry

    assert registry.detect(read_config(os.path.join(FIX, "i2v"))) == wan_dit.NAME
    assert wan_dit.target(read_config(os.path.join(FIX, "i2v")))["model"]["conditions"]["image"]["added_to"] == "text"


def _video_params(spec, keep=("text", "image", "image_latents")) -> dict:
    """``{path: shape}`` of the video stream's params, without other conditions' cross-attention / embeddings."""
    p = nn.unbox(abstract_params(spec))["params"]
    out = {}
    for root, tree in (("video", p["video"]), ("blocks", p["blocks"]["video"])):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            first = str(path[0].key)
            cond = first.removeprefix("cross_").removeprefix("cond_embedding_")
            if cond != first and cond not in keep:
                continue
            out[root + jax.tree_util.keystr(path)] = tuple(leaf.shape)
    return out


@pytest.mark.parametrize("preset, wan", [("unitalking.py", "Wan2.2-TI2V-5B"), ("talkingmachines.py", "Wan2.1-T2V-14B")])
def test_preset_video_streams_are_wan_weight_for_weight(preset, wan):
    """The presets' video streams (minus their extra conditions) have exactly the converted Wan param tree."""
    cfg = config_lib.load(os.path.join(os.path.dirname(__file__), "..", "configs", preset))
    ours = _video_params(build_spec(cfg.model))
    want = _video_params(build_spec(mlc.ConfigDict(wan_dit.model_config(PUBLISHED[wan]["config"]))))
    assert ours == want
    assert sum(int(np.prod(s)) for s in ours.values()) == PUBLISHED[wan]["params"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["conditions"]["image"].update(added_to="nope"), "model.conditions.image.added_to"),
        (lambda m: m["conditions"]["image"].update(embedding="conv"), "model.conditions.image.embedding"),
        (lambda m: m["streams"]["video"].update(cross=("text", "image")), "added_to 'text'"),
        (lambda m: m["conditions"]["image_latents"].update(length=7), "model.conditions.image_latents.length=7"),
        (lambda m: m["streams"]["video"].update(concat=("text",)), "model.streams.video.concat"),
        (lambda m: m["streams"]["video"].update(cross=()), "no stream cross-attends it"),
    ],
)
def test_i2v_roles_are_validated(edit, message):
    m = _model_config(read_config(os.path.join(FIX, "i2v")), 512)
    build_spec(mlc.ConfigDict(m))  # the unedited layout is valid
    edit(m)
    with pytest.raises(ValueError, match=message):
        build_spec(mlc.ConfigDict(m))


def test_i2v_condition_features_layout():
    """Mask channels first (1 on latent frame 0 only), then the condition latents, patchified like the stream."""
    hf = read_config(os.path.join(FIX, "i2v"))
    spec = build_spec(mlc.ConfigDict(_model_config(hf, 512)))
    geo = spec.stream("video").geometry
    lat = np.random.default_rng(0).standard_normal((1, *LATENT, 4)).astype(np.float32)
    feats = np.asarray(wan_dit.i2v_condition_features(geo, lat))
    assert feats.shape == (1, geo.num_tokens, spec.condition("image_latents").dim)
    back = np.asarray(dataclasses.replace(geo, channels=8).unpatchify(feats))
    np.testing.assert_array_equal(back[..., 4:], lat)
    assert (back[:, 0, ..., :4] == 1).all() and (back[:, 1:, ..., :4] == 0).all()


def test_accounting_attributes_image_kv_to_the_image_condition():
    """mmdit-info's breakdown: Wan I2V's add_k/add_v act on the image tokens (FLOPs per image token, not per video token)."""
    from mmdit.model.accounting import param_breakdown

    spec = build_spec(mlc.ConfigDict(_model_config(read_config(os.path.join(FIX, "i2v")), 512)))
    bd = param_breakdown(spec)["video"]
    d, layers, img = 32, 2, 24
    assert bd.cross_kv["image"] == layers * 2 * d * d and bd.cross_kv["text"] == layers * 2 * d * d
    embed = 2 * img + (img * img + img) + (img * d + d) + 2 * d  # norm1, linear_1, linear_2, norm2
    assert bd.cross["image"] == layers * (2 * (d * d + d) + d) + embed
