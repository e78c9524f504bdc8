"""Converter family ``wav2vec2``: transformers ``Wav2Vec2Model`` (or the ``wav2vec2.`` body of
``Wav2Vec2ForCTC`` / ``Wav2Vec2ForPreTraining``: facebook/wav2vec2-base-960h, -large-960h,
-large-960h-lv60-self, chinese-wav2vec2-base...) -> :class:`mmdit.encoders.wav2vec2.Wav2Vec2` params.

Name map (transformers, after stripping an optional ``wav2vec2.`` prefix -> ours; ``nn.Linear``
``weight [out, in]`` -> ``kernel [in, out]``; ``nn.Conv1d`` ``weight [out, in/groups, k]`` -> ``kernel
[k, in/groups, out]``; LayerNorm/GroupNorm ``weight`` -> ``scale``):

* ``feature_extractor.conv_layers.{i}.conv.*`` -> ``conv_{i}``; ``....{i}.layer_norm.*`` -> ``conv_norm_{i}``;
* ``feature_projection.layer_norm.*`` -> ``proj_norm``; ``feature_projection.projection.*`` -> ``proj``;
* ``encoder.pos_conv_embed.conv.*`` -> ``pos_conv``: the weight norm (``parametrizations.weight.original0``
  = g ``[1, 1, k]``, ``original1`` = v, or the older ``weight_g`` / ``weight_v``) is folded:
  ``kernel[k] = g[k] · v[..., k] / ||v[..., k]||``;
* ``encoder.layer_norm.*`` -> ``encoder_norm``;
* ``encoder.layers.{i}.attention.{q,k,v,out}_proj.*`` -> ``layers/{q,k,v,o}``, ``layer_norm`` ->
  ``layers/attn_norm``, ``final_layer_norm`` -> ``layers/ffn_norm``, ``feed_forward.intermediate_dense``
  / ``output_dense`` -> ``layers/fc1`` / ``fc2`` (stacked over ``i``).

Dropped on purpose (``IGNORED``): ``masked_spec_embed`` (SpecAugment, training only), CTC ``lm_head``,
the pre-training quantizer and projections. Adapters (``add_adapter``, ``adapter_attn_dim``) are refused.
"""

from __future__ import annotations

import numpy as np

from mmdit.convert.source import ConvertError
from mmdit.convert.stacking import get, stack_layers

NAME = "wav2vec2"
DESCRIPTION = "wav2vec 2.0 audio encoder (transformers Wav2Vec2Model / Wav2Vec2ForCTC body: wav2vec2-base, -large, -large-lv60)"

ACTS = ("gelu", "gelu_new", "relu", "quick_gelu")


def matches(hf_config: dict) -> bool:
    return hf_config.get("model_type") == "wav2vec2"


def check(hf_config: dict) -> None:
    norm = hf_config.get("feat_extract_norm", "group")
    if norm not in ("group", "layer"):
        raise ConvertError(f"config.json feat_extract_norm={norm!r}: expected 'group' or 'layer'")
    if hf_config.get("add_adapter"):
        raise ConvertError(
            "config.json add_adapter=true: wav2vec2 adapter layers are not supported; use a checkpoint without them"
        )
    if hf_config.get("adapter_attn_dim") is not None:
        raise ConvertError(f"config.json adapter_attn_dim={hf_config['adapter_attn_dim']}: attention adapters are not supported")
    for key in ("hidden_act", "feat_extract_activation"):
        if hf_config.get(key, "gelu") not in ACTS:
            raise ConvertError(f"config.json {key}={hf_config.get(key)!r}: supported activations are {', '.join(ACTS)}")
    dims, kernels, strides = (list(hf_config.get(k, ())) for k in ("conv_dim", "conv_kernel", "conv_stride"))
    if not dims or not (len(dims) == len(kernels) == len(strides)):
        raise ConvertError(
            f"config.json conv_dim/conv_kernel/conv_stride have lengths {len(dims)}/{len(kernels)}/{len(strides)}: must match"
        )
    if hf_config["hidden_size"] % hf_config["num_attention_heads"]:
        raise ConvertError(
            f"config.json hidden_size={hf_config['hidden_size']} is not divisible by num_attention_heads={hf_config['num_attention_heads']}"
        )


def target(hf_config: dict) -> dict:
    c = hf_config
    return {
        "kind": "wav2vec2",
        "dim": int(c["hidden_size"]),
        "num_layers": int(c["num_hidden_layers"]),
        "heads": int(c["num_attention_heads"]),
        "ffn": int(c["intermediate_size"]),
        "conv_dim": [int(x) for x in c["conv_dim"]],
        "conv_kernel": [int(x) for x in c["conv_kernel"]],
        "conv_stride": [int(x) for x in c["conv_stride"]],
        "conv_bias": bool(c.get("conv_bias", False)),
        "feat_norm": str(c.get("feat_extract_norm", "group")),
        "pos_kernel": int(c.get("num_conv_pos_embeddings", 128)),
        "pos_groups": int(c.get("num_conv_pos_embedding_groups", 16)),
        "stable": bool(c.get("do_stable_layer_norm", False)),
        "eps": float(c.get("layer_norm_eps", 1e-5)),
        "act": str(c.get("hidden_act", "gelu")),
        "feat_act": str(c.get("feat_extract_activation", "gelu")),
    }


