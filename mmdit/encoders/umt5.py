"""UMT5 encoder (Wan 2.1/2.2's text encoder, transformers ``UMT5EncoderModel``) in Flax, and its tokenizer.

Architecture (per layer, pre-norm, no biases anywhere):

* T5 layer norm (:class:`~mmdit.encoders.layers.RMSNorm`: no mean, no bias, eps ``1e-6``) ->
  self-attention with **its own** relative-position bias table ``[buckets, heads]`` (T5 shares layer
  0's table across layers; UMT5 gives every layer one) added to ``q·k`` **without** the
  ``1/sqrt(d_kv)`` scaling -> residual;
* RMS norm -> gated FFN ``wo(act(wi_0 x) * wi_1 x)`` with ``act = gelu_new`` (tanh GELU) -> residual;

then a final RMS norm. Bidirectional relative-position buckets (:func:`relative_position_buckets`):
half the buckets for keys after the query; within each half, distances below ``buckets/4`` get their
own bucket and longer ones share logarithmically wider buckets up to ``max_distance``.

``UMT5Encoder(ids int [B, L], mask bool [B, L]) -> float32 [B, L, d_model]`` (hidden states at every
position, padding included, exactly what ``last_hidden_state`` is; Wan zeroes the padding positions
afterwards -- :class:`mmdit.encoders.registry.TextEncoder` does that). Layers are stacked with
``nn.scan`` (params ``layers/...`` with a leading layer axis).

:class:`Tokenizer` wraps ``transformers.AutoTokenizer`` loaded from local files only and tokenizes
the way diffusers' Wan pipelines do: pad to ``max_length``, truncate, EOS appended.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmdit.encoders.layers import Dtype, RMSNorm, activation, attention, dense

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """int32 ``[q_len, k_len]`` bucket of ``key - query`` for a bidirectional (encoder) T5 attention.

    Computed on the host in float32 the way transformers does (its bucket boundaries are float32
    ``log`` values truncated to integers; equal to transformers' for |distance| < 3000 at the UMT5-XXL
    and tiny configs).
    """
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    half = num_buckets // 2
    out = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    exact = half // 2
    logs = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(exact))
    logs = logs / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
    large = np.minimum(exact + logs.astype(np.int64), half - 1)
    return (out + np.where(dist < exact, dist, large)).astype(np.int32)


class _Block(nn.Module):
    """One UMT5 encoder layer; ``(x [B, L, D], (mask [B, L], buckets [L, L])) -> (x, None)`` for nn.scan."""

    heads: int
    head_dim: int
    ffn: int
    num_buckets: int
    eps: float
    act: str
    gated: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, aux):
        mask, buckets = aux
        b, length, d = x.shape
        inner = self.heads * self.head_dim
        h = RMSNorm(self.eps, self.param_dtype, name="attn_norm")(x)
        q, k, v = (
            dense(inner, ("embed", "heads"), self.dtype, self.param_dtype, use_bias=False, name=n)(h).reshape(
                b, length, self.heads, self.head_dim
            )
            for n in ("q", "k", "v")
        )
        table = self.param(
            "rel_bias",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "heads")),
            (self.num_buckets, self.heads),
            self.param_dtype,
        )
        bias = jnp.transpose(table[buckets], (2, 0, 1))[None]  # [1, H, L, L]
        o = attention(q, k, v, scale=1.0, bias=bias, key_mask=mask)
        x = x + dense(d, ("heads", "embed"), self.dtype, self.param_dtype, use_bias=False, name="o")(o.reshape(b, length, inner))
        h = RMSNorm(self.eps, self.param_dtype, name="ffn_norm")(x)
        a = activation(self.act)(dense(self.ffn, ("embed", "mlp"), self.dtype, self.param_dtype, use_bias=False, name="wi_0")(h))
        if self.gated:
            a = a * dense(self.ffn, ("embed", "mlp"), self.dtype, self.param_dtype, use_bias=False, name="wi_1")(h)
        x = x + dense(d, ("mlp", "embed"), self.dtype, self.param_dtype, use_bias=False, name="wo")(a)
        return x, None


class UMT5Encoder(nn.Module):
    """transformers ``UMT5EncoderModel`` (see the module docstring). Fields mirror ``UMT5Config``:
    ``vocab_size``, ``dim`` (d_model), ``heads`` (num_heads), ``head_dim`` (d_kv), ``ffn`` (d_ff),
    ``num_layers``, ``num_buckets`` / ``max_distance`` (relative attention), ``eps``
    (layer_norm_epsilon), ``act`` (dense_act_fn), ``gated`` (is_gated_act)."""

    vocab_size: int
    dim: int
    heads: int
    head_dim: int
    ffn: int
    num_layers: int
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    act: str = "gelu_new"
    gated: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids, mask=None):
        """``ids`` int ``[B, L]``, ``mask`` bool ``[B, L]`` (None: all valid) -> float32 ``[B, L, dim]``."""
        b, length = ids.shape
        mask = jnp.ones((b, length), bool) if mask is None else mask.astype(bool)
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (self.vocab_size, self.dim),
            self.param_dtype,
        )
        x = jnp.take(table, ids, axis=0).astype(self.dtype)
        buckets = jnp.asarray(relative_position_buckets(length, length, self.num_buckets, self.max_distance))
        stack = nn.scan(
            _Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(
            self.heads,
            self.head_dim,
            self.ffn,
            self.num_buckets,
            self.eps,
            self.act,
            self.gated,
            self.dtype,
            self.param_dtype,
            name="layers",
        )(x, (mask, buckets))
        return RMSNorm(self.eps, self.param_dtype, name="final_norm")(x).astype(jnp.float32)


@dataclasses.dataclass
class Tokenizer:
    """A UMT5 (SentencePiece/Unigram) tokenizer read with ``transformers.AutoTokenizer`` from local
    files (``local_files_only``: nothing is downloaded).

    ``path``: a folder holding ``tokenizer.json`` / ``tokenizer_config.json`` (or ``spiece.model``),
    e.g. a Wan diffusers pipeline's ``tokenizer/`` folder. ``__call__(texts, max_length)`` ->
    ``(ids int32 [B, max_length], mask bool [B, max_length])`` tokenized like diffusers'
    ``WanPipeline._get_t5_prompt_embeds``: EOS appended, truncated, padded with ``<pad>`` (id 0) to
    ``max_length``.
    """

    path: str

    def __post_init__(self):
        if not has_tokenizer(self.path):
            raise FileNotFoundError(
                f"{self.path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); point the encoder's `tokenizer` "
                "at the folder holding them (a Wan diffusers download has it as <pipeline>/tokenizer)"
            )
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self._tok(
            texts,
            padding="max_length",
            max_length=int(max_length),
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="np",
        )
        return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"]).astype(bool)


def has_tokenizer(path: str | None) -> bool:
    """Whether ``path`` is a folder holding tokenizer files."""
    return bool(path) and os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)
