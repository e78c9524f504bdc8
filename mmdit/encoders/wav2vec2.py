"""wav2vec 2.0 (transformers ``Wav2Vec2Model``) in Flax: 16 kHz waveform -> 50 Hz hidden states, and
resampling of those features to the rate a model's audio-feature condition runs at.

Architecture:

* **feature encoder** -- 1-D convolutions (no padding) over the raw wave, each followed by GELU:
  ``feat_extract_norm="group"`` (wav2vec2-base, -large-960h): the first conv is followed by a
  per-channel group norm over time (groups = channels), the others by nothing;
  ``feat_extract_norm="layer"`` (-large-lv60 and most fine-tuned large models): every conv is
  followed by a LayerNorm over channels (eps ``1e-5``). The base configuration (kernels 10,3,3,3,3,2,2,
  strides 5,2,2,2,2,2,2) maps 16 kHz to 49.9 frames per second (320 samples per frame, receptive
  field 400);
* **feature projection** -- LayerNorm (``layer_norm_eps``) -> Linear to ``hidden_size``;
* **encoder** -- padding frames zeroed; + a grouped positional convolution (kernel
  ``num_conv_pos_embeddings``, "same" padding, the last frame dropped for an even kernel, GELU;
  its weight norm is folded into one kernel at conversion); then either post-norm layers after a
  LayerNorm (``do_stable_layer_norm=False``: attention -> residual -> LN -> FFN -> residual -> LN) or
  pre-norm layers followed by a final LayerNorm (``do_stable_layer_norm=True``). Attention is
  multi-head with biases, ``1/sqrt(Dh)`` scaling, padding keys masked.

``Wav2Vec2(wave float [B, T], mask bool [B, T] | None) -> dict`` with ``hidden_states`` float32
``[num_layers + 1, B, L, C]`` in transformers' ``output_hidden_states`` convention (index 0: the
input of the first layer, index ``k``: the output of layer ``k``, *before* the stable variant's final
norm), ``last_hidden_state`` ``[B, L, C]`` (after it), ``extract_features`` ``[B, L, conv_dim[-1]]``
and ``mask`` bool ``[B, L]`` (valid frames). Layers are stacked with ``nn.scan`` (params ``layers/*``);
to take layer ``k`` without running the rest, build with ``num_layers=k`` and
:func:`mmdit.encoders.layers.truncate_layers` (the registry's :class:`AudioFeatureEncoder` does).

:func:`resample_features` (the 50 Hz -> condition-rate step) is linear interpolation at sample centres
(PyTorch ``F.interpolate(mode="linear", align_corners=False)``), the way talking-head systems built on
wav2vec2 features align them to video frames.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmdit.encoders.layers import Dtype, LayerNorm, activation, attention, dense

SAMPLE_RATE = 16000  # Hz: every published wav2vec2 checkpoint


def conv_output_length(length, kernels: Sequence[int], strides: Sequence[int]):
    """Frames the feature encoder makes of ``length`` samples (int or int array): ``(n - k) // s + 1`` per conv."""
    for k, s in zip(kernels, strides):
        length = (length - k) // s + 1
    return length


class Conv1d(nn.Module):
    """``[B, T, Cin] -> [B, T', Cout]`` 1-D convolution, kernel ``[K, Cin/groups, Cout]``; ``padding``
    frames of zeros on both sides; PyTorch ``nn.Conv1d`` semantics (grouped output channels contiguous)."""

    features: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        w = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, "embed")),
            (self.kernel, cin // self.groups, self.features),
            self.param_dtype,
        )
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            w.astype(self.dtype),
            (self.stride,),
            [(self.padding, self.padding)],
            dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=self.groups,
        )
        if self.use_bias:
            b = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)), (self.features,), self.param_dtype
            )
            y = y + b.astype(self.dtype)
        return y


class GroupNormPerChannel(nn.Module):
    """``nn.GroupNorm(num_groups=C, num_channels=C)`` on ``[B, T, C]``: each channel normalised over time (float32)."""

    eps: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (c,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (c,), self.param_dtype)
        h = x.astype(jnp.float32)
        mean = h.mean(1, keepdims=True)
        var = jnp.square(h - mean).mean(1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return (h * scale + bias).astype(x.dtype)


class _Layer(nn.Module):
    """One encoder layer (post-norm or, ``stable``, pre-norm); ``(x, mask) -> (x, x)`` for nn.scan."""

    heads: int
    ffn: int
    eps: float
    act: str
    stable: bool
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, mask):
        b, length, d = x.shape
        dh = d // self.heads
        D = lambda f, names, name: dense(f, names, self.dtype, self.param_dtype, name=name)  # noqa: E731
        norm1 = LayerNorm(self.eps, self.param_dtype, name="attn_norm")
        norm2 = LayerNorm(self.eps, self.param_dtype, name="ffn_norm")
        h = norm1(x) if self.stable else x
        q, k, v = (D(d, ("embed", "heads"), n)(h).reshape(b, length, self.heads, dh) for n in ("q", "k", "v"))
        x = x + D(d, ("heads", "embed"), "o")(attention(q, k, v, scale=None, key_mask=mask).reshape(b, length, d))
        if not self.stable:
            x = norm1(x)
        h = norm2(x) if self.stable else x
        h = D(d, ("mlp", "embed"), "fc2")(activation(self.act)(D(self.ffn, ("embed", "mlp"), "fc1")(h)))
        x = x + h
        if not self.stable:
            x = norm2(x)
        return x, x


