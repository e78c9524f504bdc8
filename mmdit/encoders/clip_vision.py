"""CLIP vision tower (transformers ``CLIPVisionModel``; Wan2.1-I2V's ``image_encoder``, ViT-H/14) in Flax,
plus CLIP's image preprocessing.

Architecture: non-overlapping ``patch × patch`` convolution without bias -> ``[B, (H/p)·(W/p), C]``
tokens (row-major over the patch grid), a learned class token prepended, learned absolute positions
``[1 + patches, C]`` added, a LayerNorm ("pre_layrnorm"), then pre-norm transformer layers (LN ->
multi-head attention with biases, ``1/sqrt(Dh)`` scaling -> residual; LN -> ``fc2(act(fc1 x))`` ->
residual) with ``act`` = ``quick_gelu`` (OpenAI CLIP: ``x·σ(1.702x)``) or ``gelu`` (OpenCLIP ViT-H/14)
per the config. The pooled output is the post-LayerNorm of the class token of the last layer.

``CLIPVision(pixels float [B, H, W, 3] normalised) -> dict``: ``hidden_states`` float32 ``[num_layers
+ 1, B, 1 + patches, C]`` in transformers' ``output_hidden_states`` convention (index 0 after the
pre-LayerNorm, index ``k`` the output of layer ``k``), ``last_hidden_state`` (= index ``-1``) and
``pooler_output`` ``[B, C]``. diffusers' ``WanImageToVideoPipeline.encode_image`` feeds the DiT
``hidden_states[-2]`` -- the output of the penultimate layer, all 257 tokens for ViT-H/14 at 224² --
which :class:`mmdit.encoders.registry.ImageEncoder` computes by running only the first
``num_layers - 1`` layers (:func:`mmdit.encoders.layers.truncate_layers`).

:func:`preprocess` is ``CLIPImageProcessor``'s default: resize the shortest side to ``size`` (bicubic,
PIL), centre crop ``size × size``, scale to [0, 1], normalise with CLIP's mean/std.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmdit.encoders.layers import Dtype, LayerNorm, activation, attention, dense

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class _Layer(nn.Module):
    """One pre-norm CLIP encoder layer; ``(x, None) -> (x, x)`` for nn.scan."""

    heads: int
    ffn: int
    eps: float
    act: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, _):
        b, length, d = x.shape
        dh = d // self.heads
        D = lambda f, names, name: dense(f, names, self.dtype, self.param_dtype, name=name)  # noqa: E731
        h = LayerNorm(self.eps, self.param_dtype, name="attn_norm")(x)
        q, k, v = (D(d, ("embed", "heads"), n)(h).reshape(b, length, self.heads, dh) for n in ("q", "k", "v"))
        x = x + D(d, ("heads", "embed"), "o")(attention(q, k, v, scale=None).reshape(b, length, d))
        h = LayerNorm(self.eps, self.param_dtype, name="ffn_norm")(x)
        x = x + D(d, ("mlp", "embed"), "fc2")(activation(self.act)(D(self.ffn, ("embed", "mlp"), "fc1")(h)))
        return x, x


class CLIPVision(nn.Module):
    """transformers ``CLIPVisionModel`` (module docstring). Fields mirror ``CLIPVisionConfig``: ``dim``
    (hidden_size), ``num_layers``, ``heads``, ``ffn`` (intermediate_size), ``image_size``, ``patch``
    (patch_size), ``channels`` (num_channels), ``eps`` (layer_norm_eps), ``act`` (hidden_act)."""

    dim: int
    num_layers: int
    heads: int
    ffn: int
    image_size: int = 224
    patch: int = 14
    channels: int = 3
    eps: float = 1e-5
    act: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def num_tokens(self) -> int:
        return 1 + (self.image_size // self.patch) ** 2

    @nn.compact
    def __call__(self, pixels):
        b, h, w, c = pixels.shape
        if (h, w, c) != (self.image_size, self.image_size, self.channels):
            raise ValueError(
                f"CLIP vision takes [B, {self.image_size}, {self.image_size}, {self.channels}] pixels, got {tuple(pixels.shape)}; "
                "resize with mmdit.encoders.clip_vision.preprocess"
            )
        p, g = self.patch, self.image_size // self.patch
        kernel = self.param(
            "patch_embed",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, "embed")),
            (p, p, c, self.dim),
            self.param_dtype,
        )
        x = jax.lax.conv_general_dilated(
            pixels.astype(self.dtype), kernel.astype(self.dtype), (p, p), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        ).reshape(b, g * g, self.dim)
        cls = self.param(
            "class_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)), (self.dim,), self.param_dtype
        )
        pos = self.param(
            "pos_embed",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
            (self.num_tokens, self.dim),
            self.param_dtype,
        )
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.dim)), x], 1) + pos.astype(self.dtype)
        x = LayerNorm(self.eps, self.param_dtype, name="pre_norm")(x)
        stack = nn.scan(
            _Layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        first = x
        x, per_layer = stack(self.heads, self.ffn, self.eps, self.act, self.dtype, self.param_dtype, name="layers")(x, None)
        pooled = LayerNorm(self.eps, self.param_dtype, name="post_norm")(x[:, 0])
        return {
            "hidden_states": jnp.concatenate([first[None], per_layer], 0).astype(jnp.float32),
            "last_hidden_state": x.astype(jnp.float32),
            "pooler_output": pooled.astype(jnp.float32),
        }


def preprocess(images, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """uint8 images ``[B, H, W, 3]`` (or a list of ``[H, W, 3]``) -> float32 ``[B, size, size, 3]``:
    shortest side resized to ``size`` (PIL bicubic, the other side ``int(size·long/short)``), centre
    crop, ``/255``, ``(x - mean) / std`` -- ``CLIPImageProcessor``'s defaults (its PIL backend)."""
    from PIL import Image

    out = []
    for img in images:
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
            raise ValueError(f"preprocess takes uint8 RGB images [H, W, 3], got {img.dtype} {img.shape}")
        hh, ww = img.shape[:2]
        short, long = (hh, ww) if hh <= ww else (ww, hh)
        new_long = int(size * long / short)
        nh, nw = (size, new_long) if hh <= ww else (new_long, size)
        im = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))
        top, left = (nh - size) // 2, (nw - size) // 2
        im = im[top : top + size, left : left + size].astype(np.float32) / 255.0
        out.append((im - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))
    return np.stack(out).astype(np.float32)
