"""The Wan video VAE (Wan2.1: z16, 8x8 pixels x 4 frames per latent; Wan2.2: z48, 16x16 x 4) in JAX,
as a :class:`~mmdit.codecs.base.VideoCodec` with chunked, cached encode/decode.

A port of diffusers' ``AutoencoderKLWan`` (layers in :mod:`mmdit.codecs.wan_vae_layers`), proven equal
to it on tiny random models (``tests/test_parity_wan_vae.py``). Frames ``float32 [B, N, H, W, 3]`` in
[-1, 1] (``N = 1 + 4k``) <-> latents ``[B, F, H/s, W/s, z]`` (``F = 1 + k``, ``s`` = 8 or 16), the
encoder's posterior **mean** normalised per channel with the config's ``latents_mean`` /
``latents_std`` (``(mu - mean) / std``, so latents are roughly unit scale: what Wan's pipelines feed the
DiT); decode undoes it (``z * std + mean``) and clamps frames to [-1, 1].

**Streaming contract (chunked decode / encode).** The VAE is causal in time: video frame ``n`` depends
only on latent frames ``<= ceil(n/4)``. So a clip may be decoded in temporal chunks::

    state = codec.decode_init(batch, h, w)            # zero caches; the next chunk starts the video
    for z in chunks:                                  # z: [B, f, h, w, C] normalised latents, any f >= 1
        state, frames = codec.decode_chunk(state, z)  # frames: [B, n, H, W, 3], final when returned

* The chunk that starts the video (the first call after ``decode_init``) yields ``1 + 4(f-1)`` frames:
  latent frame 0 decodes to the single video frame 0, exactly as Wan does (its temporal upsamplers skip
  frame 0; Wan2.2's duplicate-up shortcuts drop the copies). Every later chunk yields ``4f`` frames.
* ``state`` is a pytree (:class:`ChunkState`): the last input frames of every causal convolution
  (two per 3x3x3 conv, two per temporal upsampler), per spatial tile; its array shapes depend only on
  ``(batch, h, w)``, so each chunk call is one jitted pure function, compiled once per (first?, f).
  The input state is not modified (it can be reused, e.g. to re-decode a chunk that was re-sampled).
* The frames of chunk ``t`` never change once returned: concatenating the chunks' frames equals the
  one-shot :meth:`WanVAECodec.decode` (tested for 1- and 2-latent-frame chunks; equal to float32
  rounding, the same ops run in a different grouping).

Encode is the mirror image: ``encode_init(batch, H, W)``, then ``encode_chunk(state, frames)`` with
``1 + 4k`` frames in the first chunk and ``4k`` in each later one, yielding ``1 + k`` / ``k`` latent
frames. The one-shot :meth:`~WanVAECodec.encode` runs frame 0, then 4 frames at a time (diffusers'
loop); :meth:`~WanVAECodec.decode` runs ``chunk`` latent frames at a time (default 1, diffusers').

**Tiled decode** (``tile``, ``tile_stride`` in pixels; diffusers' ``tiled_decode``): frames larger
than ``tile`` are decoded as overlapping ``tile x tile`` pixel tiles (latent tiles of ``tile / s``
cells every ``tile_stride / s`` cells), each with its own cache, and blended linearly over the
``tile - tile_stride`` overlap (the tile above, then the tile to the left, in raster order) before
Wan2.2's unpatchify and the clamp. Memory then scales with the tile, not the frame; tiles see no
context beyond their borders, so tiled output differs from untiled near seams (a quality trade-off,
as in diffusers; equal to diffusers' own tiled decode). Tiling composes with chunking.

Weights: ``checkpoint=`` a directory written by ``mmdit convert`` (``--family wan_vae``, from the
diffusers ``vae/`` folder of Wan2.1 or Wan2.2), loaded with :func:`mmdit.util.converted.load`; or
``config=`` + ``params=`` (tests, benches); or ``config=`` + ``seed=`` for random weights (benches).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mmdit.codecs.base import VideoCodec, check_frames
from mmdit.codecs.wan_vae_layers import (
    AttentionBlock,
    CausalConv3d,
    Resample,
    ResidualBlock,
    RMSNorm,
    avg_down,
    dup_up,
    patchify,
    silu,
    unpatchify,
)

# Wan2.1's per-channel latent statistics (the defaults of diffusers' AutoencoderKLWan).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
# Wan2.2-TI2V-5B's (z48): Wan2.2's ``Wan2_2_VAE`` constants, also in its diffusers vae/config.json.
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """Architecture of a Wan VAE; field names and meanings are diffusers' ``AutoencoderKLWan`` config's.

    Defaults are Wan2.1's (:meth:`wan21`); :meth:`wan22` is Wan2.2-TI2V-5B's. ``temperal_downsample``
    (sic, diffusers' spelling) says which of the ``len(dim_mult) - 1`` downsampling stages also halve
    time; the decoder mirrors it. ``latents_mean`` / ``latents_std`` (``z_dim`` each) normalise latents.
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None  # None: base_dim (Wan2.2: 256)
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    is_residual: bool = False  # Wan2.2: residual down/up blocks with avg-down / dup-up shortcuts
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None  # Wan2.2: 2 (2x2 pixel patches into channels before the encoder)
    scale_factor_temporal: int = 4
    scale_factor_spatial: int = 8
    latents_mean: tuple[float, ...] | None = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] | None = WAN21_LATENTS_STD

    @classmethod
    def wan21(cls) -> "WanVAEConfig":
        return cls()

    @classmethod
    def wan22(cls) -> "WanVAEConfig":
        """Wan2.2-TI2V-5B's VAE (a converted checkpoint carries the same numbers from its config.json)."""
        return cls(
            base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
            patch_size=2, scale_factor_spatial=16, latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD,
        )  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> "WanVAEConfig":
        """From a diffusers ``config.json`` dict or :meth:`to_dict`; unknown keys (``_class_name``,
        ``dropout``...) are ignored, lists become tuples. Raises ValueError naming a bad field."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        for k in ("scale_factor_temporal", "scale_factor_spatial"):
            if kw.get(k, 0) is None:
                kw.pop(k)
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @property
    def decoder_dim(self) -> int:
        return self.decoder_base_dim or self.base_dim

    def validate(self) -> None:
        n = len(self.dim_mult)
        if len(self.temperal_downsample) < n - 1:
            raise ValueError(f"temperal_downsample has {len(self.temperal_downsample)} entries; dim_mult needs {n - 1}")
        p = self.patch_size or 1
        spatial = p * 2 ** (n - 1)
        if spatial != self.scale_factor_spatial:
            raise ValueError(
                f"scale_factor_spatial={self.scale_factor_spatial} but the architecture compresses space by {spatial} "
                f"(patch_size {p} x 2^{n - 1} downsamples); fix scale_factor_spatial in the VAE config"
            )
        temporal = 2 ** sum(bool(t) for t in self.temperal_downsample[: n - 1])
        if temporal != self.scale_factor_temporal:
            raise ValueError(
                f"scale_factor_temporal={self.scale_factor_temporal} but temperal_downsample={list(self.temperal_downsample)} "
                f"compresses time by {temporal}; fix one of them in the VAE config"
            )
        if self.in_channels != 3 * p * p or self.out_channels != 3 * p * p:
            raise ValueError(
                f"in_channels={self.in_channels}, out_channels={self.out_channels}: an RGB VAE with patch_size {p} "
                f"needs {3 * p * p} (3 colours x {p}x{p} patch)"
            )
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.z_dim:
                raise ValueError(f"{name} has {len(v)} values, z_dim={self.z_dim} needs {self.z_dim}")
        if self.latents_std is not None and min(self.latents_std) <= 0:
            raise ValueError("latents_std must be positive")


class MidBlock(nn.Module):
    """Residual block, attention, residual block (channels unchanged)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResidualBlock(c, self.dtype, name="resnets_0")(x)
        x = AttentionBlock(self.dtype, name="attentions_0")(x)
        return ResidualBlock(c, self.dtype, name="resnets_1")(x)


