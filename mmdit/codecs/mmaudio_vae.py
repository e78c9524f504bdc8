"""MMAudio's mel-spectrogram VAE in Flax linen (the network of diffusers ``MMAudioVAE``).

A magnitude-preserving 1-D autoencoder over standardised log-mel frames (Karras et al. 2023, "EDM2"): no
normalisation layers; every conv's weight is already unit-norm per output channel and scaled by
``1 / sqrt(fan_in)`` in the released checkpoints, activations are ``silu(x) / 0.596``, residual sums are
``mp_sum(a, b, t) = lerp(a, b, t) / sqrt((1 - t)^2 + t^2)`` and each residual block first rescales its input
to unit RMS over channels (``x / (1e-4 + |x| / sqrt(C))``). Activations after every block are clipped to
``[-256, 256]``.

Layout ``[B, L, C]`` (frames on axis 1) throughout; the reference is ``[B, C, L]``.

* :class:`MMAudioEncoder`: log-mel ``[B, N, M]`` (already standardised by ``data_mean/data_std``) ->
  moments ``[B, N // 2, 2 * latent_channels]`` (mean first, then log-variance). ``conv_in`` (k=3), per level
  ``layers_per_block`` residual blocks, a 2x average-pool downsample after level 0 only, a middle block
  (resnet, single-head attention over the whole clip, resnet), ``conv_out`` on ``mp_silu`` with gain
  ``1 + learnable_gain``.
* :class:`MMAudioDecoder`: latents ``[B, L, latent_channels]`` -> mel ``[B, 2L, M]`` (standardised); the
  mirror image with ``layers_per_block + 1`` blocks per level and a nearest 2x upsample after level 1.
* :class:`MMAudioAutoencoder`: the pair with the per-bin statistics ``data_mean``, ``data_std``
  ``float32 [M]`` (stored as params, frozen): ``encode(mel) = encoder((mel - mean) / std)``,
  ``decode(z) = decoder(z) * std + mean``.

Every conv is a cross-correlation with "same" zero padding ``k // 2`` and no bias (``kernel [k, in, out]``).
Attention is global over the clip, so the decoder is not causal: chunked decoding is approximate (see
:mod:`mmdit.codecs.mmaudio`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATION_CLIP = 256.0  # activations after each block are clipped to +-this
NORMALIZE_EPS = 1e-4  # eps of the magnitude-preserving normalisation
SILU_RMS = 0.596  # RMS of silu(z), z ~ N(0, 1): mp_silu = silu / 0.596
RESIDUAL_T = 0.3  # mp_sum interpolation weight of the residual branch


def mp_silu(x):
    """SiLU rescaled to keep unit-RMS inputs unit-RMS."""
    return jax.nn.silu(x) / SILU_RMS


def mp_sum(a, b, t: float = RESIDUAL_T):
    """``lerp(a, b, t) / sqrt((1 - t)^2 + t^2)``: a unit-variance-preserving blend of ``a`` and ``b``."""
    return (a + t * (b - a)) / math.sqrt((1.0 - t) ** 2 + t**2)


def mp_normalize(x, axis: int | tuple[int, ...] = -1, eps: float = NORMALIZE_EPS):
    """``x / (eps + |x|_axis * sqrt(n_norm / n_x))``: unit RMS over ``axis`` (L2 norm computed in float32)."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=axes, keepdims=True))
    count = math.prod(x.shape[a] for a in axes)
    return x / (eps + norm / math.sqrt(count)).astype(x.dtype)


class MPConv(nn.Module):
    """Bias-free 1-D conv ``[B, L, in] -> [B, L, out]``, "same" zero padding ``k // 2``, optional gain on the weight."""

    features: int
    kernel_size: int
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, gain=1.0):
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("conv_width", "conv_in", "conv_out")),
            (self.kernel_size, x.shape[-1], self.features),
            jnp.float32,
        )
        w = (kernel * gain).astype(self.dtype)
        pad = self.kernel_size // 2
        return jax.lax.conv_general_dilated(
            x.astype(self.dtype), w, (1,), [(pad, pad)], dimension_numbers=("NWC", "WIO", "NWC"), precision=self.precision
        )


