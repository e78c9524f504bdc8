"""The layers of the Wan video VAE (2.1 and 2.2), channels-last, with an explicit causal cache.

Every array here is ``[B, T, H, W, C]`` (batch, frames, height, width, channels). Time is **causal**:
an output frame depends only on input frames at or before it. A video is processed in temporal chunks
and whatever a layer needs from earlier chunks lives in the flax variable collection ``"cache"``,
which the caller passes in and receives back (``apply(..., mutable=["cache"])``), so a chunk step is a
pure function. The cache of a fresh video is all zeros -- exactly the zero padding a one-shot causal
convolution would see -- and ``first=True`` marks the chunk that starts the video (it holds video frame
0, which Wan treats specially in the temporal resamplers).

* :class:`CausalConv3d` -- a 3-D convolution zero-padded ``(k-1)//2`` on each side in space and
  ``k_t - 1`` frames on the past side only in time; with ``k_t > 1`` it keeps the last ``k_t - 1``
  input frames in ``cache/frames`` and prepends them to the next chunk (Wan's ``CACHE_T = 2`` for its
  3-frame kernels), so chunked and one-shot outputs agree exactly.
* :class:`RMSNorm` -- ``x / max(||x||_2, 1e-12) * sqrt(C) * gamma`` over channels (Wan's ``RMS_norm``:
  an L2 normalisation rescaled, no mean subtraction, no bias).
* :class:`ResidualBlock` -- ``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``.
* :class:`AttentionBlock` -- single-head self-attention over the ``H*W`` positions of each frame.
* :class:`Resample` -- spatial 2x up (nearest + 3x3 conv) / down (pad right+bottom, 3x3 stride 2),
  optionally with a temporal 2x stage: up doubles frames with a causal ``(3,1,1)`` conv to ``2C``
  channels split into two interleaved phases; down halves them with a ``(3,1,1)`` stride-2 conv over
  ``[previous frame, chunk]``. Frame 0 of a video passes both temporal stages unchanged (Wan's 1 + 4k
  layout: latent frame 0 is one video frame).
* :class:`AvgDown3D` / :class:`DupUp3D` -- Wan 2.2's parameter-free shortcuts around its residual
  down/up blocks (space/time to channels and group-average; channels repeated back to space/time).
* :func:`patchify` / :func:`unpatchify` -- Wan 2.2's 2x2 pixel patches into channels.

Parameter names and layouts follow diffusers' ``AutoencoderKLWan`` module names (``conv1``,
``time_conv``, ``resample_1``, ...; kernels ``[kt, kh, kw, in, out]``) so conversion is a rename and a
transpose (:mod:`mmdit.convert.wan_vae`). Params are plain (not logically partitioned): the VAE is a
frozen codec run replicated outside the train step.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

EPS = 1e-12  # F.normalize's floor on the channel L2 norm


def silu(x):
    return x * jax.nn.sigmoid(x)


def _conv(x, kernel, bias, stride, padding):
    """``[B, T, H, W, Ci]`` x ``[kt, kh, kw, Ci, Co]`` -> ``[B, T', H', W', Co]`` (explicit padding)."""
    y = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), window_strides=stride, padding=padding, dimension_numbers=("NTHWC", "THWIO", "NTHWC")
    )
    return y + bias.astype(x.dtype)


class CausalConv3d(nn.Module):
    """Causal 3-D conv: ``[B, T, H, W, Ci] -> [B, T, H', W', features]`` (stride 1 in time).

    Space: zero padding ``padding`` on both sides (``stride`` applies to space only). Time: kernel
    ``kernel[0]``, the ``kernel[0] - 1`` frames before the chunk come from ``cache/frames`` (zeros at the
    start of a video) and the chunk's own last ``kernel[0] - 1`` frames replace them.
    """

    features: int
    kernel: Sequence[int] = (3, 3, 3)
    padding: Sequence[int] = (1, 1)  # spatial zero padding (h, w) on each side
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kt, kh, kw = self.kernel
        ci = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kt, kh, kw, ci, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x = x.astype(self.dtype)
        if kt > 1:
            b, _, h, w, _ = x.shape
            cache = self.variable("cache", "frames", jnp.zeros, (b, kt - 1, h, w, ci), self.dtype)
            x = jnp.concatenate([cache.value.astype(self.dtype), x], axis=1)
            if self.is_mutable_collection("cache"):
                cache.value = x[:, -(kt - 1) :]
        ph, pw = self.padding
        return _conv(x, kernel, bias, (1, 1, 1), ((0, 0), (ph, ph), (pw, pw)))


