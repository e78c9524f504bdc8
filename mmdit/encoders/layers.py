"""Building blocks shared by the pretrained condition encoders (UMT5, wav2vec2, CLIP vision).

Every parameter carries logical axis names (``embed``, ``heads``, ``mlp``, ``vocab``, ``norm``,
``layers`` for the scanned layer axis) like the DiT's, so the encoders run under any
``mesh.rules``. Norms, softmax and activations are computed in float32 whatever the compute
``dtype``; outputs of :func:`dense` are in ``dtype``.

Kernels are stored ``[in, out]`` (PyTorch ``nn.Linear`` weights are ``[out, in]``; the converters
transpose).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def dense(features: int, names: tuple[str, str], dtype: Dtype, param_dtype: Dtype, use_bias: bool = True, name=None):
    """``nn.Dense`` with kernel ``[in, out]`` named ``names`` and bias ``[out]`` named ``(names[1],)``."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (names[1],)),
        name=name,
    )


class LayerNorm(nn.Module):
    """LayerNorm over the last axis in float32 (``scale``, ``bias`` ``[C]``; torch ``nn.LayerNorm``)."""

    eps: float = 1e-5
    param_dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)), (c,), self.param_dtype
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axis_name,)), (c,), self.param_dtype
        )
        h = x.astype(jnp.float32)
        mean = h.mean(-1, keepdims=True)
        var = jnp.square(h - mean).mean(-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return (h * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nn.Module):
    """T5's layer norm: ``x / sqrt(mean(x²) + eps) * scale`` in float32, no mean, no bias."""

    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (x.shape[-1],), self.param_dtype
        )
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + self.eps)
        return (h * scale.astype(jnp.float32)).astype(x.dtype)


def activation(name: str):
    """The transformers ``ACT2FN`` entries these encoders use: ``gelu`` (erf), ``gelu_new`` /
    ``gelu_pytorch_tanh`` (tanh approximation), ``quick_gelu`` (``x·σ(1.702x)``), ``relu``."""
    table = {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "relu": jax.nn.relu,
    }
    if name not in table:
        raise ValueError(f"activation {name!r} is not supported; one of {sorted(table)}")
    return table[name]


def attention(q, k, v, *, scale: float | None, bias=None, key_mask=None):
    """Softmax attention in float32.

    ``q, k, v`` ``[B, L, H, Dh]``; ``scale`` multiplies ``q·k`` (None: ``1/sqrt(Dh)``; UMT5 passes 1);
    ``bias`` broadcastable to ``[B, H, Lq, Lk]`` (relative position bias); ``key_mask`` bool ``[B, Lk]``
    (False keys get the float32 minimum added, as transformers' eager attention does, so a row with
    no valid key stays finite). Returns ``[B, Lq, H, Dh]`` in ``q.dtype``.
    """
    dh = q.shape[-1]
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    s = s * (1.0 / math.sqrt(dh) if scale is None else scale)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    if key_mask is not None:
        s = s + jnp.where(key_mask[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32)).astype(q.dtype)


def truncate_layers(params, num_layers: int, collection: str = "layers"):
    """``params`` with every leaf under ``params[...][collection]`` (the ``nn.scan`` stack, leading
    axis = layer) cut to its first ``num_layers`` entries: the params of the same encoder built with
    ``num_layers`` layers (how an intermediate layer's output is computed without running the rest)."""

    def cut(tree):
        out = {}
        for k, v in tree.items():
            if k == collection:
                out[k] = jax.tree_util.tree_map(lambda a: a[:num_layers], v)
            elif isinstance(v, dict):
                out[k] = cut(v)
            else:
                out[k] = v
        return out

    return cut(dict(params))
