"""The embedded default's trainable text encoder (stands in for UMT5, trained with the DiT).

Reads byte tokens (:class:`mmdit.codecs.text.ByteTokenizer`: PAD = 0) and gives the DiT's text
cross-attention ``[B, L, dim]`` features plus a padding mask, exactly the interface precomputed
UMT5 features have.

Architecture: token embedding + learned positions, ``layers`` pre-norm transformer blocks
(LayerNorm -> multi-head self-attention that ignores padding keys -> residual; LayerNorm -> GELU MLP
-> residual) stacked with ``nn.scan`` (compile time independent of depth), final LayerNorm.
``__call__(tokens int [B, L]) -> (features float32 [B, L, dim], mask bool [B, L])`` with
``mask = tokens != PAD``; features at padding positions are zeroed.

Every kernel is 2-D and built by the DiT's own :func:`mmdit.model.layers.dense`, so the params carry
the same logical names as the DiT's (``vocab``, ``embed``, ``heads``, ``mlp``, ``layers``,
``cond_length``) and the encoder runs under any logical rules. Positions and activations use
``cond_length`` (a short replicated context), never the sequence-parallel ``length`` axis.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmdit.codecs.text import PAD, VOCAB_SIZE
from mmdit.model.layers import dense


def _layer_norm(name: str) -> nn.Module:
    return nn.LayerNorm(
        name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
    )


class _Projection(nn.Module):
    """A dense layer over several input axes to several output axes with a *2-D* kernel
    ``[prod(in), prod(out)]`` (logical names ``names``, like :func:`mmdit.model.layers.dense`) and bias
    ``[prod(out)]``: ``x [..., *in] -> [..., *out]`` in one ``dot_general`` on the kernel's
    ``[*in, *out]`` view (flax ``DenseGeneral``'s computation, whose 4-D kernels cannot carry 2-D
    logical names)."""

    out_shape: tuple[int, ...]
    in_ndim: int
    names: tuple[str, str]

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.in_ndim :]
        fan_in, fan_out = math.prod(in_shape), math.prod(self.out_shape)
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(nn.initializers.xavier_uniform(), self.names), (fan_in, fan_out), jnp.float32
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.names[1],)), (fan_out,), jnp.float32
        )
        contract = tuple(range(x.ndim - self.in_ndim, x.ndim))
        y = jax.lax.dot_general(x, kernel.reshape(*in_shape, *self.out_shape), ((contract, tuple(range(self.in_ndim))), ((), ())))
        return y + bias.reshape(self.out_shape)


class _Block(nn.Module):
    """One pre-norm transformer block; ``(x [B, L, D], mask [B, L]) -> (x, None)`` for ``nn.scan``."""

    dim: int
    heads: int
    mlp_ratio: int

    @nn.compact
    def __call__(self, x, mask):
        b, length, d = x.shape
        dh = d // self.heads
        f32 = jnp.float32
        h = _layer_norm("attn_norm")(x)
        # One fused projection, kernel [D, 3·H·Dh] (q, k, v blocks in that order).
        qkv = _Projection((3, self.heads, dh), 1, ("embed", "heads"), name="qkv")(h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, H, Dh]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * dh**-0.5
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)  # finite: no NaN rows
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        x = x + _Projection((d,), 2, ("heads", "embed"), name="out")(attn)
        h = _layer_norm("mlp_norm")(x)
        h = nn.gelu(dense(self.mlp_ratio * d, ("embed", "mlp"), None, f32, name="mlp_in")(h))
        x = x + dense(d, ("mlp", "embed"), None, f32, name="mlp_out")(h)
        return nn.with_logical_constraint(x, ("batch", "cond_length", "embed")), None


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
            raise ValueError(
                f"tokens have length {length} > ByteTextEncoder.max_len={self.max_len}; encode with "
                f"max_len <= {self.max_len} or raise max_len"
            )
        mask = tokens != PAD
        embed = nn.Embed(
            self.vocab,
            self.dim,
            name="token_embed",
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        pos = self.param(
            "pos_embed",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("cond_length", "embed")),
            (self.max_len, self.dim),
        )
        x = embed(tokens) + pos[None, :length]
        blocks = nn.scan(
            _Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=self.layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = blocks(self.dim, self.heads, self.mlp_ratio, name="blocks")(x, mask)
        x = _layer_norm("final_norm")(x)
        return jnp.where(mask[..., None], x, 0.0), mask
