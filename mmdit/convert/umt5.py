"""Converter family ``umt5``: transformers ``UMT5EncoderModel`` (Wan 2.1/2.2's ``text_encoder``) -- or the
encoder half of ``UMT5Model`` / ``UMT5ForConditionalGeneration`` (google/umt5-*) -- ->
:class:`mmdit.encoders.umt5.UMT5Encoder` params.

Name map (transformers -> ours; ``nn.Linear`` ``weight [out, in]`` -> ``kernel [in, out]``; ``i`` = layer,
stacked on the leading axis of ``layers/*``):

* ``shared.weight`` (or ``encoder.embed_tokens.weight``) ``[V, D]`` -> ``embedding``;
* ``encoder.block.{i}.layer.0.layer_norm.weight`` -> ``layers/attn_norm/scale``;
* ``encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight`` -> ``layers/{q,k,v,o}/kernel``;
* ``encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight`` ``[buckets, H]`` -> ``layers/rel_bias``;
* ``encoder.block.{i}.layer.1.layer_norm.weight`` -> ``layers/ffn_norm/scale``;
* ``encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight`` -> ``layers/{wi_0,wi_1,wo}/kernel``
  (a non-gated checkpoint's ``wi`` -> ``wi_0``);
* ``encoder.final_layer_norm.weight`` -> ``final_norm/scale``.

Dropped on purpose (``IGNORED``): the decoder, ``lm_head``, and the tied ``encoder.embed_tokens`` copy.
The tokenizer is not part of the weights: the text encoder reads it from its ``tokenizer`` setting
(see :mod:`mmdit.encoders.registry`).
"""

from __future__ import annotations

import numpy as np

from mmdit.convert.source import ConvertError
from mmdit.convert.stacking import get, stack_layers

NAME = "umt5"
DESCRIPTION = "UMT5 text encoder (transformers UMT5EncoderModel: Wan 2.1/2.2 text_encoder, google/umt5-xxl encoder)"

SUPPORTED_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu")


def matches(hf_config: dict) -> bool:
    return hf_config.get("model_type") == "umt5"


def _ffn(hf_config: dict) -> tuple[str, bool]:
    """``(activation, gated)`` from ``feed_forward_proj`` ("gated-gelu" -> ("gelu_new", True), as transformers maps it)."""
    proj = str(hf_config.get("feed_forward_proj", "gated-gelu"))
    parts = proj.split("-")
    gated = parts[0] == "gated"
    act = parts[-1]
    if act == "gelu" and gated:
        act = "gelu_new"  # transformers' UMT5Config: "gated-gelu" means the tanh GELU
    return act, gated


def check(hf_config: dict) -> None:
    proj = str(hf_config.get("feed_forward_proj", "gated-gelu"))
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ConvertError(f"config.json feed_forward_proj={proj!r}: expected ACT or gated-ACT (e.g. 'gated-gelu')")
    act, _ = _ffn(hf_config)
    if act not in SUPPORTED_ACTS:
        raise ConvertError(
            f"config.json feed_forward_proj={proj!r}: activation {act!r} not supported ({', '.join(SUPPORTED_ACTS)})"
        )
    for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
        if not isinstance(hf_config.get(key), int) or hf_config[key] < 1:
            raise ConvertError(f"config.json {key}={hf_config.get(key)!r}: expected a positive integer")


def target(hf_config: dict) -> dict:
    act, gated = _ffn(hf_config)
    return {
        "kind": "umt5",
        "vocab_size": int(hf_config["vocab_size"]),
        "dim": int(hf_config["d_model"]),
        "heads": int(hf_config["num_heads"]),
        "head_dim": int(hf_config["d_kv"]),
        "ffn": int(hf_config["d_ff"]),
        "num_layers": int(hf_config["num_layers"]),
        "num_buckets": int(hf_config.get("relative_attention_num_buckets", 32)),
        "max_distance": int(hf_config.get("relative_attention_max_distance", 128)),
        "eps": float(hf_config.get("layer_norm_epsilon", 1e-6)),
        "act": act,
        "gated": bool(gated),
    }


def IGNORED(hf_config: dict):
    return ("decoder.*", "lm_head.*", "encoder.embed_tokens.weight", "shared.weight")


def convert(src, hf_config: dict, dtype) -> dict:
    t = target(hf_config)
    n, d, inner = t["num_layers"], t["dim"], t["heads"] * t["head_dim"]
    emb = "shared.weight" if "shared.weight" in src else "encoder.embed_tokens.weight"
    blk = "encoder.block.{}.layer.{}.".format
    T = lambda a: np.ascontiguousarray(a.T)
    layers = {
        "attn_norm": {"scale": stack_layers(src, lambda i: blk(i, 0) + "layer_norm.weight", n, dtype)},
        "rel_bias": stack_layers(src, lambda i: blk(i, 0) + "SelfAttention.relative_attention_bias.weight", n, dtype),
        "ffn_norm": {"scale": stack_layers(src, lambda i: blk(i, 1) + "layer_norm.weight", n, dtype)},
    }
    for k in ("q", "k", "v", "o"):
        layers[k] = {"kernel": stack_layers(src, lambda i, k=k: blk(i, 0) + f"SelfAttention.{k}.weight", n, dtype, T)}
    ffn_names = {"wi_0": "wi_0", "wi_1": "wi_1", "wo": "wo"} if t["gated"] else {"wi_0": "wi", "wo": "wo"}
    for ours, theirs in ffn_names.items():
        layers[ours] = {"kernel": stack_layers(src, lambda i, s=theirs: blk(i, 1) + f"DenseReluDense.{s}.weight", n, dtype, T)}
    if layers["rel_bias"].shape[1:] != (t["num_buckets"], t["heads"]):
        raise ConvertError(
            f"{src.directory}: relative_attention_bias is {layers['rel_bias'].shape[1:]}, config.json implies "
            f"(relative_attention_num_buckets={t['num_buckets']}, num_heads={t['heads']})"
        )
    if layers["q"]["kernel"].shape[1:] != (d, inner):
        raise ConvertError(
            f"{src.directory}: SelfAttention.q is {layers['q']['kernel'].shape[1:]}, config.json implies {(d, inner)}"
        )
    return {
        "params": {
            "embedding": get(src, emb, dtype, shape=(t["vocab_size"], d)),
            "layers": layers,
            "final_norm": {"scale": get(src, "encoder.final_layer_norm.weight", dtype, shape=(d,))},
        }
    }


def build(target: dict):
    from mmdit.encoders.umt5 import UMT5Encoder

    kw = {k: v for k, v in target.items() if k != "kind"}
    return UMT5Encoder(**kw)