class Wav2Vec2(nn.Module):
    """transformers ``Wav2Vec2Model`` (see the module docstring). Fields mirror ``Wav2Vec2Config``:
    ``dim`` (hidden_size), ``num_layers``, ``heads``, ``ffn`` (intermediate_size), ``conv_dim`` /
    ``conv_kernel`` / ``conv_stride`` / ``conv_bias``, ``feat_norm`` (feat_extract_norm: group | layer),
    ``pos_kernel`` / ``pos_groups`` (num_conv_pos_embeddings / _groups), ``stable``
    (do_stable_layer_norm), ``eps`` (layer_norm_eps), ``act`` (hidden_act), ``feat_act``
    (feat_extract_activation)."""

    dim: int
    num_layers: int
    heads: int
    ffn: int
    conv_dim: tuple[int, ...]
    conv_kernel: tuple[int, ...]
    conv_stride: tuple[int, ...]
    conv_bias: bool = False
    feat_norm: str = "group"
    pos_kernel: int = 128
    pos_groups: int = 16
    stable: bool = False
    eps: float = 1e-5
    act: str = "gelu"
    feat_act: str = "gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def output_length(self, num_samples):
        """50 Hz frames of ``num_samples`` samples (int or array)."""
        return conv_output_length(num_samples, self.conv_kernel, self.conv_stride)

    @nn.compact
    def __call__(self, wave, mask=None):
        """``wave`` float ``[B, T]`` (16 kHz; normalised the way the checkpoint expects -- see
        :func:`normalize_wave`), ``mask`` bool ``[B, T]`` valid samples (None: all). Returns the dict of
        the module docstring."""
        b, t = wave.shape
        feat_act = activation(self.feat_act)
        x = wave.astype(self.dtype)[..., None]
        for i, (c, k, s) in enumerate(zip(self.conv_dim, self.conv_kernel, self.conv_stride)):
            x = Conv1d(c, k, s, use_bias=self.conv_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv_{i}")(x)
            if self.feat_norm == "layer":
                x = LayerNorm(1e-5, self.param_dtype, name=f"conv_norm_{i}")(x)
            elif i == 0:
                x = GroupNormPerChannel(1e-5, self.param_dtype, name="conv_norm_0")(x)
            x = feat_act(x)
        length = x.shape[1]
        if mask is None:
            frames = jnp.ones((b, length), bool)
        else:
            n = conv_output_length(mask.astype(jnp.int32).sum(-1), self.conv_kernel, self.conv_stride)
            frames = jnp.arange(length)[None, :] < n[:, None]
        feats = LayerNorm(self.eps, self.param_dtype, name="proj_norm")(x)
        x = dense(self.dim, ("channels", "embed"), self.dtype, self.param_dtype, name="proj")(feats)
        x = jnp.where(frames[..., None], x, 0)
        pos = Conv1d(
            self.dim,
            self.pos_kernel,
            padding=self.pos_kernel // 2,
            groups=self.pos_groups,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="pos_conv",
        )(x)
        x = x + feat_act(pos[:, :length])  # an even kernel makes one frame too many: drop the last
        if not self.stable:
            x = LayerNorm(self.eps, self.param_dtype, name="encoder_norm")(x)
        stack = nn.scan(
            _Layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        first = x
        x, per_layer = stack(self.heads, self.ffn, self.eps, self.act, self.stable, self.dtype, self.param_dtype, name="layers")(
            x, frames
        )
        last = LayerNorm(self.eps, self.param_dtype, name="encoder_norm")(x) if self.stable else x
        return {
            "hidden_states": jnp.concatenate([first[None], per_layer], 0).astype(jnp.float32),
            "last_hidden_state": last.astype(jnp.float32),
            "extract_features": feats.astype(jnp.float32),
            "mask": frames,
        }


def normalize_wave(wave, mask=None, eps: float = 1e-7):
    """Zero-mean unit-variance per example over its valid samples (``Wav2Vec2FeatureExtractor``'s
    ``do_normalize``: ``(x - mean) / sqrt(var + 1e-7)``; padding set to 0), numpy or jax ``[B, T]``."""
    xp = jnp if isinstance(wave, jax.Array) else np
    wave = xp.asarray(wave, xp.float32)
    m = xp.ones(wave.shape, bool) if mask is None else xp.asarray(mask, bool)
    n = xp.maximum(m.sum(-1, keepdims=True), 1)
    mean = xp.where(m, wave, 0).sum(-1, keepdims=True) / n
    var = xp.where(m, xp.square(wave - mean), 0).sum(-1, keepdims=True) / n
    return xp.where(m, (wave - mean) / xp.sqrt(var + eps), 0)


def resample_features(x, src_rate: float, dst_rate: float, length: int | None = None):
    """Features ``[B, L, C]`` at ``src_rate`` Hz -> ``[B, length, C]`` at ``dst_rate`` Hz by linear
    interpolation at sample centres: output ``j`` (time ``(j + ½) / dst_rate``) reads source position
    ``(j + ½)·src/dst − ½`` clamped to ``[0, L − 1]`` (PyTorch ``F.interpolate(..., mode="linear",
    align_corners=False)`` with scale ``dst/src``). ``length`` default: ``round(L·dst/src)``."""
    src_len = x.shape[1]
    length = int(round(src_len * dst_rate / src_rate)) if length is None else int(length)
    # float32 index arithmetic, as PyTorch's kernel does (float64 positions drift from it by ~1e-5 of the
    # feature scale over a few dozen frames)
    scale = np.float32(src_rate / dst_rate)
    pos = np.maximum(scale * (np.arange(length, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    lo = np.minimum(np.floor(pos).astype(np.int32), src_len - 1)
    hi = np.minimum(lo + 1, src_len - 1)
    w = (pos - lo.astype(np.float32))[None, :, None]
    return x[:, lo] * (1 - w) + x[:, hi] * w