class MPResnetBlock(nn.Module):
    """``mp_sum(shortcut(x_n), conv2(mp_silu(conv1(mp_silu(x_n)))), 0.3)`` with ``x_n`` the channel-normalised input;
    ``nin_shortcut`` (1x1) only when the width changes."""

    features: int
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, name: MPConv(f, k, self.dtype, self.precision, name=name)  # noqa: E731
        x = mp_normalize(x, axis=-1)
        h = conv(self.features, 3, "conv1")(mp_silu(x))
        h = conv(self.features, 3, "conv2")(mp_silu(h))
        if x.shape[-1] != self.features:
            x = conv(self.features, 1, "nin_shortcut")(x)
        return mp_sum(x, h)


class MPAttention(nn.Module):
    """Self-attention over the whole clip: ``mp_sum(x, proj_out(attn(qkv(x))), 0.3)``.

    ``qkv`` (1x1, ``3C`` outputs) is laid out as the reference's ``reshape(B, heads, C/heads, 3, L)``: output
    channel ``(h * Dh + d) * 3 + j`` is component ``j`` (q, k, v) of head ``h``, dimension ``d``. q, k, v are each
    normalised to unit RMS over ``d``; softmax scale ``1 / sqrt(Dh)``.
    """

    num_heads: int = 1
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        b, n, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"MPAttention: {c} channels do not split into num_heads={self.num_heads}")
        dh = c // self.num_heads
        qkv = MPConv(3 * c, 1, self.dtype, self.precision, name="qkv")(x)
        qkv = mp_normalize(qkv.reshape(b, n, self.num_heads, dh, 3), axis=3)
        q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]  # [B, L, H, Dh]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision).astype(jnp.float32) / math.sqrt(dh)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=self.precision).reshape(b, n, c)
        return mp_sum(x, MPConv(c, 1, self.dtype, self.precision, name="proj_out")(out))


class MPDownsample(nn.Module):
    """``conv2(avgpool2(conv1(x)))`` (1x1 convs): ``[B, L, C] -> [B, L // 2, C]`` (an odd last frame is dropped)."""

    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = MPConv(c, 1, self.dtype, self.precision, name="conv1")(x)
        n = x.shape[1] // 2
        x = x[:, : 2 * n].reshape(x.shape[0], n, 2, c).mean(axis=2)
        return MPConv(c, 1, self.dtype, self.precision, name="conv2")(x)


class MPUpsample(nn.Module):
    """Nearest 2x repeat then a k=3 conv: ``[B, L, C] -> [B, 2L, C]``."""

    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        return MPConv(x.shape[-1], 3, self.dtype, self.precision, name="conv")(jnp.repeat(x, 2, axis=1))


def _clip(x):
    return jnp.clip(x, -ACTIVATION_CLIP, ACTIVATION_CLIP)


class _Mid(nn.Module):
    """Middle stage: resnet, attention, resnet (output clipped)."""

    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = MPResnetBlock(c, self.dtype, self.precision, name="block_1")(x)
        x = MPAttention(1, self.dtype, self.precision, name="attn_1")(x)
        return _clip(MPResnetBlock(c, self.dtype, self.precision, name="block_2")(x))


def _gain(module: nn.Module):
    return 1.0 + module.param("learnable_gain", nn.with_logical_partitioning(nn.initializers.zeros, ()), (), jnp.float32)


