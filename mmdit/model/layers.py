"""Building blocks shared by every stream, in Wan 2.1/2.2's layer layout (adaLN modulation, RMS q/k norm,
FP32 LayerNorm). Weight-for-weight parity with diffusers' WanTransformer3DModel is proven by
tests/test_parity_wan_dit.py (converter: mmdit/convert/wan_dit.py).

Shapes: activations ``[B, S, D]``; per-token timestep embeddings ``[B, S, D]``; modulation
``[B, S, K, D]`` (K = 6 per block, 2 for the output head). Every param carries logical axis names.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


Dtype = jnp.dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _kernel_grad(x, kernel, out_shape):
    """Zeros ``out_shape``; its backward pass gives ``kernel`` the gradient of ``x @ kernel``."""
    return jnp.zeros(out_shape, jnp.result_type(x, kernel))


def _kernel_grad_fwd(x, kernel, out_shape):
    return _kernel_grad(x, kernel, out_shape), (x, kernel)


def _kernel_grad_bwd(out_shape, res, g):
    x, kernel = res
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(x2.shape[0], -1).astype(x.dtype)  # [N, prod(kernel.shape[1:])]
    grad = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())))
    return jnp.zeros_like(x), grad.reshape(kernel.shape).astype(kernel.dtype)


_kernel_grad.defvjp(_kernel_grad_fwd, _kernel_grad_bwd)


def dense_dot_general(x, kernel, dimension_numbers, precision=None, preferred_element_type=None):
    """``nn.Dense``'s product ``x [..., in] @ kernel [in, out...]`` (more than one output axis: the stacked
    kernels of :func:`stacked_dense`), the same values and gradients, with the kernel gradient computed as
    ``x^T g`` over the flattened leading axes (one ``[N, in]^T [N, out]`` matmul) instead of autodiff's
    ``(g^T x)^T`` over them, for which XLA CPU transposes activations
    inside their producers (strided writes; ~15% of a CPU train step). The product itself stays a plain
    ``dot_general``, so remat policies that save dots still see it; the kernel gradient enters through
    :func:`_kernel_grad`, whose output is exactly 0 (XLA drops the ``+ 0``)."""
    (lc, rc), (lb, rb) = dimension_numbers
    if tuple(lc) != (x.ndim - 1,) or tuple(rc) != (0,) or lb or rb:
        return jax.lax.dot_general(x, kernel, dimension_numbers, precision, preferred_element_type)
    y = jax.lax.dot_general(x, jax.lax.stop_gradient(kernel), dimension_numbers, precision, preferred_element_type)
    return y + _kernel_grad(x, kernel, y.shape).astype(y.dtype)


def stacked_dense(x, params, dtype):
    """Several Dense layers applied to one input as one product: ``x [..., in]`` and ``params``, n
    ``(kernel [in, out], bias [out])`` pairs -> ``[..., n, out]`` (same values as n separate layers).

    The kernels are stacked on a new axis rather than concatenated along ``out``, so a tensor-sharded
    ``out`` (logical ``heads``) stays sharded without communication. Forward, input gradient and
    kernel gradient (``x^T g``, as in :func:`dense_dot_general`) are each one matmul over ``n * out``
    columns instead of n narrow ones: on XLA CPU a 256-wide projection runs well below the matmul
    library's large-shape rate (``bench/cpu_step.py --dots``)."""
    kernel = jnp.stack([k for k, _ in params], axis=1).astype(dtype)  # [in, n, out]
    bias = jnp.stack([b for _, b in params]).astype(dtype)  # [n, out]
    return dense_dot_general(x.astype(dtype), kernel, (((x.ndim - 1,), (0,)), ((), ()))) + bias


def dense(features, names, dtype, param_dtype, use_bias=True, name=None, kernel_init=None):
    """``nn.Dense`` whose kernel has logical axis names ``names`` = (in, out); the bias gets (out,).
    Its product is :func:`dense_dot_general`."""
    kernel_init = kernel_init or nn.initializers.xavier_uniform()
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (names[1],)),
        dot_general=dense_dot_general,
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


SIGMA_PALETTE = 4  # distinct σ per sample the time embedding computes once each (training has 2: 0 and σ)
# Sequences shorter than this run the time embedding per token: the palette's selection and run-time ``cond``
# are ~50 small XLA kernels per stream, which cost more than the MLP on a few rows. Measured at the two sizes the
# demo has (a 7-token streaming chunk: 56 kernels fewer per stream, outputs bit-identical; 49 training tokens keep
# the palette); 17 = the palette's 4 values and their 4 slopes, twice over, not a measured crossover.
PALETTE_MIN_TOKENS = 17


def sigma_palette(sigma, size: int = SIGMA_PALETTE):
    """The distinct values of each sample's per-token σ ``[B, S]``, in order of first appearance.

    Returns ``(values [B, size], onehot f32 [B, S, size], fits bool[])``: ``onehot[b, s, k] = 1`` where
    token ``s`` of sample ``b`` holds ``values[b, k]``; ``fits`` is False when some sample has more than
    ``size`` distinct values (or a NaN), and then some tokens have no column. Unused columns repeat a
    value and select no token."""
    remaining = jnp.ones(sigma.shape, bool)
    values, hits = [], []
    for _ in range(size):
        first = jnp.argmax(remaining, axis=1)[:, None]  # first unmatched token (0 when none is left)
        v = jnp.take_along_axis(sigma, first, axis=1)
        hit = remaining & (sigma == v)
        values.append(v)
        hits.append(hit)
        remaining = remaining & ~hit
    onehot = jnp.stack(hits, axis=-1).astype(jnp.float32)
    return jnp.concatenate(values, axis=1), onehot, ~jnp.any(remaining)