def IGNORED(hf_config: dict):
    return (
        "masked_spec_embed",
        "wav2vec2.masked_spec_embed",
        "lm_head.*",
        "quantizer.*",
        "project_hid.*",
        "project_q.*",
        "dropout_features*",
    )


def _prefix(src) -> str:
    return "wav2vec2." if any(n.startswith("wav2vec2.") for n in src.names()) else ""


def _conv(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(w, (2, 1, 0)))


def _fold_weight_norm(src, p: str, dtype) -> np.ndarray:
    """The positional conv kernel ``[k, in/groups, out]`` with its weight norm (over dims 0, 1 of
    torch's ``[out, in/groups, k]``, i.e. ``dim=2``) folded in."""
    base = p + "encoder.pos_conv_embed.conv."
    for g_name, v_name in (("parametrizations.weight.original0", "parametrizations.weight.original1"), ("weight_g", "weight_v")):
        if base + g_name in src and base + v_name in src:
            g, v = src.get(base + g_name), src.get(base + v_name)
            if g.shape != (1, 1, v.shape[2]):
                raise ConvertError(
                    f"{src.directory}: {base + g_name} has shape {g.shape}; expected (1, 1, {v.shape[2]}) (weight norm over dim 2)"
                )
            norm = np.sqrt(np.square(v.astype(np.float64)).sum(axis=(0, 1), keepdims=True))
            return _conv((g * v / norm).astype(np.float32)).astype(dtype)
    return get(src, base + "weight", dtype, _conv)


def convert(src, hf_config: dict, dtype) -> dict:
    t = target(hf_config)
    p = _prefix(src)
    n = t["num_layers"]
    T = lambda a: np.ascontiguousarray(a.T)
    lin = lambda name: {"kernel": get(src, name + ".weight", dtype, T), "bias": get(src, name + ".bias", dtype)}
    norm = lambda name: {"scale": get(src, name + ".weight", dtype), "bias": get(src, name + ".bias", dtype)}
    params: dict = {}
    for i in range(len(t["conv_dim"])):
        base = f"{p}feature_extractor.conv_layers.{i}."
        params[f"conv_{i}"] = {"kernel": get(src, base + "conv.weight", dtype, _conv)}
        if t["conv_bias"]:
            params[f"conv_{i}"]["bias"] = get(src, base + "conv.bias", dtype)
        if t["feat_norm"] == "layer" or i == 0:
            params[f"conv_norm_{i}"] = norm(base + "layer_norm")
    params["proj_norm"] = norm(p + "feature_projection.layer_norm")
    params["proj"] = lin(p + "feature_projection.projection")
    params["pos_conv"] = {
        "kernel": _fold_weight_norm(src, p, dtype),
        "bias": get(src, p + "encoder.pos_conv_embed.conv.bias", dtype),
    }
    want = (t["pos_kernel"], t["dim"] // t["pos_groups"], t["dim"])
    if params["pos_conv"]["kernel"].shape != want:
        raise ConvertError(
            f"{src.directory}: encoder.pos_conv_embed.conv is {params['pos_conv']['kernel'].shape} as [k, in/groups, out]; config.json "
            f"(num_conv_pos_embeddings, hidden_size/num_conv_pos_embedding_groups, hidden_size) implies {want}"
        )
    params["encoder_norm"] = norm(p + "encoder.layer_norm")
    L = lambda i: f"{p}encoder.layers.{i}."
    layers: dict = {}
    for ours, theirs in (
        ("q", "attention.q_proj"),
        ("k", "attention.k_proj"),
        ("v", "attention.v_proj"),
        ("o", "attention.out_proj"),
    ):
        layers[ours] = {
            "kernel": stack_layers(src, lambda i, s=theirs: L(i) + s + ".weight", n, dtype, T),
            "bias": stack_layers(src, lambda i, s=theirs: L(i) + s + ".bias", n, dtype),
        }
    for ours, theirs in (("fc1", "feed_forward.intermediate_dense"), ("fc2", "feed_forward.output_dense")):
        layers[ours] = {
            "kernel": stack_layers(src, lambda i, s=theirs: L(i) + s + ".weight", n, dtype, T),
            "bias": stack_layers(src, lambda i, s=theirs: L(i) + s + ".bias", n, dtype),
        }
    for ours, theirs in (("attn_norm", "layer_norm"), ("ffn_norm", "final_layer_norm")):
        layers[ours] = {
            "scale": stack_layers(src, lambda i, s=theirs: L(i) + s + ".weight", n, dtype),
            "bias": stack_layers(src, lambda i, s=theirs: L(i) + s + ".bias", n, dtype),
        }
    params["layers"] = layers
    return {"params": params}


def build(target: dict):
    from mmdit.encoders.wav2vec2 import Wav2Vec2

    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in target.items() if k != "kind"}
    return Wav2Vec2(**kw)