class ResidualDownBlock(nn.Module):
    """Wan2.2 encoder stage: residual blocks + resampler, plus the parameter-free avg-down shortcut."""

    out_dim: int
    num_res_blocks: int
    temporal: bool
    down: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, first: bool):
        shortcut = avg_down(x, self.out_dim, 2 if self.temporal else 1, 2 if self.down else 1)
        for k in range(self.num_res_blocks):
            x = ResidualBlock(self.out_dim, self.dtype, name=f"resnets_{k}")(x)
        if self.down:
            mode = "downsample3d" if self.temporal else "downsample2d"
            x = Resample(mode, dtype=self.dtype, name="downsampler")(x, first)
        return x + shortcut.astype(x.dtype)


class UpBlock(nn.Module):
    """Decoder stage. Wan2.1 (``residual=False``): ``num_res_blocks + 1`` residual blocks, then an
    upsampler to ``out_dim // 2`` channels (``upsamplers_0``). Wan2.2: upsampler to ``out_dim``
    (``upsampler``) plus the dup-up shortcut from the block's input."""

    out_dim: int
    num_res_blocks: int
    mode: str | None  # upsample2d / upsample3d / None
    residual: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, first: bool):
        x_in = x
        for k in range(self.num_res_blocks + 1):
            x = ResidualBlock(self.out_dim, self.dtype, name=f"resnets_{k}")(x)
        if self.mode is None:
            return x
        if not self.residual:
            return Resample(self.mode, self.out_dim // 2, self.dtype, name="upsamplers_0")(x, first)
        x = Resample(self.mode, self.out_dim, self.dtype, name="upsampler")(x, first)
        return x + dup_up(x_in, self.out_dim, 2 if self.mode == "upsample3d" else 1, 2, first).astype(x.dtype)


class Encoder(nn.Module):
    """Patchified frames ``[B, T, H, W, in_channels]`` -> ``[B, T', H/s', W/s', 2*z_dim]`` (mean, logvar)."""

    cfg: WanVAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, first: bool):
        cfg, dt = self.cfg, self.dtype
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        n = len(cfg.dim_mult)
        x = CausalConv3d(dims[0], dtype=dt, name="conv_in")(x)
        idx, scale = 0, 1.0
        for i, out_dim in enumerate(dims[1:]):
            last = i == n - 1
            temporal = bool(cfg.temperal_downsample[i]) if not last else False
            if cfg.is_residual:
                x = ResidualDownBlock(out_dim, cfg.num_res_blocks, temporal, not last, dt, name=f"down_blocks_{i}")(x, first)
                continue
            for _ in range(cfg.num_res_blocks):  # Wan2.1: one flat list of blocks
                x = ResidualBlock(out_dim, dt, name=f"down_blocks_{idx}")(x)
                idx += 1
                if scale in cfg.attn_scales:
                    x = AttentionBlock(dt, name=f"down_blocks_{idx}")(x)
                    idx += 1
            if not last:
                x = Resample("downsample3d" if temporal else "downsample2d", dtype=dt, name=f"down_blocks_{idx}")(x, first)
                idx += 1
                scale /= 2.0
        x = MidBlock(dt, name="mid_block")(x)
        return CausalConv3d(2 * cfg.z_dim, dtype=dt, name="conv_out")(silu(RMSNorm(name="norm_out")(x)))