class Conv2d(nn.Module):
    """Per-frame 2-D conv: ``[B, T, H, W, Ci] -> [B, T, H', W', features]`` (kernel ``[kh, kw, Ci, Co]``)."""

    features: int
    kernel: Sequence[int] = (3, 3)
    stride: Sequence[int] = (1, 1)
    padding: Sequence[tuple[int, int]] = ((1, 1), (1, 1))
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel
        ci = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, ci, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return _conv(x.astype(self.dtype), kernel[None], bias, (1, *self.stride), ((0, 0), *self.padding))


class RMSNorm(nn.Module):
    """``x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma``; computed in float32."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.ones_init(), (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        return (xf / jnp.maximum(norm, EPS) * (c**0.5) * gamma).astype(x.dtype)


class ResidualBlock(nn.Module):
    """``[B, T, H, W, Ci] -> [B, T, H, W, out_dim]``: two causal 3x3x3 convs, RMS norm + SiLU before each."""

    out_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if x.shape[-1] != self.out_dim:
            h = CausalConv3d(self.out_dim, (1, 1, 1), (0, 0), self.dtype, name="conv_shortcut")(x)
        else:
            h = x
        x = CausalConv3d(self.out_dim, dtype=self.dtype, name="conv1")(silu(RMSNorm(name="norm1")(x)))
        x = CausalConv3d(self.out_dim, dtype=self.dtype, name="conv2")(silu(RMSNorm(name="norm2")(x)))
        return x + h


class AttentionBlock(nn.Module):
    """Single-head attention over each frame's ``H*W`` positions (scale ``1/sqrt(C)``), residual."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t, h, w, c = x.shape
        y = RMSNorm(name="norm")(x)
        qkv = Conv2d(3 * c, (1, 1), padding=((0, 0), (0, 0)), dtype=self.dtype, name="to_qkv")(y)
        q, k, v = jnp.split(qkv.reshape(b * t, h * w, 1, 3 * c), 3, axis=-1)  # [BT, HW, 1 head, C]
        o = jax.nn.dot_product_attention(q, k, v)  # scale 1/sqrt(C)
        o = Conv2d(c, (1, 1), padding=((0, 0), (0, 0)), dtype=self.dtype, name="proj")(o.reshape(b, t, h, w, c))
        return o + x