class DenseParams(nn.Module):
    """The ``kernel [in, out]`` / ``bias [out]`` of an ``nn.Dense`` (same names, init and logical axes as
    :func:`dense`), returned as arrays so a pure function can apply them (inside ``lax.cond``/``jvp``)."""

    in_features: int
    features: int
    names: tuple
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self):
        kernel_init = nn.with_logical_partitioning(nn.initializers.xavier_uniform(), self.names)
        kernel = self.param("kernel", kernel_init, (self.in_features, self.features), self.param_dtype)
        bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.names[1],))
        bias = self.param("bias", bias_init, (self.features,), self.param_dtype)
        return kernel.astype(jnp.float32), bias.astype(jnp.float32)


def timestep_mlp(weights, sigma, freq_dim: int):
    """Wan's time embedding of ``sigma [...]`` -> ``(temb [..., D], mod [..., K*D])``, f32, row by row:
    sinusoidal(1000σ) -> Linear -> SiLU -> Linear = temb; SiLU -> Linear = mod. ``weights``: the
    ``(kernel, bias)`` pairs of linear_1, linear_2, time_proj."""
    (w1, b1), (w2, b2), (w3, b3) = weights
    h = sinusoidal_embedding(1000.0 * sigma, freq_dim) @ w1 + b1
    temb = nn.silu(h) @ w2 + b2
    return temb, nn.silu(temb) @ w3 + b3


def _timestep_mlp_by_palette(weights, sigma, values, onehot, freq_dim: int):
    """:func:`timestep_mlp` of ``sigma [B, S]`` computed once per distinct value of each sample
    (``values, onehot`` from :func:`sigma_palette`; every token must hold one of them) and gathered
    back to the tokens by a one-hot matmul (``1 * x + 0 * y`` is exactly ``x``).

    The values are exactly the per-token ones, and so is the derivative w.r.t. ``sigma``: a term
    ``f'(value) * (σ - stop_gradient(σ))``, exactly 0, hands every token its own ``f'(σ_token)``
    (without it only the first token of each value would get one)."""
    values = jax.lax.stop_gradient(values)
    f = lambda v: jnp.concatenate(timestep_mlp(weights, v, freq_dim), axis=-1)  # noqa: E731
    at_values, slope = jax.jvp(f, (values,), (jnp.ones_like(values),))  # [B, K, 7D] each
    zero = sigma - jax.lax.stop_gradient(sigma)
    select = jnp.concatenate([onehot, onehot * zero[..., None]], axis=-1)  # [B, S, 2K]
    out = jnp.einsum("bsk,bkn->bsn", select, jnp.concatenate([at_values, slope], axis=1))
    dim = weights[1][1].shape[0]
    return out[..., :dim], out[..., dim:]


class TimestepEmbedding(nn.Module):
    """Per-token σ -> (``temb [B, S, D]``, modulation ``[B, S, 6, D]``).

    Wan: sinusoidal(1000σ, 256) -> Linear -> SiLU -> Linear = temb; SiLU -> Linear(D, 6D) = the
    shared adaLN-Zero modulation that every block offsets by its own learned table.

    The MLP depends on σ alone, and a sample's tokens share few σ values (training: σ, and 0 on known
    tokens): when every sample has at most :data:`SIGMA_PALETTE` distinct values (checked at run
    time) it runs once per value and is gathered back to the tokens -- the same values and
    derivatives as running it per token, which it does otherwise."""

    dim: int
    freq_dim: int = 256
    num_mod: int = 6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sigma_tokens):
        pd = self.param_dtype
        weights = (
            DenseParams(self.freq_dim, self.dim, ("freq", "embed"), pd, name="linear_1")(),
            DenseParams(self.dim, self.dim, ("embed", "embed_out"), pd, name="linear_2")(),
            DenseParams(self.dim, self.num_mod * self.dim, ("embed", "mlp"), pd, name="time_proj")(),
        )
        sigma = jnp.asarray(sigma_tokens, jnp.float32)
        if sigma.ndim != 2 or sigma.shape[1] < PALETTE_MIN_TOKENS:  # per element
            temb, mod = timestep_mlp(weights, sigma, self.freq_dim)
        else:
            values, onehot, fits = sigma_palette(sigma)
            temb, mod = jax.lax.cond(
                fits,
                lambda w, s, v, o: _timestep_mlp_by_palette(w, s, v, o, self.freq_dim),
                lambda w, s, v, o: timestep_mlp(w, s, self.freq_dim),
                weights,
                sigma,
                values,
                onehot,
            )
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


class SilenceEmbedding(nn.Module):
    """TalkingMachines' speaking/silence mode: one learned vector ``[D]`` replaces a condition's embedded
    tokens where the subject is silent. ``tokens [B, L, D]``, ``speaking`` bool ``[B, L]`` -> ``[B, L, D]``
    (tokens where speaking, the embedding elsewhere)."""

    dim: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, speaking):
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",))
        emb = self.param("embedding", init, (self.dim,), self.param_dtype)
        return jnp.where(speaking[..., None], tokens, emb.astype(tokens.dtype))


def speaking_per_token(speaking_frames, token_times):
    """Per-frame speaking flags ``[B, F]`` (int or bool; frames of the time-reference stream) -> bool
    ``[B, L]`` for tokens at aligned times ``token_times [L]`` (reference latent frames): token ``j``
    takes the flag of frame ``floor(t_j)``, clamped to ``[0, F)``."""
    frames = jnp.asarray(speaking_frames)
    idx = jnp.clip(jnp.floor(jnp.asarray(token_times, jnp.float32) + 1e-4).astype(jnp.int32), 0, frames.shape[-1] - 1)
    return jnp.take(frames, idx, axis=-1) != 0


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
