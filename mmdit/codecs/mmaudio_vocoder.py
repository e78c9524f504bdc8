"""MMAudio's BigVGAN vocoder in Flax linen (diffusers ``MMAudioVocoder``): log-mel ``[B, N, M]`` -> waveform ``[B, N * hop]``.

BigVGAN (Lee et al. 2023) with anti-aliased multi-periodicity (AMP) blocks:

* ``conv_pre``: conv k=7 (pad 3, bias), ``num_mels -> upsample_initial_channel``;
* per stage ``s``: a transposed conv (kernel ``k_s``, stride ``r_s``, padding ``(k_s - r_s) // 2``, bias) halving the
  width, then the mean of ``len(resblock_kernel_sizes)`` AMP blocks;
* AMP block (kernel ``k``, dilations ``d_i``): ``x += conv2_i(act(conv1_i(act(x))))`` per dilation, ``conv1_i`` dilated
  by ``d_i`` ("same" padding ``d_i (k - 1) / 2``), ``conv2_i`` undilated, all with bias;
* activation (``act``): anti-aliased SnakeBeta -- 2x upsample (replicate-pad 5, zero-stuffed 12-tap Kaiser-sinc
  low-pass, cut-off 0.25 of the 2x rate, half-width 0.3, gain 2), ``x + sin^2(e^alpha x) / (e^beta + 1e-9)``
  (per-channel log-scale ``alpha``, ``beta``), 2x downsample (replicate-pad 5 | 6, the same low-pass, stride 2);
* ``activation_post``, ``conv_post`` (k=7, one output channel; no bias in diffusers / MMAudio 44.1 kHz, with bias in
  the 16 kHz BigVGAN), then ``clip(-1, 1)`` (diffusers, 44.1 kHz) or ``tanh`` (the 16 kHz BigVGAN):
  ``final_bias`` / ``final_activation`` select the variant.

Layout ``[B, L, C]``; the reference is ``[B, C, L]``. Upsampling factor ``hop = prod(upsample_rates)``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SNAKE_EPS = 1e-9  # in 1 / (e^beta + eps)
AA_RATIO = 2  # anti-aliasing over-sampling factor of every activation
AA_TAPS = 12  # low-pass filter length


def kaiser_sinc_lowpass(cutoff: float, half_width: float, kernel_size: int) -> np.ndarray:
    """Kaiser-windowed sinc low-pass ``float32 [kernel_size]``, unit DC gain (cut-off, half-width in cycles/sample).

    The Kaiser ``beta`` follows Kaiser's formula for the attenuation ``2.285 (n/2 - 1) pi 4 hw + 7.95`` dB; an even
    length centres the taps on half-samples (``t = -n/2 + 0.5 .. n/2 - 0.5``).
    """
    half = kernel_size // 2
    atten = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95
    if atten > 50.0:
        beta = 0.1102 * (atten - 8.7)
    elif atten >= 21.0:
        beta = 0.5842 * (atten - 21.0) ** 0.4 + 0.07886 * (atten - 21.0)
    else:
        beta = 0.0
    window = np.kaiser(kernel_size, beta)
    t = np.arange(-half, half) + 0.5 if kernel_size % 2 == 0 else np.arange(kernel_size) - half
    taps = 2 * cutoff * window * np.sinc(2 * cutoff * t)
    return (taps / taps.sum()).astype(np.float32)


def _depthwise(x, taps: np.ndarray, *, stride: int = 1, lhs_dilation: int = 1, padding=(0, 0)):
    """Same filter on every channel of ``x [B, L, C]`` (cross-correlation)."""
    c = x.shape[-1]
    w = jnp.broadcast_to(jnp.asarray(taps, x.dtype)[:, None, None], (len(taps), 1, c))
    return jax.lax.conv_general_dilated(
        x,
        w,
        (stride,),
        [padding],
        lhs_dilation=(lhs_dilation,),
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST,
    )


def aa_upsample(x, ratio: int = AA_RATIO, taps: int = AA_TAPS):
    """Anti-aliased ``ratio``x upsample ``[B, L, C] -> [B, ratio L, C]`` (replicate edges, polyphase low-pass, gain ``ratio``)."""
    filt = kaiser_sinc_lowpass(0.5 / ratio, 0.6 / ratio, taps)
    pad = taps // ratio - 1
    crop_l = pad * ratio + (taps - ratio) // 2
    crop_r = pad * ratio + (taps - ratio + 1) // 2
    x = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)), mode="edge")
    # transposed conv (stride ratio, no padding) == zero-stuffing then a full correlation with the flipped filter
    y = ratio * _depthwise(x, filt[::-1].copy(), lhs_dilation=ratio, padding=(taps - 1, taps - 1))
    return y[:, crop_l : y.shape[1] - crop_r]


def aa_downsample(x, ratio: int = AA_RATIO, taps: int = AA_TAPS):
    """Anti-aliased ``ratio``x downsample ``[B, L, C] -> [B, L // ratio, C]`` (replicate edges, low-pass, stride)."""
    filt = kaiser_sinc_lowpass(0.5 / ratio, 0.6 / ratio, taps)
    left, right = taps // 2 - int(taps % 2 == 0), taps // 2
    x = jnp.pad(x, ((0, 0), (left, right), (0, 0)), mode="edge")
    return _depthwise(x, filt, stride=ratio)


class AntiAliasedSnakeBeta(nn.Module):
    """2x up, SnakeBeta ``x + sin^2(e^alpha x) / (e^beta + 1e-9)``, 2x down: ``[B, L, C] -> [B, L, C]``."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        alpha = self.param("alpha", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)), (c,), jnp.float32)
        beta = self.param("beta", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)), (c,), jnp.float32)
        y = aa_upsample(x)
        a, b = jnp.exp(alpha).astype(x.dtype), jnp.exp(beta).astype(x.dtype)
        y = y + (1.0 / (b + SNAKE_EPS)) * jnp.sin(y * a) ** 2
        return aa_downsample(y)


class Conv(nn.Module):
    """1-D conv ``[B, L, in] -> [B, L', out]`` with explicit padding and dilation (``kernel [k, in, out]``, optional bias)."""

    features: int
    kernel_size: int
    dilation: int = 1
    padding: int = 0
    use_bias: bool = True
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("conv_width", "conv_in", "conv_out")),
            (self.kernel_size, x.shape[-1], self.features),
            jnp.float32,
        )
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            (1,),
            [(self.padding, self.padding)],
            rhs_dilation=(self.dilation,),
            dimension_numbers=("NWC", "WIO", "NWC"),
            precision=self.precision,
        )
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)), (self.features,))
            y = y + bias.astype(self.dtype)
        return y


