"""Condition encoders (UMT5, wav2vec2, CLIP vision) equal transformers, number for number.

The fixtures under ``tests/fixtures/parity/{umt5,wav2vec2,clip_vision}/`` are tiny random models saved
by transformers with its outputs on fixed inputs (scripts ``tests/fixtures/parity/make_*.py``; torch
is not needed here). Each family's fixture folder is converted once with ``mmdit.convert.run.
convert_dir`` into a temporary folder, loaded with ``mmdit.util.converted.load`` and run jitted in
float32. Tolerance: max absolute difference <= 1e-5 (outputs are O(1): max |x| 2-5).

Real sizes: each published configuration (committed in ``published_params.json`` with its source)
is built abstractly (``jax.eval_shape`` of init) and its parameter count must equal the one
transformers' class has for it (counted on the meta device by the fixture script).
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdit.convert import clip_vision as clip_family
from mmdit.convert import umt5 as umt5_family
from mmdit.convert import wav2vec2 as w2v_family
from mmdit.convert.run import convert_dir
from mmdit.convert.source import ConvertError
from mmdit.encoders import registry
from mmdit.encoders.clip_vision import preprocess
from mmdit.encoders.umt5 import Tokenizer
from mmdit.encoders.wav2vec2 import resample_features
from mmdit.util import converted

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "parity")
TOL = 1e-5


def _maxdiff(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def converted_dirs(tmp_path_factory):
    """Every fixture folder converted once: ``{name: out_dir}``."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name, sub in (("umt5", "umt5"), ("w2v_base", "wav2vec2/base"), ("w2v_large", "wav2vec2/large"), ("clip", "clip_vision")):
        out[name] = str(root / name)
        convert_dir(os.path.join(FIX, sub), out[name], log=lambda _m: None)
    return out


def _module(out_dir, family):
    manifest, params = converted.load(out_dir)
    assert manifest["family"] == family.NAME
    return family.build(manifest["target"]), params


# ------------------------------------------------------------------------------------------------
# UMT5


def test_umt5_matches_transformers(converted_dirs):
    model, params = _module(converted_dirs["umt5"], umt5_family)
    inp, ref = np.load(os.path.join(FIX, "umt5", "inputs.npz")), np.load(os.path.join(FIX, "umt5", "reference.npz"))
    assert not inp["attention_mask"].all(), "the fixture must contain padding"
    out = jax.jit(model.apply)(params, jnp.asarray(inp["input_ids"]), jnp.asarray(inp["attention_mask"], bool))
    assert _maxdiff(out, ref["last_hidden_state"]) <= TOL


def test_umt5_tokenizer_matches_reference_ids():
    inp = np.load(os.path.join(FIX, "umt5", "inputs.npz"))
    ids, mask = Tokenizer(os.path.join(FIX, "umt5"))(list(inp["prompts"]), int(inp["max_length"]))
    np.testing.assert_array_equal(ids, inp["input_ids"])
    np.testing.assert_array_equal(mask, inp["attention_mask"].astype(bool))


def test_text_encoder_from_registry_zeroes_padding(converted_dirs):
    """make_encoder(kind=umt5) tokenizes + encodes prompts; valid positions equal transformers, padding is 0."""
    inp, ref = np.load(os.path.join(FIX, "umt5", "inputs.npz")), np.load(os.path.join(FIX, "umt5", "reference.npz"))
    enc = registry.make_encoder(
        dict(
            kind="umt5", checkpoint=converted_dirs["umt5"], tokenizer=os.path.join(FIX, "umt5"), max_length=int(inp["max_length"])
        )
    )
    feats, mask = enc.encode(list(inp["prompts"]))
    m = inp["attention_mask"].astype(bool)
    np.testing.assert_array_equal(np.asarray(mask), m)
    assert _maxdiff(np.asarray(feats)[m], ref["last_hidden_state"][m]) <= TOL
    assert not np.asarray(feats)[~m].any()
    assert enc.dim == feats.shape[-1] == 32


def test_text_encoder_finds_tokenizer_in_source_dir(converted_dirs):
    """Without `tokenizer`, the converted model's source folder (manifest source_dir) is searched."""
    enc = registry.make_encoder(dict(kind="umt5", checkpoint=converted_dirs["umt5"], max_length=8))
    feats, mask = enc.encode("a woman speaks")
    assert feats.shape == (1, 8, 32) and mask.shape == (1, 8) and bool(mask[0, 0]) and not bool(mask[0, -1])


# ------------------------------------------------------------------------------------------------
# wav2vec2