def _upsample_nearest2x(x):
    """``[B, T, H, W, C] -> [B, T, 2H, 2W, C]`` (nearest; equals torch's nearest-exact for factor 2)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)


class Resample(nn.Module):
    """Wan's resampler. ``mode``: ``upsample2d`` / ``upsample3d`` (``[B, T, H, W, C] -> [B, T', 2H, 2W,
    out_dim]``, ``T' = 2T`` for 3d, ``2T - 1`` on the first chunk) or ``downsample2d`` / ``downsample3d``
    (``-> [B, T', H/2, W/2, C]``, ``T' = T/2`` for 3d, ``1 + (T-1)/2`` on the first chunk).

    ``upsample3d``: a causal ``(3,1,1)`` conv over the frames *after* video frame 0 (``cache/frames``:
    their last two, zeros at the start) gives ``2C`` channels = two phases, interleaved into ``2T``
    frames; frame 0 is passed through once. ``downsample3d``: a ``(3,1,1)`` stride-2 conv without
    padding over ``[last frame of the previous chunk, chunk]`` (``cache/last``); on the first chunk over
    the chunk itself, with frame 0 passed through in front.
    """

    mode: str
    out_dim: int | None = None  # upsample output channels (default C // 2, Wan 2.1's choice)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, first: bool):
        b, t, h, w, c = x.shape
        if self.mode == "upsample3d":
            cache = self.variable("cache", "frames", jnp.zeros, (b, 2, h, w, c), self.dtype)
            rest = (x[:, 1:] if first else x).astype(self.dtype)
            seq = jnp.concatenate([cache.value.astype(self.dtype), rest], axis=1)
            y = TimeConv(2 * c, 1, self.dtype, name="time_conv")(seq)  # [B, T_rest, H, W, 2C]
            n = y.shape[1]
            y = y.reshape(b, n, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * n, h, w, c)
            x = jnp.concatenate([x[:, :1].astype(y.dtype), y], axis=1) if first else y
            if self.is_mutable_collection("cache"):
                cache.value = seq[:, -2:]
        if self.mode in ("upsample2d", "upsample3d"):
            out_dim = self.out_dim or c // 2
            return Conv2d(out_dim, dtype=self.dtype, name="resample_1")(_upsample_nearest2x(x))
        if self.mode not in ("downsample2d", "downsample3d"):
            raise ValueError(f"Resample mode {self.mode!r}: expected upsample2d/3d or downsample2d/3d")
        x = Conv2d(c, stride=(2, 2), padding=((0, 1), (0, 1)), dtype=self.dtype, name="resample_1")(x)
        if self.mode == "downsample3d":
            h2, w2 = x.shape[2:4]
            cache = self.variable("cache", "last", jnp.zeros, (b, 1, h2, w2, c), self.dtype)
            seq = x if first else jnp.concatenate([cache.value.astype(x.dtype), x], axis=1)
            y = TimeConv(c, 2, self.dtype, name="time_conv")(seq)
            if self.is_mutable_collection("cache"):
                cache.value = x[:, -1:]
            x = jnp.concatenate([x[:, :1], y], axis=1) if first else y
        return x


class TimeConv(nn.Module):
    """``(3,1,1)`` conv over time without padding, time stride ``stride``:
    ``[B, T, H, W, Ci] -> [B, (T-3)//stride + 1, H, W, features]`` (no frames when ``T < 3``)."""

    features: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        ci = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 1, 1, ci, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        if x.shape[1] < 3:
            return jnp.zeros((x.shape[0], 0, *x.shape[2:4], self.features), self.dtype)
        return _conv(x.astype(self.dtype), kernel, bias, (self.stride, 1, 1), ((0, 0), (0, 0), (0, 0)))


def avg_down(x, out_dim: int, factor_t: int, factor_s: int):
    """Wan 2.2's ``AvgDown3D``: ``[B, T, H, W, C] -> [B, T/ft, H/fs, W/fs, out_dim]``.

    The chunk is zero-padded in front to a multiple of ``ft`` frames; each ``ft x fs x fs`` cell's values
    are laid out channel-major (``c, t, h, w``) and consecutive groups of ``C*ft*fs*fs / out_dim`` are
    averaged into one output channel.
    """
    b, t, h, w, c = x.shape
    pad = (factor_t - t % factor_t) % factor_t
    if pad:
        x = jnp.concatenate([jnp.zeros((b, pad, h, w, c), x.dtype), x], axis=1)
        t += pad
    fs, ft = factor_s, factor_t
    x = x.reshape(b, t // ft, ft, h // fs, fs, w // fs, fs, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
    x = x.reshape(b, t // ft, h // fs, w // fs, out_dim, c * ft * fs * fs // out_dim)
    return x.mean(axis=-1)


def dup_up(x, out_dim: int, factor_t: int, factor_s: int, first: bool):
    """Wan 2.2's ``DupUp3D``: ``[B, T, H, W, C] -> [B, T*ft, H*fs, W*fs, out_dim]`` (first chunk: the
    first ``ft - 1`` output frames dropped, so frame 0 stays one frame).

    Each input channel is repeated ``out_dim*ft*fs*fs / C`` times; the result, read channel-major as
    ``(out, t, h, w)``, is moved into time and space.
    """
    b, t, h, w, c = x.shape
    ft, fs = factor_t, factor_s
    x = jnp.repeat(x, out_dim * ft * fs * fs // c, axis=-1)
    x = x.reshape(b, t, h, w, out_dim, ft, fs, fs).transpose(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, t * ft, h * fs, w * fs, out_dim)
    return x[:, ft - 1 :] if first else x


def patchify(x, p: int):
    """``[B, T, H, W, C] -> [B, T, H/p, W/p, C*p*p]``, channel ``c*p*p + pw*p + ph`` (diffusers' order)."""
    if p == 1:
        return x
    b, t, h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"frame size {h}x{w} is not divisible by the VAE's patch_size={p}")
    x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(b, t, h // p, w // p, c * p * p)


def unpatchify(x, p: int):
    """Inverse of :func:`patchify`: ``[B, T, h, w, C*p*p] -> [B, T, h*p, w*p, C]``."""
    if p == 1:
        return x
    b, t, h, w, cp = x.shape
    c = cp // (p * p)
    x = x.reshape(b, t, h, w, c, p, p).transpose(0, 1, 2, 6, 3, 5, 4)  # [b, t, h, ph, w, pw, c]
    return x.reshape(b, t, h * p, w * p, c)
