"""The embedded text path: a byte-level tokenizer and a small trainable Flax text encoder.

Stands in for UMT5 (which comes with the converted checkpoints) in the embedded default: no
vocabulary file, no weights to download, and the model's text cross-attention sees ``[B, L, dim]``
features plus a padding mask exactly as it will with UMT5.

**Tokenizer** (:class:`ByteTokenizer`): UTF-8 bytes shifted by 3; id 0 = PAD, 1 = BOS, 2 = EOS, so
``vocab_size = 259``. ``encode(text, max_len)`` -> int32 ``[max_len]`` = ``BOS, bytes..., EOS, PAD...``
(text longer than ``max_len - 2`` bytes is cut at a character boundary and keeps its EOS).

**Encoder** (:class:`ByteTextEncoder`): token embedding + learned positions, ``layers`` pre-norm
transformer blocks (LayerNorm -> multi-head self-attention that ignores padding keys -> residual;
LayerNorm -> GELU MLP -> residual) stacked with ``nn.scan`` (compile time independent of depth), final
LayerNorm. ``__call__(tokens int [B, L]) -> (features float32 [B, L, dim], mask bool [B, L])`` with
``mask = tokens != PAD``; features at padding positions are zeroed. Params carry logical axis names
(``vocab``, ``embed``, ``heads``, ``kv``, ``mlp``, ``layers``, ``length``) for the partitioning rules.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PAD, BOS, EOS = 0, 1, 2
OFFSET = 3
VOCAB_SIZE = 256 + OFFSET


class ByteTokenizer:
    """UTF-8 byte tokenizer with PAD=0, BOS=1, EOS=2 (see the module docstring)."""

    vocab_size = VOCAB_SIZE
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def encode(self, text: str, max_len: int) -> np.ndarray:
        """``text`` -> int32 ``[max_len]``: BOS, UTF-8 bytes + 3, EOS, then PAD (0)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}; decode bytes with .decode('utf-8') first")
        if max_len < 2:
            raise ValueError(f"max_len={max_len} leaves no room for BOS and EOS; use max_len >= 2")
        data = text.encode("utf-8")
        if len(data) > max_len - 2:  # cut, dropping a multi-byte character the cut would split
            data = data[: max_len - 2].decode("utf-8", errors="ignore").encode("utf-8")
        out = np.zeros(max_len, np.int32)
        out[0] = BOS
        out[1: 1 + len(data)] = np.frombuffer(data, np.uint8).astype(np.int32) + OFFSET
        out[1 + len(data)] = EOS
        return out

    def encode_batch(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """A list of strings -> int32 ``[B, max_len]``."""
        return np.stack([self.encode(t, max_len) for t in texts]) if texts else np.zeros((0, max_len), np.int32)

    def decode(self, tokens) -> str:
        """int ``[L]`` -> text: the bytes between BOS and the first EOS (PAD and specials skipped)."""
        ids = np.asarray(tokens).ravel().tolist()
        data = bytearray()
        for i in ids:
            if i == EOS:
                break
            if i >= OFFSET:
                data.append(i - OFFSET)
        return data.decode("utf-8", errors="replace")


def _dense(features: int, axes: tuple[str, ...], name: str) -> nn.Module:
    return nn.Dense(features, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)))


def _layer_norm(name: str) -> nn.Module:
    return nn.LayerNorm(name=name, scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


class _Block(nn.Module):
    """One pre-norm transformer block; ``(x [B, L, D], mask [B, L]) -> (x, None)`` for ``nn.scan``."""

    dim: int
    heads: int
    mlp_ratio: int

    @nn.compact
    def __call__(self, x, mask):
        b, length, d = x.shape
        dh = d // self.heads
        h = _layer_norm("attn_norm")(x)
        qkv = nn.DenseGeneral((3, self.heads, dh), name="qkv",
                              kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                                       ("embed", None, "heads", "kv")),
                              bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                     (None, "heads", "kv")))(h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, H, Dh]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * dh ** -0.5
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)  # finite: no NaN rows
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        x = x + nn.DenseGeneral(d, axis=(-2, -1), name="out",
                                kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                                         ("heads", "kv", "embed")),
                                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))(attn)
        h = _layer_norm("mlp_norm")(x)
        h = nn.gelu(_dense(self.mlp_ratio * d, ("embed", "mlp"), "mlp_in")(h))
        x = x + _dense(d, ("mlp", "embed"), "mlp_out")(h)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class ByteTextEncoder(nn.Module):
    """Byte tokens ``int [B, L]`` -> ``(features float32 [B, L, dim], mask bool [B, L])``.

    ``max_len`` bounds ``L`` (learned positions). ``dim`` must be divisible by ``heads``.
    """

    vocab: int = VOCAB_SIZE
    dim: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    max_len: int = 128

    @nn.compact
    def __call__(self, tokens):
        if self.dim % self.heads:
            raise ValueError(f"ByteTextEncoder.dim={self.dim} is not divisible by heads={self.heads}")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be int [B, L], got shape {tokens.shape}; use tokens[None] for one text")
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"tokens have length {length} > ByteTextEncoder.max_len={self.max_len}; encode with "
                             f"max_len <= {self.max_len} or raise max_len")
        mask = tokens != PAD
        embed = nn.Embed(self.vocab, self.dim, name="token_embed",
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
                         (self.max_len, self.dim))
        x = embed(tokens) + pos[None, :length]
        blocks = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast,
                         length=self.layers, metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = blocks(self.dim, self.heads, self.mlp_ratio, name="blocks")(x, mask)
        x = _layer_norm("final_norm")(x)
        return jnp.where(mask[..., None], x, 0.0), mask