@pytest.mark.parametrize("variant", ["base", "large"])
def test_wav2vec2_matches_transformers(converted_dirs, variant):
    """base: group-norm extractor, post-norm layers, no mask; large: layer-norm extractor, stable
    layer norm, a padded example with an attention mask. Every hidden state is compared."""
    model, params = _module(converted_dirs["w2v_" + variant], w2v_family)
    d = os.path.join(FIX, "wav2vec2", variant)
    inp, ref = np.load(os.path.join(d, "inputs.npz")), np.load(os.path.join(d, "reference.npz"))
    mask = jnp.asarray(inp["attention_mask"], bool) if "attention_mask" in inp else None
    assert model.stable == (variant == "large") and model.feat_norm == ("layer" if variant == "large" else "group")
    out = jax.jit(model.apply)(params, jnp.asarray(inp["input_values"]), mask)
    for key in ("extract_features", "hidden_states", "last_hidden_state"):
        assert _maxdiff(out[key], ref[key]) <= TOL, key
    if variant == "large":
        n = int(np.asarray(out["mask"])[1].sum())
        assert 0 < n < out["mask"].shape[1]  # the padded example's frames are masked


def test_wav2vec2_encoder_layer_choice_and_resampling(converted_dirs):
    """AudioFeatureEncoder(layer=k) equals transformers' hidden_states[k] (running only k layers);
    resample_features equals torch's F.interpolate(linear, align_corners=False)."""
    d = os.path.join(FIX, "wav2vec2", "large")
    inp, ref = np.load(os.path.join(d, "inputs.npz")), np.load(os.path.join(d, "reference.npz"))
    wave, smask = inp["input_values"], inp["attention_mask"].astype(bool)
    for layer, want in ((1, ref["hidden_states"][1]), (None, ref["last_hidden_state"])):
        enc = registry.make_encoder(dict(kind="wav2vec2", checkpoint=converted_dirs["w2v_large"], layer=layer, normalize=False))
        feats, fmask = enc.encode(wave, 16000, mask=smask)
        assert _maxdiff(feats[fmask], want[fmask]) <= TOL, layer
        assert not feats[~fmask].any()
        assert enc.module.num_layers == (1 if layer == 1 else 2)  # truncated, not computed and thrown away
    last = ref["last_hidden_state"]
    for n in (30, 71):
        assert _maxdiff(resample_features(last, last.shape[1], n, n), ref[f"resampled_{n}"]) <= 1e-6
    enc = registry.make_encoder(dict(kind="wav2vec2", checkpoint=converted_dirs["w2v_base"], rate=enc.model_rate / 2, length=40))
    feats, fmask = enc.encode(wave)
    assert feats.shape == (2, 40, 32) and fmask[:, :30].all() and not fmask[:, 30:].any()


def test_wav2vec2_weight_norm_fold_and_bad_config():
    """The positional conv's weight norm folds to g·v/||v|| per tap; an unknown feature norm is refused."""
    from mmdit.convert.source import DictSource

    rng = np.random.default_rng(0)
    v = rng.standard_normal((8, 2, 5)).astype(np.float32)
    g = rng.standard_normal((1, 1, 5)).astype(np.float32)
    src = DictSource({"encoder.pos_conv_embed.conv.weight_g": g, "encoder.pos_conv_embed.conv.weight_v": v})
    k = w2v_family._fold_weight_norm(src, "", np.float32)
    want = g * v / np.linalg.norm(v.reshape(-1, 5), axis=0)
    np.testing.assert_allclose(k, np.transpose(want, (2, 1, 0)), rtol=1e-6)
    cfg = json.load(open(os.path.join(FIX, "wav2vec2", "base", "config.json")))
    with pytest.raises(ConvertError, match="feat_extract_norm"):
        w2v_family.check(dict(cfg, feat_extract_norm="batch"))


# ------------------------------------------------------------------------------------------------
# CLIP vision


def test_clip_vision_matches_transformers(converted_dirs):
    """gelu (ViT-H/14's activation) and quick_gelu (OpenAI CLIP) with the same weights."""
    manifest, params = converted.load(converted_dirs["clip"])
    inp, ref = np.load(os.path.join(FIX, "clip_vision", "inputs.npz")), np.load(os.path.join(FIX, "clip_vision", "reference.npz"))
    pixels = jnp.asarray(inp["pixel_values"].transpose(0, 2, 3, 1))
    for prefix, act in (("", "gelu"), ("quick_gelu_", "quick_gelu")):
        model = clip_family.build(dict(manifest["target"], act=act))
        out = jax.jit(model.apply)(params, pixels)
        for key in ("hidden_states", "last_hidden_state", "pooler_output"):
            assert _maxdiff(out[key], ref[prefix + key]) <= TOL, (act, key)


def test_clip_image_encoder_penultimate_and_preprocess(converted_dirs):
    """ImageEncoder (default layer -2, Wan I2V's hidden_states[-2]) on raw images = transformers on
    CLIPImageProcessor's pixels; our preprocess equals CLIPImageProcessor's."""
    inp, ref = np.load(os.path.join(FIX, "clip_vision", "inputs.npz")), np.load(os.path.join(FIX, "clip_vision", "reference.npz"))
    np.testing.assert_allclose(preprocess(inp["images"], 32), inp["processed"].transpose(0, 2, 3, 1), atol=1e-6)
    enc = registry.make_encoder(dict(kind="clip_vision", checkpoint=converted_dirs["clip"]))
    assert enc.module.num_layers == 2  # 3-layer fixture, penultimate output
    feats = enc.encode_pixels(inp["pixel_values"].transpose(0, 2, 3, 1))
    assert _maxdiff(feats, ref["hidden_states"][-2]) <= TOL
    feats, mask = enc.encode(inp["images"])
    assert feats.shape == (2, enc.num_tokens, 32) and bool(mask.all())