class MMAudioEncoder(nn.Module):
    """Standardised log-mel ``[B, N, mel_bins]`` -> moments ``[B, N // 2, 2 * latent_channels]`` (mean, logvar)."""

    mel_bins: int
    latent_channels: int
    hidden_channels: int
    channel_multipliers: Sequence[int]
    layers_per_block: int
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, mel):
        d, p = self.dtype, self.precision
        h = MPConv(self.hidden_channels, 3, d, p, name="conv_in")(mel)
        for level, mult in enumerate(self.channel_multipliers):
            for i in range(self.layers_per_block):
                h = _clip(MPResnetBlock(self.hidden_channels * mult, d, p, name=f"down_{level}_block_{i}")(h))
            if level == 0:
                h = MPDownsample(d, p, name=f"down_{level}_downsample")(h)
        h = _Mid(d, p, name="mid")(h)
        return MPConv(2 * self.latent_channels, 3, d, p, name="conv_out")(mp_silu(h), gain=_gain(self))


class MMAudioDecoder(nn.Module):
    """Latents ``[B, L, latent_channels]`` -> standardised log-mel ``[B, 2L, mel_bins]``."""

    mel_bins: int
    latent_channels: int
    hidden_channels: int
    channel_multipliers: Sequence[int]
    layers_per_block: int
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, z):
        d, p = self.dtype, self.precision
        h = MPConv(self.hidden_channels * self.channel_multipliers[-1], 3, d, p, name="conv_in")(z)
        h = _Mid(d, p, name="mid")(h)
        for level in reversed(range(len(self.channel_multipliers))):
            for i in range(self.layers_per_block + 1):
                h = _clip(
                    MPResnetBlock(self.hidden_channels * self.channel_multipliers[level], d, p, name=f"up_{level}_block_{i}")(h)
                )
            if level == 1:
                h = MPUpsample(d, p, name=f"up_{level}_upsample")(h)
        return MPConv(self.mel_bins, 3, d, p, name="conv_out")(mp_silu(h), gain=_gain(self))


class MMAudioAutoencoder(nn.Module):
    """Encoder/decoder pair over log-mel frames standardised with the checkpoint's per-bin ``data_mean``/``data_std``.

    Methods (``apply(params, x, method=...)``): :meth:`encode` log-mel ``[B, N, M]`` -> moments
    ``[B, N // 2, 2 * latent_channels]``; :meth:`decode` latents ``[B, L, latent_channels]`` (unscaled: the
    VAE's own units) -> log-mel ``[B, 2L, M]``. ``__call__`` is encode -> posterior mean -> decode (for init).
    """

    mel_bins: int = 80
    latent_channels: int = 20
    hidden_channels: int = 384
    channel_multipliers: Sequence[int] = (1, 2, 4)
    layers_per_block: int = 2
    dtype: Any = jnp.float32
    precision: Any = None

    def setup(self):
        cfg = (self.mel_bins, self.latent_channels, self.hidden_channels, tuple(self.channel_multipliers), self.layers_per_block)
        self.data_mean = self.param("data_mean", nn.with_logical_partitioning(nn.initializers.zeros, ("mel",)), (self.mel_bins,))
        self.data_std = self.param("data_std", nn.with_logical_partitioning(nn.initializers.ones, ("mel",)), (self.mel_bins,))
        self.encoder = MMAudioEncoder(*cfg, dtype=self.dtype, precision=self.precision)
        self.decoder = MMAudioDecoder(*cfg, dtype=self.dtype, precision=self.precision)

    def encode(self, mel):
        moments = self.encoder((mel - self.data_mean) / self.data_std)
        return moments.astype(jnp.float32)

    def decode(self, z):
        return self.decoder(z).astype(jnp.float32) * self.data_std + self.data_mean

    def __call__(self, mel):
        return self.decode(self.encode(mel)[..., : self.latent_channels])


def autoencoder_from_target(target: dict, dtype=jnp.float32, precision=None) -> MMAudioAutoencoder:
    """Our autoencoder from a converted checkpoint's ``target`` (``mmdit.convert.mmaudio_vae.target``)."""
    return MMAudioAutoencoder(
        mel_bins=int(target["mel_bins"]),
        latent_channels=int(target["latent_channels"]),
        hidden_channels=int(target["hidden_channels"]),
        channel_multipliers=tuple(int(m) for m in target["channel_multipliers"]),
        layers_per_block=int(target["layers_per_block"]),
        dtype=dtype,
        precision=precision,
    )