class ConvTranspose(nn.Module):
    """Transposed 1-D conv as PyTorch's ``ConvTranspose1d(stride, padding)``: ``[B, L, in] -> [B, (L-1) s - 2p + k, out]``.

    ``kernel [k, in, out]`` is PyTorch's ``weight [in, out, k]`` transposed (not flipped); the flip happens here.
    """

    features: int
    kernel_size: int
    stride: int
    padding: int
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("conv_width", "conv_in", "conv_out")),
            (k, x.shape[-1], self.features),
            jnp.float32,
        )
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)), (self.features,))
        pad = k - 1 - self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel[::-1].astype(self.dtype),
            (1,),
            [(pad, pad)],
            lhs_dilation=(self.stride,),
            dimension_numbers=("NWC", "WIO", "NWC"),
            precision=self.precision,
        )
        return y + bias.astype(self.dtype)


class AMPBlock(nn.Module):
    """Anti-aliased multi-periodicity residual block (see the module docstring)."""

    kernel_size: int
    dilations: Sequence[int]
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c, k = x.shape[-1], self.kernel_size
        for i, d in enumerate(self.dilations):
            h = AntiAliasedSnakeBeta(name=f"act_{2 * i}")(x)
            h = Conv(c, k, d, d * (k - 1) // 2, dtype=self.dtype, precision=self.precision, name=f"convs1_{i}")(h)
            h = AntiAliasedSnakeBeta(name=f"act_{2 * i + 1}")(h)
            h = Conv(c, k, 1, (k - 1) // 2, dtype=self.dtype, precision=self.precision, name=f"convs2_{i}")(h)
            x = x + h
        return x


class MMAudioVocoder(nn.Module):
    """BigVGAN: log-mel ``[B, N, num_mels]`` -> waveform ``float32 [B, N * prod(upsample_rates)]`` in [-1, 1].

    Defaults are MMAudio's 16 kHz BigVGAN shape (80 mels, 256x) with diffusers' output head (no bias, clip);
    diffusers' own defaults are the 44.1 kHz BigVGAN-v2 (128 mels, rates 8,4,2,2,2,2).
    """

    num_mels: int = 80
    upsample_initial_channel: int = 1536
    upsample_rates: Sequence[int] = (4, 4, 2, 2, 2, 2)
    upsample_kernel_sizes: Sequence[int] = (8, 8, 4, 4, 4, 4)
    resblock_kernel_sizes: Sequence[int] = (3, 7, 11)
    resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    final_bias: bool = False
    final_activation: str = "clip"  # "clip" (diffusers, 44.1 kHz) | "tanh" (16 kHz BigVGAN)
    dtype: Any = jnp.float32
    precision: Any = None

    @property
    def hop_length(self) -> int:
        return math.prod(self.upsample_rates)

    @nn.compact
    def __call__(self, mel):
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError("vocoder: upsample_rates and upsample_kernel_sizes must have the same length")
        if self.final_activation not in ("clip", "tanh"):
            raise ValueError(f"vocoder: final_activation={self.final_activation!r}; use 'clip' or 'tanh'")
        d, p = self.dtype, self.precision
        h = Conv(self.upsample_initial_channel, 7, 1, 3, dtype=d, precision=p, name="conv_pre")(mel)
        c = self.upsample_initial_channel
        nk = len(self.resblock_kernel_sizes)
        for s, (rate, k) in enumerate(zip(self.upsample_rates, self.upsample_kernel_sizes)):
            c //= 2
            h = ConvTranspose(c, k, rate, (k - rate) // 2, dtype=d, precision=p, name=f"ups_{s}")(h)
            total = 0.0
            for j, (bk, dil) in enumerate(zip(self.resblock_kernel_sizes, self.resblock_dilation_sizes)):
                total = total + AMPBlock(bk, tuple(dil), dtype=d, precision=p, name=f"resblocks_{s * nk + j}")(h)
            h = total / nk
        h = AntiAliasedSnakeBeta(name="activation_post")(h)
        h = Conv(1, 7, 1, 3, use_bias=self.final_bias, dtype=d, precision=p, name="conv_post")(h)
        h = h[..., 0].astype(jnp.float32)
        return jnp.tanh(h) if self.final_activation == "tanh" else jnp.clip(h, -1.0, 1.0)


def vocoder_from_target(target: dict, dtype=jnp.float32, precision=None) -> MMAudioVocoder:
    """Our vocoder from a converted checkpoint's ``target`` (``mmdit.convert.mmaudio_vocoder.target``)."""
    return MMAudioVocoder(
        num_mels=int(target["num_mels"]),
        upsample_initial_channel=int(target["upsample_initial_channel"]),
        upsample_rates=tuple(int(r) for r in target["upsample_rates"]),
        upsample_kernel_sizes=tuple(int(k) for k in target["upsample_kernel_sizes"]),
        resblock_kernel_sizes=tuple(int(k) for k in target["resblock_kernel_sizes"]),
        resblock_dilation_sizes=tuple(tuple(int(d) for d in ds) for ds in target["resblock_dilation_sizes"]),
        final_bias=bool(target.get("final_bias", False)),
        final_activation=str(target.get("final_activation", "clip")),
        dtype=dtype,
        precision=precision,
    )