class Decoder(nn.Module):
    """Latents ``[B, F, h, w, z_dim]`` -> patchified frames ``[B, T, h*s', w*s', out_channels]`` (unclamped)."""

    cfg: WanVAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, first: bool):
        cfg, dt = self.cfg, self.dtype
        mult = cfg.dim_mult
        dims = [cfg.decoder_dim * u for u in (mult[-1], *mult[::-1])]
        n = len(mult)
        temporal_up = tuple(cfg.temperal_downsample[: n - 1])[::-1]
        x = CausalConv3d(dims[0], dtype=dt, name="conv_in")(x)
        x = MidBlock(dt, name="mid_block")(x)
        for i, out_dim in enumerate(dims[1:]):
            mode = None if i == n - 1 else ("upsample3d" if temporal_up[i] else "upsample2d")
            x = UpBlock(out_dim, cfg.num_res_blocks, mode, cfg.is_residual, dt, name=f"up_blocks_{i}")(x, first)
        return CausalConv3d(cfg.out_channels, dtype=dt, name="conv_out")(silu(RMSNorm(name="norm_out")(x)))


class WanVAE(nn.Module):
    """diffusers' ``AutoencoderKLWan`` as a flax module over one temporal chunk (cache in ``"cache"``).

    :meth:`encode_chunk`: frames ``[B, T, H, W, 3]`` -> posterior mean ``[B, T', h, w, z_dim]`` (raw,
    not normalised). :meth:`decode_chunk`: raw latents -> patchified, unclamped frames (finish with
    :func:`finish_frames`). ``first``: the chunk starts the video (static).
    """

    config: WanVAEConfig
    dtype: Any = jnp.float32

    def setup(self):
        z, dt = self.config.z_dim, self.dtype
        self.encoder = Encoder(self.config, dt)
        self.quant_conv = CausalConv3d(2 * z, (1, 1, 1), (0, 0), dt)
        self.post_quant_conv = CausalConv3d(z, (1, 1, 1), (0, 0), dt)
        self.decoder = Decoder(self.config, dt)

    def encode_chunk(self, frames, first: bool):
        x = patchify(frames.astype(self.dtype), self.config.patch_size or 1)
        h = self.quant_conv(self.encoder(x, first))
        return h[..., : self.config.z_dim].astype(jnp.float32)

    def decode_chunk(self, z, first: bool):
        return self.decoder(self.post_quant_conv(z.astype(self.dtype)), first).astype(jnp.float32)

    def __call__(self, frames):
        """Both halves (for ``init``): ``decode_chunk(encode_chunk(frames))`` of a first chunk."""
        return self.decode_chunk(self.encode_chunk(frames, True), True)