# ------------------------------------------------------------------------------------------------
# converted trees, logical names, converter errors


def test_converted_tree_is_the_init_tree_with_logical_names(converted_dirs):
    """Every converted param is one the module declares (same paths, same shapes; flax would silently
    ignore extras), and every declared param carries logical axis names the default rules know."""
    import flax.linen as nn

    from mmdit.parallel.rules import DEFAULT_RULES

    known = {name for name, _ in DEFAULT_RULES}
    args = {
        "umt5": (umt5_family, (jnp.zeros((1, 4), jnp.int32),)),
        "w2v_large": (w2v_family, (jnp.zeros((1, 400)),)),
        "clip": (clip_family, (jnp.zeros((1, 32, 32, 3)),)),
    }
    for name, (family, inputs) in args.items():
        manifest, params = converted.load(converted_dirs[name])
        module = family.build(manifest["target"])
        boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))
        want = {converted.path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]}
        got = {converted.path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
        assert got == want, (name, sorted(set(got) ^ set(want)))
        specs = jax.tree_util.tree_leaves(
            nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        )
        assert len(specs) == len(want)
        used = {a for spec in specs for a in spec if a is not None}
        assert used <= known, (name, used - known)


def test_converters_refuse_incomplete_checkpoints():
    from mmdit.convert.source import DictSource

    cfg = json.load(open(os.path.join(FIX, "umt5", "config.json")))
    with pytest.raises(ConvertError, match="'shared.weight' is missing|encoder.block.0"):
        umt5_family.convert(DictSource({"encoder.final_layer_norm.weight": np.ones(32, np.float32)}), cfg, np.float32)
    with pytest.raises(ConvertError, match="feed_forward_proj='gated-gelu-x'"):
        umt5_family.check(dict(cfg, feed_forward_proj="gated-gelu-x"))
    clip_cfg = json.load(open(os.path.join(FIX, "clip_vision", "config.json")))
    with pytest.raises(ConvertError, match="not a CLIP vision checkpoint"):
        clip_family.convert(DictSource({"x": np.ones(1, np.float32)}), clip_cfg, np.float32)


# ------------------------------------------------------------------------------------------------
# registry errors


def test_registry_errors_name_the_field(converted_dirs, tmp_path):
    with pytest.raises(ValueError, match="encoders.text.checkpoint=.*'wav2vec2' conversion"):
        registry.make_encoder(dict(kind="umt5", checkpoint=converted_dirs["w2v_base"]), "encoders.text")
    with pytest.raises(ValueError, match="model.text_encoder"):
        registry.make_encoder(dict(kind="byte"), "encoders.text")
    with pytest.raises(ValueError, match="encoders.kind='t5'"):
        registry.make_encoder(dict(kind="t5", checkpoint="x"))
    with pytest.raises(ValueError, match="layer=5: the checkpoint has 2 layers"):
        registry.make_encoder(dict(kind="wav2vec2", checkpoint=converted_dirs["w2v_base"], layer=5))
    with pytest.raises(FileNotFoundError, match="not a finished converted checkpoint|no such directory"):
        registry.make_encoder(dict(kind="clip_vision", checkpoint=str(tmp_path / "nothing")))


# ------------------------------------------------------------------------------------------------
# real sizes


def _abstract_count(module, *args) -> int:
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


def test_real_size_parameter_counts():
    """UMT5-XXL encoder, wav2vec2-base / -large / -large-lv60, CLIP ViT-H/14 vision: our abstract
    init has transformers' parameter count (wav2vec2 minus the two tensors we do not hold: the
    training-only masked_spec_embed and the weight-norm g folded into the conv)."""
    pub = json.load(open(os.path.join(FIX, "umt5", "published_params.json")))["umt5_xxl_encoder"]
    m = umt5_family.build(umt5_family.target(pub["config"]))
    assert _abstract_count(m, jnp.zeros((1, 4), jnp.int32)) == pub["params"] == 5_680_910_336
    for name, p in json.load(open(os.path.join(FIX, "wav2vec2", "published_params.json"))).items():
        m = w2v_family.build(w2v_family.target(p["config"]))
        assert _abstract_count(m, jnp.zeros((1, 400))) == p["params"] - p["masked_spec_embed"] - p["weight_norm_g"], name
    want = {"wav2vec2-base-960h": 94_371_712, "wav2vec2-large-960h-lv60-self": 315_438_720}
    got = json.load(open(os.path.join(FIX, "wav2vec2", "published_params.json")))
    assert {k: got[k]["params"] for k in want} == want
    pub = json.load(open(os.path.join(FIX, "clip_vision", "published_params.json")))["vit_h14_vision"]
    m = clip_family.build(clip_family.target(pub["config"]))
    assert _abstract_count(m, jnp.zeros((1, 224, 224, 3))) == pub["params"] == 630_766_080
