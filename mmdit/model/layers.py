"""Building blocks shared by every stream, in Wan 2.1/2.2's layer layout (adaLN modulation, RMS q/k norm,
FP32 LayerNorm). Weight-for-weight parity with diffusers' WanTransformer3DModel is proven by
tests/test_parity_wan_dit.py (converter: mmdit/convert/wan_dit.py).

Shapes: activations ``[B, S, D]``; per-token timestep embeddings ``[B, S, D]``; modulation
``[B, S, K, D]`` (K = 6 per block, 2 for the output head). Every param carries logical axis names.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


Dtype = jnp.dtype


def dense(features, names, dtype, param_dtype, use_bias=True, name=None, kernel_init=None):
    """``nn.Dense`` whose kernel has logical axis names ``names`` = (in, out); the bias gets (out,)."""
    kernel_init = kernel_init or nn.initializers.xavier_uniform()
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (names[1],)),
        name=name,
    )


def sinusoidal_embedding(t, dim: int = 256, max_period: float = 10000.0):
    """Timestep features ``[..., dim]`` for ``t [...]`` (Wan: ``1000 * sigma``), cos first
    (diffusers ``Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)``). f32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class LayerNorm(nn.Module):
    """LayerNorm computed in f32 (Wan's FP32LayerNorm); ``affine=False`` has no params."""

    eps: float = 1e-6
    affine: bool = False
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            d = x.shape[-1]
            scale = self.param(
                "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)), (d,), self.param_dtype
            )
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)), (d,), self.param_dtype
            )
            y = y * scale + bias
        return y


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale, in f32 (Wan's q/k norm across all heads)."""

    eps: float = 1e-6
    axis_name: str = "heads"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        return (y * scale).astype(x.dtype)


def modulate(x_normed, shift, scale):
    """adaLN: ``x * (1 + scale) + shift`` (all broadcast ``[B, S, D]``), f32."""
    return x_normed * (1.0 + scale) + shift


class TimestepEmbedding(nn.Module):
    """Per-token σ -> (``temb [B, S, D]``, modulation ``[B, S, 6, D]``).

    Wan: sinusoidal(1000σ, 256) -> Linear -> SiLU -> Linear = temb; SiLU -> Linear(D, 6D) = the
    shared adaLN-Zero modulation that every block offsets by its own learned table."""

    dim: int
    freq_dim: int = 256
    num_mod: int = 6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sigma_tokens):
        f = sinusoidal_embedding(1000.0 * sigma_tokens, self.freq_dim)
        h = dense(self.dim, ("freq", "embed"), jnp.float32, self.param_dtype, name="linear_1")(f)
        temb = dense(self.dim, ("embed", "embed_out"), jnp.float32, self.param_dtype, name="linear_2")(nn.silu(h))
        mod = dense(self.num_mod * self.dim, ("embed", "mlp"), jnp.float32, self.param_dtype, name="time_proj")(nn.silu(temb))
        return temb, mod.reshape(mod.shape[:-1] + (self.num_mod, self.dim))


class ModulationTable(nn.Module):
    """A block's learned ``[K, D]`` offset added to the shared modulation (Wan's scale_shift_table)."""

    num: int
    dim: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, mod):
        init = lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / math.sqrt(self.dim)
        table = self.param(
            "scale_shift_table", nn.with_logical_partitioning(init, ("mod", "embed")), (self.num, self.dim), self.param_dtype
        )
        return [m[..., 0, :] for m in jnp.split(mod.astype(jnp.float32) + table, self.num, axis=-2)]


class MLP(nn.Module):
    """Linear(D, F) -> GELU(tanh) -> Linear(F, D)."""

    dim: int
    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = dense(self.hidden, ("embed", "mlp"), self.dtype, self.param_dtype, name="up")(x.astype(self.dtype))
        h = nn.with_logical_constraint(nn.gelu(h, approximate=True), ("batch", "length", "mlp"))
        return dense(self.dim, ("mlp", "embed"), self.dtype, self.param_dtype, name="down")(h)


class TokenEmbedding(nn.Module):
    """Patchified tokens ``[B, S, C*prod(patch)]`` -> ``[B, S, D]``: a Conv with kernel = stride =
    patch is exactly this Dense on patchified tokens (weight ``[D, C, *patch]`` flattened)."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        return dense(self.dim, ("channels", "embed"), self.dtype, self.param_dtype, name="proj")(tokens.astype(self.dtype))


class ConditionEmbedding(nn.Module):
    """A condition sequence ``[B, L, C_cond]`` -> ``[B, L, D]`` (Wan's text_embedder:
    Linear -> GELU(tanh) -> Linear)."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c):
        h = dense(self.dim, ("cond", "embed"), self.dtype, self.param_dtype, name="linear_1")(c.astype(self.dtype))
        return dense(self.dim, ("embed", "embed_out"), self.dtype, self.param_dtype, name="linear_2")(
            nn.gelu(h, approximate=True)
        )


IMAGE_EMBEDDING_EPS = 1e-5  # Wan's image_embedder uses FP32LayerNorm's default eps, not the model's eps


class ImageEmbedding(nn.Module):
    """Wan I2V's image_embedder for CLIP vision features ``[B, L, C_img]`` -> ``[B, L, D]``:
    LayerNorm -> Linear -> GELU (erf) -> Linear -> LayerNorm, both norms affine in f32 (eps 1e-5)."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c):
        h = LayerNorm(IMAGE_EMBEDDING_EPS, affine=True, param_dtype=self.param_dtype, name="norm1")(c)
        h = dense(c.shape[-1], ("cond", "mlp"), self.dtype, self.param_dtype, name="linear_1")(h.astype(self.dtype))
        h = dense(self.dim, ("mlp", "embed"), self.dtype, self.param_dtype, name="linear_2")(nn.gelu(h, approximate=False))
        return LayerNorm(IMAGE_EMBEDDING_EPS, affine=True, param_dtype=self.param_dtype, name="norm2")(h).astype(self.dtype)


class OutputHead(nn.Module):
    """Final adaLN (shift/scale from ``temb`` + a learned table) and projection back to patch
    values ``[B, S, C*prod(patch)]`` (unpatchify with the stream's :class:`StreamSpec`)."""

    dim: int
    out_dim: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        shift, scale = ModulationTable(2, self.dim, self.param_dtype, name="modulation")(temb[..., None, :])
        y = modulate(LayerNorm(self.eps)(x), shift, scale)
        return dense(self.out_dim, ("embed", "channels"), self.dtype, self.param_dtype, name="proj")(y.astype(self.dtype))