def finish_frames(x, patch_size: int | None):
    """Decoder output -> frames in [-1, 1]: Wan2.2's unpatchify, then the clamp."""
    return jnp.clip(unpatchify(x, patch_size or 1), -1.0, 1.0)


def init_params(config: WanVAEConfig, seed: int = 0, height: int | None = None, width: int | None = None) -> dict:
    """Random params ``{"params": ...}`` (flax default init; for benches and shape checks)."""
    s = config.scale_factor_spatial
    x = jnp.zeros((1, 1, height or s, width or s, 3), jnp.float32)
    return {"params": WanVAE(config).init(jax.random.key(seed), x)["params"]}


@functools.lru_cache(maxsize=16)
def abstract_params(config: WanVAEConfig) -> dict:
    """``{"params": ...}`` as ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    return jax.eval_shape(functools.partial(init_params, config))


def check_params(config: WanVAEConfig, params: dict, where: str = "params") -> None:
    """Raises ValueError naming the first param path missing, extra or of the wrong shape for ``config``."""

    def flat(tree):
        return {"/".join(str(k.key) for k in p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    want, have = flat(abstract_params(config)["params"]), flat(params)
    for path in sorted(set(want) | set(have)):
        if want.get(path) != have.get(path):
            raise ValueError(
                f"{where}: param {path} is {have.get(path, 'missing')}, the Wan VAE config needs {want.get(path, 'no such param')}; "
                "the checkpoint and its config do not match (re-run `mmdit convert` on the vae/ folder)"
            )


def count_params(config: WanVAEConfig) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract_params(config))))


@functools.lru_cache(maxsize=32)
def _steps(config: WanVAEConfig, dtype: str):
    """The jitted chunk steps of one (config, dtype), shared by every codec instance (compiled once per
    chunk shape). Both are pure: ``(params, cache, x, first) -> (new cache, output)``."""
    model = WanVAE(config, jnp.dtype(dtype))
    mean, std = np.asarray(config.latents_mean, np.float32), np.asarray(config.latents_std, np.float32)

    def encode_step(params, cache, frames, first):
        mu, mut = model.apply({"params": params, "cache": cache}, frames, first, method=WanVAE.encode_chunk, mutable=["cache"])
        return mut["cache"], (mu - mean) / std

    def decode_step(params, cache, z, first, finish):
        z = z.astype(jnp.float32) * std + mean
        out, mut = model.apply({"params": params, "cache": cache}, z, first, method=WanVAE.decode_chunk, mutable=["cache"])
        return mut["cache"], (finish_frames(out, config.patch_size) if finish else out)

    return jax.jit(encode_step, static_argnames="first"), jax.jit(decode_step, static_argnames=("first", "finish"))


@functools.lru_cache(maxsize=64)
def _cache_shapes(config: WanVAEConfig, dtype: str, method: str, x_shape: tuple):
    """``jax.ShapeDtypeStruct`` tree of the ``"cache"`` collection for chunks of ``x_shape[2:4]`` frames."""
    model = WanVAE(config, jnp.dtype(dtype))
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    out = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, True, method=getattr(WanVAE, method)), x)
    return out["cache"]


@flax.struct.dataclass
class ChunkState:
    """Streaming state of a chunked encode/decode (see the module docstring).

    ``caches``: one ``"cache"`` collection per spatial tile (row-major; one tile when untiled).
    ``started``: a chunk has been processed (static: the first chunk compiles separately).
    ``tiles``: static ``((row0, row1), (col0, col1))`` input boxes of the tiles.
    """

    caches: tuple
    started: bool = flax.struct.field(pytree_node=False, default=False)
    tiles: tuple = flax.struct.field(pytree_node=False, default=())
    size: tuple = flax.struct.field(pytree_node=False, default=())  # (batch, h, w) of the input


def _blend(a, b, extent: int, axis: int):
    """diffusers' ``blend_v``/``blend_h``: the first ``extent`` rows/cols of ``b`` fade in from ``a``'s last ones."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = extent
    r = (jnp.arange(extent, dtype=b.dtype) / extent).reshape(shape)
    head = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis) * (1 - r)
    head = head + jax.lax.slice_in_dim(b, 0, extent, axis=axis) * r
    return jnp.concatenate([head, jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)], axis=axis)


