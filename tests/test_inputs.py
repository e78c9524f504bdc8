"""The model's input schema (``DiffusionModel.input_spec``) drives every site that builds inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdit import config_lib
from mmdit.model.diffusion import DiffusionModel
from mmdit.sample.sampler import canonical_raw_conds, step_example_inputs
from mmdit.train import sharding


def _model(spec="configs/demo.py:tiny", sets=()):
    return DiffusionModel.from_config(config_lib.override(config_lib.load(spec), list(sets)))


def test_byte_text_schema_and_every_derived_site():
    model = _model()
    schema = model.input_spec()
    names = [(f.name, f.role, f.shape) for f in schema.fields]
    assert names == [
        ("audio_latents", "latents", (17, 128)),
        ("video_latents", "latents", (17, 4, 4, 8)),
        ("text_tokens", "tokens", (24,)),
    ]
    assert sharding.input_keys(model) == ["audio_latents", "video_latents", "text_tokens"]
    shapes = sharding.batch_shapes(model, 3)
    assert shapes["text_tokens"].shape == (3, 24) and shapes["text_tokens"].dtype == jnp.int32
    _, _, raw, *_ = step_example_inputs(model, 2)
    assert set(raw) == {"text_tokens"} and raw["text_tokens"].shape == (2, 24)
    with pytest.raises(ValueError, match="text_tokens"):
        canonical_raw_conds(model, {}, 2)


def test_precomputed_text_features_path():
    """No byte encoder: text is a feature condition with an optional mask, everywhere at once."""
    model = _model(sets=["model.text_encoder=None"])
    schema = model.input_spec()
    assert [(f.name, f.role, f.optional) for f in schema.condition_fields] == [
        ("text", "features", False),
        ("text_mask", "mask", True),
    ]
    assert sharding.input_keys(model) == ["audio_latents", "video_latents", "text"]
    assert sharding.batch_shapes(model, 2)["text"].shape == (2, 24, 32)
    raw = canonical_raw_conds(model, {"text": np.ones((2, 24, 32))}, 2)
    assert raw["text_mask"].dtype == jnp.bool_ and bool(raw["text_mask"].all())
    with pytest.raises(ValueError, match=r"raw_conds\['text'\] has shape \(2, 24, 31\)"):
        canonical_raw_conds(model, {"text": np.ones((2, 24, 31))}, 2)
    params = model.init(jax.random.key(0))
    assert "text_encoder" not in params
    tokens, sigma, raw = model.dummy_inputs(2)
    out = model.velocity(params, tokens, sigma, raw)
    assert out["video"].shape == tokens["video"].shape


def test_batch_helpers_split_records():
    model = _model()
    schema = model.input_spec()
    batch = {"audio_latents": 1, "video_latents": 2, "text_tokens": 3, "text": "hello", "identity": 4}
    assert schema.latents_of(batch) == {"audio": 1, "video": 2}
    assert schema.conditions_of(batch) == {"text_tokens": 3}
