"""Converter family ``clip_vision``: transformers ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``
(Wan2.1-I2V's ``image_encoder``), or the vision half of a full ``CLIPModel`` folder (its
``vision_config``) -> :class:`mmdit.encoders.clip_vision.CLIPVision` params.

Name map (transformers, after an optional ``vision_model.`` prefix -> ours; ``nn.Linear`` ``weight [out, in]`` -> ``kernel [in, out]``;
LayerNorm ``weight`` -> ``scale``):

* ``embeddings.patch_embedding.weight`` ``[C, 3, p, p]`` -> ``patch_embed`` ``[p, p, 3, C]``;
* ``embeddings.class_embedding`` -> ``class_embed``; ``embeddings.position_embedding.weight`` -> ``pos_embed``;
* ``pre_layrnorm`` -> ``pre_norm``; ``post_layernorm`` -> ``post_norm``;
* ``encoder.layers.{i}.self_attn.{q,k,v,out}_proj`` -> ``layers/{q,k,v,o}``, ``layer_norm1`` / ``layer_norm2``
  -> ``layers/attn_norm`` / ``layers/ffn_norm``, ``mlp.fc1`` / ``mlp.fc2`` -> ``layers/fc1`` / ``fc2``.

Dropped on purpose (``IGNORED``): a full CLIP's ``text_model``, ``text_projection``, ``visual_projection``,
``logit_scale``, and the ``position_ids`` buffer.
"""

from __future__ import annotations

import numpy as np

from mmdit.convert.source import ConvertError
from mmdit.convert.stacking import get, stack_layers

NAME = "clip_vision"
DESCRIPTION = "CLIP vision tower (transformers CLIPVisionModel[WithProjection] / CLIPModel's vision half: Wan2.1-I2V image_encoder, ViT-H/14)"

ACTS = ("quick_gelu", "gelu", "gelu_new", "relu")
VISION_ARCHS = ("CLIPVisionModel", "CLIPVisionModelWithProjection")


def matches(hf_config: dict) -> bool:
    if hf_config.get("model_type") == "clip_vision_model":
        return True
    archs = hf_config.get("architectures") or []
    return any(a in VISION_ARCHS for a in archs) or (hf_config.get("model_type") == "clip" and "vision_config" in hf_config)


def _vision(hf_config: dict) -> dict:
    """The vision config: ``hf_config`` itself, or a full CLIP config's ``vision_config``."""
    return hf_config["vision_config"] if hf_config.get("model_type") == "clip" and "vision_config" in hf_config else hf_config


def check(hf_config: dict) -> None:
    c = _vision(hf_config)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(c.get(key), int) or c[key] < 1:
            raise ConvertError(f"config.json {key}={c.get(key)!r}: expected a positive integer (the vision config)")
    if c.get("hidden_act", "quick_gelu") not in ACTS:
        raise ConvertError(f"config.json hidden_act={c.get('hidden_act')!r}: supported activations are {', '.join(ACTS)}")
    if c.get("image_size", 224) % c.get("patch_size", 32):
        raise ConvertError(f"config.json image_size={c.get('image_size')} is not a multiple of patch_size={c.get('patch_size')}")
    if c["hidden_size"] % c["num_attention_heads"]:
        raise ConvertError(
            f"config.json hidden_size={c['hidden_size']} is not divisible by num_attention_heads={c['num_attention_heads']}"
        )


def target(hf_config: dict) -> dict:
    c = _vision(hf_config)
    return {
        "kind": "clip_vision",
        "dim": int(c["hidden_size"]),
        "num_layers": int(c["num_hidden_layers"]),
        "heads": int(c["num_attention_heads"]),
        "ffn": int(c["intermediate_size"]),
        "image_size": int(c.get("image_size", 224)),
        "patch": int(c.get("patch_size", 32)),
        "channels": int(c.get("num_channels", 3)),
        "eps": float(c.get("layer_norm_eps", 1e-5)),
        "act": str(c.get("hidden_act", "quick_gelu")),
    }


def IGNORED(hf_config: dict):
    return ("text_model.*", "text_projection.*", "visual_projection.*", "logit_scale", "*position_ids")


def convert(src, hf_config: dict, dtype) -> dict:
    t = target(hf_config)
    # transformers 4 saved the tower under ``vision_model.`` (Wan's image_encoder, full CLIP folders); 5 saves it bare.
    p = "vision_model." if any(n.startswith("vision_model.") for n in src.names()) else ""
    if p + "embeddings.patch_embedding.weight" not in src:
        raise ConvertError(
            f"{src.directory}: no '[vision_model.]embeddings.patch_embedding.weight'; this is not a CLIP vision checkpoint"
        )
    n, d = t["num_layers"], t["dim"]
    T = lambda a: np.ascontiguousarray(a.T)
    norm = lambda name: {
        "scale": get(src, name + ".weight", dtype, shape=(d,)),
        "bias": get(src, name + ".bias", dtype, shape=(d,)),
    }
    L = lambda i: f"{p}encoder.layers.{i}."
    layers: dict = {}
    pairs = (
        ("q", "self_attn.q_proj"),
        ("k", "self_attn.k_proj"),
        ("v", "self_attn.v_proj"),
        ("o", "self_attn.out_proj"),
        ("fc1", "mlp.fc1"),
        ("fc2", "mlp.fc2"),
    )
    for ours, theirs in pairs:
        layers[ours] = {
            "kernel": stack_layers(src, lambda i, s=theirs: L(i) + s + ".weight", n, dtype, T),
            "bias": stack_layers(src, lambda i, s=theirs: L(i) + s + ".bias", n, dtype),
        }
    for ours, theirs in (("attn_norm", "layer_norm1"), ("ffn_norm", "layer_norm2")):
        layers[ours] = {
            "scale": stack_layers(src, lambda i, s=theirs: L(i) + s + ".weight", n, dtype),
            "bias": stack_layers(src, lambda i, s=theirs: L(i) + s + ".bias", n, dtype),
        }
    if layers["fc1"]["kernel"].shape[1:] != (d, t["ffn"]):
        raise ConvertError(
            f"{src.directory}: mlp.fc1 is {layers['fc1']['kernel'].shape[1:]}, config.json implies {(d, t['ffn'])}"
        )
    pp, c = t["patch"], t["channels"]
    tokens = 1 + (t["image_size"] // pp) ** 2
    return {
        "params": {
            "patch_embed": get(
                src,
                p + "embeddings.patch_embedding.weight",
                dtype,
                lambda a: np.ascontiguousarray(np.transpose(a, (2, 3, 1, 0))),
                shape=(pp, pp, c, d),
            ),
            "class_embed": get(src, p + "embeddings.class_embedding", dtype, shape=(d,)),
            "pos_embed": get(src, p + "embeddings.position_embedding.weight", dtype, shape=(tokens, d)),
            "pre_norm": norm(p + "pre_layrnorm"),
            "layers": layers,
            "post_norm": norm(p + "post_layernorm"),
        }
    }


def build(target: dict):
    from mmdit.encoders.clip_vision import CLIPVision

    return CLIPVision(**{k: v for k, v in target.items() if k != "kind"})