class WanVAECodec(VideoCodec):
    """The Wan VAE as a :class:`VideoCodec` (module docstring: layout, normalisation, streaming, tiling).

    Args:
      checkpoint: directory written by ``mmdit convert`` for a Wan VAE (family ``wan_vae``).
      fps: frames per second of the video the codec is used at (Wan2.1: 16, Wan2.2: 24).
      tile, tile_stride: tiled decode, in pixels (``tile`` int or ``(h, w)``; stride default ``3/4`` of
        the tile, diffusers' 256/192); None disables tiling.
      chunk: latent frames per decode step in the one-shot :meth:`decode` (1: diffusers' frame-by-frame loop).
      dtype: compute dtype (``"float32"`` or ``"bfloat16"``; norms run in float32 either way).
      config, params, seed: instead of ``checkpoint``: a :class:`WanVAEConfig` (or its dict) and either
        the params (``{"params": ...}`` or the inner dict) or a seed for random weights.

    Arrays: inputs numpy or jax; outputs jax arrays (float32).
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        fps: float = 16.0,
        tile: int | Sequence[int] | None = None,
        tile_stride: int | Sequence[int] | None = None,
        chunk: int = 1,
        dtype: str = "float32",
        config: WanVAEConfig | dict | None = None,
        params: dict | None = None,
        seed: int | None = None,
    ):
        if checkpoint is not None:
            if config is not None or params is not None:
                raise ValueError("WanVAECodec: give either checkpoint= or config=/params=, not both")
            from mmdit.util import converted

            checkpoint = os.path.expanduser(str(checkpoint))
            manifest, loaded = converted.load(checkpoint)
            target = manifest.get("target", {})
            if target.get("kind") != "wan_vae":
                raise ValueError(
                    f"{checkpoint}: holds a {target.get('kind')!r} checkpoint (family {manifest.get('family')!r}), "
                    "not a Wan VAE; convert the diffusers vae/ folder with `mmdit convert --family wan_vae`"
                )
            config, params = target["config"], loaded
        if config is None:
            raise ValueError("WanVAECodec needs checkpoint= (a converted Wan VAE directory) or config=")
        self.config = config if isinstance(config, WanVAEConfig) else WanVAEConfig.from_dict(config)
        self.config.validate()
        cfg = self.config
        if cfg.latents_mean is None or cfg.latents_std is None:
            raise ValueError(
                "the Wan VAE config has no latents_mean/latents_std: take them from the checkpoint's vae/config.json"
            )
        if params is None:
            if seed is None:
                raise ValueError("WanVAECodec(config=...) needs params= or seed= (random weights)")
            params = init_params(cfg, seed)
        params = params.get("params", params)
        check_params(cfg, params, checkpoint or "params")
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={dtype!r}: choose float32 or bfloat16")
        self.dtype = jnp.dtype(dtype)
        self.model = WanVAE(cfg, self.dtype)
        self.fps = float(fps)
        self.latent_channels = cfg.z_dim
        self.temporal_compression = cfg.scale_factor_temporal
        self.spatial_compression = cfg.scale_factor_spatial
        self.latents_mean = np.asarray(cfg.latents_mean, np.float32)
        self.latents_std = np.asarray(cfg.latents_std, np.float32)
        if chunk < 1:
            raise ValueError(f"chunk={chunk}: latent frames per decode step must be >= 1")
        self.chunk = int(chunk)
        self.tile = self.tile_stride = None
        if tile is not None:
            th, tw = (tile, tile) if np.isscalar(tile) else tuple(tile)
            if tile_stride is None:
                sh, sw = th * 3 // 4, tw * 3 // 4
            else:
                sh, sw = (tile_stride, tile_stride) if np.isscalar(tile_stride) else tuple(tile_stride)
            s = self.spatial_compression
            for name, v in (("tile", th), ("tile", tw), ("tile_stride", sh), ("tile_stride", sw)):
                if v % s or v <= 0:
                    raise ValueError(f"{name}={v} px: must be a positive multiple of the spatial compression {s}")
            if sh > th or sw > tw:
                raise ValueError(f"tile_stride {(sh, sw)} exceeds tile {(th, tw)}: tiles would leave gaps")
            self.tile, self.tile_stride = (int(th), int(tw)), (int(sh), int(sw))
        self._encode_step, self._decode_step = _steps(cfg, dtype)

    def _zero_cache(self, method: str, x_shape: tuple):
        return jax.tree_util.tree_map(
            lambda s: jnp.zeros(s.shape, s.dtype), _cache_shapes(self.config, self.dtype.name, method, x_shape)
        )

    # ---- encode ----

    def encode_init(self, batch: int, height: int, width: int) -> ChunkState:
        """State for encoding a new clip of ``height x width`` frames (multiples of the spatial compression)."""
        self.latent_shape(1, height, width)  # checks divisibility
        cache = self._zero_cache("encode_chunk", (batch, 1, height, width, 3))
        return ChunkState(caches=(cache,), started=False, tiles=(((0, height), (0, width)),), size=(batch, height, width))

    def encode_chunk(self, state: ChunkState, frames):
        """``frames [B, n, H, W, 3]`` (first chunk ``n = 1 + 4k``, later ``n = 4k``) -> ``(state, latents
        [B, n_lat, h, w, C])`` with ``n_lat = 1 + k`` / ``k``."""
        check_frames(frames)
        b, n, h, w, _ = np.shape(frames)
        if (b, h, w) != tuple(state.size):
            raise ValueError(f"frames {np.shape(frames)} do not match the state's (batch, H, W) = {state.size}; use encode_init")
        t = self.temporal_compression
        if (n - 1 if not state.started else n) % t or n < 1:
            want = f"1 + {t}k" if not state.started else f"a multiple of {t}"
            raise ValueError(f"encode_chunk got {n} frames; this chunk needs {want} frames")
        cache, lat = self._encode_step(self.params, state.caches[0], jnp.asarray(frames, jnp.float32), first=not state.started)
        return state.replace(caches=(cache,), started=True), lat

    def encode(self, frames, trim: bool = False):
        """Frames ``[B, N, H, W, 3]`` in [-1, 1] -> normalised latents ``[B, F, h, w, C]`` (frame 0, then 4 at a time)."""
        check_frames(frames)
        n = np.shape(frames)[1]
        if trim:
            frames = frames[:, : self.valid_num_frames(n)]
            n = np.shape(frames)[1]
        self.check_num_frames(n)
        b, _, h, w, _ = np.shape(frames)
        state = self.encode_init(b, h, w)
        t, outs = self.temporal_compression, []
        state, lat = self.encode_chunk(state, frames[:, :1])
        outs.append(lat)
        for i in range(1, n, t):
            state, lat = self.encode_chunk(state, frames[:, i : i + t])
            outs.append(lat)
        return jnp.concatenate(outs, axis=1)

    # ---- decode ----

    def _tile_boxes(self, h: int, w: int) -> tuple:
        """Latent ``((r0, r1), (c0, c1))`` boxes of the decode tiles (one box when untiled or small)."""
        s = self.spatial_compression
        if self.tile is None or (h <= self.tile[0] // s and w <= self.tile[1] // s):
            return (((0, h), (0, w)),)
        (th, tw), (sh, sw) = self.tile, self.tile_stride
        th, tw, sh, sw = th // s, tw // s, sh // s, sw // s
        return tuple(((i, min(i + th, h)), (j, min(j + tw, w))) for i in range(0, h, sh) for j in range(0, w, sw))

    def decode_init(self, batch: int, height: int, width: int) -> ChunkState:
        """State for decoding a new clip of ``[B, *, height, width, C]`` latents (latent cells, not pixels)."""
        boxes = self._tile_boxes(height, width)
        caches = tuple(
            self._zero_cache("decode_chunk", (batch, 1, r1 - r0, c1 - c0, self.latent_channels)) for (r0, r1), (c0, c1) in boxes
        )
        return ChunkState(caches=caches, started=False, tiles=boxes, size=(batch, height, width))

    def decode_chunk(self, state: ChunkState, latents):
        """``latents [B, f, h, w, C]`` -> ``(state, frames [B, n, H, W, 3])``, ``n = 1 + 4(f-1)`` for the
        chunk that starts the clip, ``4f`` after. Frames are final (module docstring)."""
        shape = tuple(np.shape(latents))
        if len(shape) != 5 or shape[-1] != self.latent_channels:
            raise ValueError(f"latents must be [B, f, h, w, {self.latent_channels}], got shape {shape}")
        b, f, h, w, _ = shape
        if (b, h, w) != tuple(state.size):
            raise ValueError(f"latents {shape} do not match the state's (batch, h, w) = {state.size}; use decode_init")
        if f < 1:
            raise ValueError("decode_chunk needs at least one latent frame")
        z = jnp.asarray(latents, jnp.float32)
        first = not state.started
        if len(state.tiles) == 1:
            cache, frames = self._decode_step(self.params, state.caches[0], z, first=first, finish=True)
            return state.replace(caches=(cache,), started=True), frames
        caches, outs = [], []
        for cache, ((r0, r1), (c0, c1)) in zip(state.caches, state.tiles):
            cache, out = self._decode_step(self.params, cache, z[:, :, r0:r1, c0:c1], first=first, finish=False)
            caches.append(cache)
            outs.append(out)
        return state.replace(caches=tuple(caches), started=True), self._blend_tiles(outs, state.tiles, h, w)

    def _blend_tiles(self, outs, boxes, h, w):
        """diffusers' tiled_decode blending of per-tile decoder outputs (patchified space), then finish."""
        p = self.config.patch_size or 1
        s = self.spatial_compression // p  # decoder output pixels per latent cell (before unpatchify)
        (th, tw), (sh, sw) = self.tile, self.tile_stride
        blend_h, blend_w, sh, sw = (th - sh) // p, (tw - sw) // p, sh // p, sw // p
        rows: list[list] = []
        for out, ((r0, _), (c0, _)) in zip(outs, boxes):
            if c0 == 0:
                rows.append([])
            rows[-1].append(out)
        result = []
        for i, row in enumerate(rows):
            for j in range(len(row)):
                t = row[j]
                if i > 0:
                    t = _blend(rows[i - 1][j], t, blend_h, axis=2)
                if j > 0:
                    t = _blend(row[j - 1], t, blend_w, axis=3)
                row[j] = t
            result.append(jnp.concatenate([t[:, :, :sh, :sw] for t in row], axis=3))
        dec = jnp.concatenate(result, axis=2)[:, :, : h * s, : w * s]
        return finish_frames(dec, self.config.patch_size)

    def decode(self, latents):
        """Latents ``[B, F, h, w, C]`` -> frames ``[B, 1 + 4(F-1), H, W, 3]`` in [-1, 1], ``chunk`` latent
        frames per step (``chunk=1``: diffusers' loop)."""
        shape = tuple(np.shape(latents))
        if len(shape) != 5:
            raise ValueError(f"latents must be [B, F, h, w, C], got shape {shape}")
        b, f, h, w, _ = shape
        state, outs = self.decode_init(b, h, w), []
        for i in range(0, f, self.chunk):
            state, frames = self.decode_chunk(state, latents[:, i : i + self.chunk])
            outs.append(frames)
        return jnp.concatenate(outs, axis=1)

    def stream_decoder(self, batch: int):
        """Chunk-by-chunk causal decode over :meth:`decode_chunk` (:class:`mmdit.codecs.streaming.WanVAEStreamDecoder`)."""
        from mmdit.codecs.streaming import WanVAEStreamDecoder

        return WanVAEStreamDecoder(self, batch)
