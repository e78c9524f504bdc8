"""Wan video DiT (diffusers ``WanTransformer3DModel``) -> one mmdit video stream, weight for weight.

Covers Wan2.1 T2V-1.3B / T2V-14B, Wan2.1 I2V-14B (CLIP image cross-attention and the 36-channel
input), Wan2.2 TI2V-5B (48 channels; its per-token timesteps are our per-token sigma) and the Wan2.2
A14B experts (each expert is one such checkpoint). The converted model is an mmdit stream named
``video`` with no audio stream attached; its forward equals diffusers' in float32
(tests/test_parity_wan_dit.py).

Layout (``model_config``): Wan's block *is* our :class:`~mmdit.model.mmdit.StreamBlock` (adaLN table
+ shared time projection, LayerNorm without affine, qk RMSNorm across heads, 3-D RoPE on interleaved
pairs, affine cross-attention norm, GELU(tanh) FFN), so a T2V / TI2V checkpoint needs only the
standard fields. Wan2.1 I2V adds two opt-in roles:

* the 20 condition channels (4 mask + 16 image latents) concatenated to the noisy latents before the
  patch embedding: condition ``image_latents`` (``dim = 20 * prod(patch)`` patchified features, one per
  video token) named in ``model.streams.video.concat``;
* the CLIP vision tokens: condition ``image`` with ``embedding="norm_mlp"`` (Wan's image_embedder) and
  ``added_to="text"`` (attended with the text cross-attention's queries through ``add_k_proj`` /
  ``add_v_proj`` / ``norm_added_k``, summed before its ``to_out``).

Tensor mapping (PyTorch ``Linear`` weight ``[out, in]`` -> our kernel ``[in, out]``):

=================================================  ===================================================
diffusers                                          mmdit (``params``)
=================================================  ===================================================
patch_embedding (Conv3d ``[D, C, pt, ph, pw]``)    video/patch_embedding/proj (kernel = weight
                                                   reshaped ``[D, C*pt*ph*pw]``, transposed: our
                                                   patchify flattens channel-major, like the Conv)
condition_embedder.time_embedder.linear_{1,2}      video/time_embedding/linear_{1,2}
condition_embedder.time_proj                       video/time_embedding/time_proj
condition_embedder.text_embedder.linear_{1,2}      video/cond_embedding_text/linear_{1,2}
condition_embedder.image_embedder.norm{1,2}        video/cond_embedding_image/norm{1,2} (weight -> scale)
condition_embedder.image_embedder.ff.net.{0.proj,2}  video/cond_embedding_image/linear_{1,2}
blocks.i.scale_shift_table ``[1, 6, D]``           blocks/video/modulation/scale_shift_table ``[L, 6, D]``
blocks.i.attn1.to_{q,k,v}, norm_{q,k}              blocks/video/attn/to_{q,k,v}, norm_{q,k}
blocks.i.attn1.to_out.0                            blocks/video/attn_out
blocks.i.norm2                                     blocks/video/norm2
blocks.i.attn2.to_{q,k,v}, norm_{q,k}              blocks/video/cross_text/qkv/...
blocks.i.attn2.to_out.0                            blocks/video/cross_text/to_out
blocks.i.attn2.{add_k_proj,add_v_proj,norm_added_k}  blocks/video/cross_text/{same names}
blocks.i.ffn.net.0.proj, ffn.net.2                 blocks/video/ffn/up, ffn/down
scale_shift_table ``[1, 2, D]``                    video/head/modulation/scale_shift_table
proj_out (rows ordered ``(pt, ph, pw, C)``)        video/head/proj (rows reordered to ``(C, pt, ph, pw)``)
=================================================  ===================================================

Per-layer tensors are stacked on a leading ``layers`` axis (``nn.scan``; ``model.scan=True``).
``norm1``/``norm3``/``norm_out`` have no parameters; Wan's RoPE tables are computed, not stored.
"""

from __future__ import annotations

import math

import numpy as np

from mmdit.convert import stacking
from mmdit.convert.source import ConvertError, np_dtype

NAME = "wan_dit"
DESCRIPTION = (
    "Wan video DiT (diffusers WanTransformer3DModel: Wan2.1 T2V-1.3B/14B, I2V-14B, Wan2.2 TI2V-5B/A14B) -> an mmdit video stream"
)
CLASS_NAME = "WanTransformer3DModel"
STREAM = "video"
TEXT_LENGTH = 512  # UMT5 tokens Wan pads every prompt to (diffusers hard-codes it for the I2V split)
IMAGE_LENGTH = 257  # CLIP ViT-H/14 tokens at 224 px (256 patches + class token), Wan2.1 I2V

# Default clip per VAE (the published resolution): Wan2.1 VAE (16 ch, 8x) at 480x832, 81 frames,
# 16 fps; Wan2.2 VAE (48 ch, 16x) at 704x1280, 121 frames, 24 fps. Latent rate = fps / 4.
DEFAULT_CLIPS = {16: dict(shape=(21, 60, 104), rate=4.0), 48: dict(shape=(31, 44, 80), rate=6.0)}


def _get(hf: dict, key: str, default):
    v = hf.get(key, default)
    return default if v is None and default is not None else v


def matches(hf_config: dict) -> bool:
    return hf_config.get("_class_name") == CLASS_NAME


def check(hf_config: dict) -> None:
    """Raises ConvertError naming the config.json field this converter cannot reproduce exactly."""
    hf = hf_config
    where = "config.json"
    if hf.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise ConvertError(f"{where}: _class_name={hf.get('_class_name')!r}; --family wan_dit converts {CLASS_NAME} only")
    patch = list(_get(hf, "patch_size", [1, 2, 2]))
    if len(patch) != 3 or patch[0] != 1:
        raise ConvertError(
            f"{where}: patch_size={patch}: only a temporal patch of 1 is supported (our RoPE time is the latent frame, "
            "Wan's the token frame; they agree only for patch_size[0] == 1)"
        )
    qk = _get(hf, "qk_norm", "rms_norm_across_heads")
    if qk != "rms_norm_across_heads":
        raise ConvertError(f"{where}: qk_norm={qk!r}: only 'rms_norm_across_heads' (every released Wan) is supported")
    if not _get(hf, "cross_attn_norm", True):
        raise ConvertError(f"{where}: cross_attn_norm=false: our blocks always apply the affine cross-attention norm")
    if hf.get("pos_embed_seq_len") is not None:
        raise ConvertError(
            f"{where}: pos_embed_seq_len={hf['pos_embed_seq_len']} (Wan FLF2V's first/last-frame image position embedding) "
            "is not supported"
        )
    head_dim, heads = int(_get(hf, "attention_head_dim", 128)), int(_get(hf, "num_attention_heads", 40))
    if head_dim % 2:
        raise ConvertError(f"{where}: attention_head_dim={head_dim} must be even (RoPE rotates pairs)")
    dim = heads * head_dim
    image_dim, added = hf.get("image_dim"), hf.get("added_kv_proj_dim")
    if (image_dim is None) != (added is None):
        raise ConvertError(
            f"{where}: image_dim={image_dim} and added_kv_proj_dim={added}: the image cross-attention needs both "
            "(the image embedder feeds add_k_proj/add_v_proj) or neither"
        )
    if added is not None and int(added) != dim:
        raise ConvertError(
            f"{where}: added_kv_proj_dim={added} must equal the inner dim num_attention_heads * attention_head_dim = {dim} "
            "(the image embedder's output feeds add_k_proj)"
        )
    cin, cout = int(_get(hf, "in_channels", 16)), int(_get(hf, "out_channels", 0) or _get(hf, "in_channels", 16))
    if cin < cout:
        raise ConvertError(
            f"{where}: in_channels={cin} < out_channels={cout}: the extra input channels are a concatenated condition, "
            "so there must be at least as many inputs as outputs"
        )
    if int(_get(hf, "freq_dim", 256)) % 2:
        raise ConvertError(f"{where}: freq_dim={hf['freq_dim']} must be even (cos and sin halves)")


def model_config(
    hf_config: dict, *, shape=None, rate: float | None = None, text_length: int = TEXT_LENGTH, image_length: int = IMAGE_LENGTH
) -> dict:
    """The ``config.model`` fields (plain dict) of the mmdit model this checkpoint is: one ``video`` stream.

    ``shape`` ``(F, H, W)`` latent frames/height/width and ``rate`` (latents per second) default to the
    checkpoint's published clip (``DEFAULT_CLIPS``); they do not change any parameter shape, so one
    conversion serves every clip size. ``text_length`` / ``image_length``: condition tokens per sample."""
    check(hf_config)
    hf = hf_config
    heads, head_dim = int(_get(hf, "num_attention_heads", 40)), int(_get(hf, "attention_head_dim", 128))
    patch = tuple(int(p) for p in _get(hf, "patch_size", [1, 2, 2]))
    cin = int(_get(hf, "in_channels", 16))
    cout = int(_get(hf, "out_channels", 0) or cin)
    clip = DEFAULT_CLIPS.get(cout, DEFAULT_CLIPS[16])
    shape = tuple(int(n) for n in (shape or clip["shape"]))
    video = dict(
        kind="grid",
        channels=cout,
        shape=shape,
        patch=patch,
        rate=float(rate or clip["rate"]),
        dim=heads * head_dim,
        ffn=int(_get(hf, "ffn_dim", 13824)),
        cross=("text",),
    )
    conditions = {"text": dict(dim=int(_get(hf, "text_dim", 4096)), length=int(text_length))}
    if cin > cout:
        tokens = int(np.prod([n // p for n, p in zip(shape, patch)]))
        conditions["image_latents"] = dict(dim=(cin - cout) * math.prod(patch), length=tokens)
        video["concat"] = ("image_latents",)
    if hf.get("image_dim") is not None:
        conditions["image"] = dict(dim=int(hf["image_dim"]), length=int(image_length), embedding="norm_mlp", added_to="text")
    return dict(
        streams={STREAM: video},
        conditions=conditions,
        num_layers=int(_get(hf, "num_layers", 40)),
        heads=heads,
        head_dim=head_dim,
        freq_dim=int(_get(hf, "freq_dim", 256)),
        eps=float(_get(hf, "eps", 1e-6)),
        rope_theta=10000.0,
        joint_layers=None,
        mask="full",
        scan=True,
    )


def apply_model_config(cfg, model: dict) -> None:
    """Writes ``model`` (from :func:`model_config`) into an experiment config's ``cfg.model`` in place,
    replacing its streams and conditions."""
    import ml_collections as mlc

    with cfg.unlocked():
        cfg.model.streams = mlc.ConfigDict(model["streams"])
        cfg.model.conditions = mlc.ConfigDict(model["conditions"])
        for k, v in model.items():
            if k not in ("streams", "conditions"):
                cfg.model[k] = v


I2V_MASK_CHANNELS = 4  # Wan's VAE temporal compression: one mask channel per video frame in a latent frame


def i2v_condition_features(geometry, latent_condition):
    """Wan2.1 I2V's concatenated condition as our ``image_latents`` features ``[B, S, 20 * prod(patch)]``.

    ``latent_condition``: ``[B, F, H, W, 16]`` -- the (normalised) VAE latents of the video
    ``[image, zeros...]`` (diffusers ``WanImageToVideoPipeline.prepare_latents``); ``geometry``: the
    video stream's :class:`~mmdit.model.streams.StreamSpec`. The 4 mask channels come first and are 1
    on the first latent frame (the given image's 4 frame slots), 0 elsewhere."""
    import dataclasses

    import jax.numpy as jnp

    x = jnp.asarray(latent_condition, jnp.float32)
    mask = jnp.zeros(x.shape[:-1] + (I2V_MASK_CHANNELS,), jnp.float32).at[:, 0].set(1.0)
    feats = jnp.concatenate([mask, x], axis=-1)
    return dataclasses.replace(geometry, channels=feats.shape[-1]).patchify(feats)


def target(hf_config: dict) -> dict:
    """``{"kind": "mmdit_dit", "model": config.model fields}`` at the checkpoint's published clip size."""
    return {"kind": "mmdit_dit", "stream": STREAM, "model": model_config(hf_config)}


def build(target: dict):
    """Our flax module (:class:`~mmdit.model.mmdit.MMDiT`) for ``target``."""
    import ml_collections as mlc

    from mmdit.model.mmdit import MMDiT
    from mmdit.model.spec import build_spec

    if target.get("kind") != "mmdit_dit":
        raise ConvertError(f"target kind {target.get('kind')!r} is not a wan_dit target ('mmdit_dit')")
    return MMDiT(build_spec(mlc.ConfigDict(target["model"])))


# -- tensors ------------------------------------------------------------------------------------


def IGNORED(hf_config: dict):
    """Source tensors deliberately not converted (fnmatch patterns for ``convert_dir``): diffusers'
    ``_keys_to_ignore_on_load_unexpected`` -- a ``norm_added_q`` some exports carry and no forward uses."""
    return ("*.norm_added_q.*",)


_T = np.transpose  # PyTorch Linear [out, in] -> our kernel [in, out]


def _block_table(image: bool) -> list[tuple[tuple[str, ...], str, object]]:
    """(our path under blocks/video, diffusers name under ``blocks.{i}.``, mapping) per stacked tensor."""
    rows = [(("modulation", "scale_shift_table"), "scale_shift_table", lambda a: a.reshape(a.shape[-2:]))]

    def linear(ours, theirs):
        rows.extend([(ours + ("kernel",), theirs + ".weight", _T), (ours + ("bias",), theirs + ".bias", None)])

    def attention(ours, theirs):
        for n in ("to_q", "to_k", "to_v"):
            linear(ours + (n,), f"{theirs}.{n}")
        rows.extend([(ours + (n, "scale"), f"{theirs}.{n}.weight", None) for n in ("norm_q", "norm_k")])

    attention(("attn",), "attn1")
    linear(("attn_out",), "attn1.to_out.0")
    rows.extend([(("norm2", "scale"), "norm2.weight", None), (("norm2", "bias"), "norm2.bias", None)])
    attention(("cross_text", "qkv"), "attn2")
    linear(("cross_text", "to_out"), "attn2.to_out.0")
    if image:
        linear(("cross_text", "add_k_proj"), "attn2.add_k_proj")
        linear(("cross_text", "add_v_proj"), "attn2.add_v_proj")
        rows.append((("cross_text", "norm_added_k", "scale"), "attn2.norm_added_k.weight", None))
    linear(("ffn", "up"), "ffn.net.0.proj")
    linear(("ffn", "down"), "ffn.net.2")
    return rows


def _put(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def convert(src, hf_config: dict, dtype="float32") -> dict:
    """Nested numpy ``{"params": {"video": ..., "blocks": {"video": ...}}}`` for :func:`build`'s module
    (floating leaves in ``dtype``; per-layer tensors stacked one source tensor at a time)."""
    check(hf_config)
    dt = np_dtype(dtype)
    model = model_config(hf_config)
    video = model["streams"][STREAM]
    patch, cout, dim, layers = tuple(video["patch"]), video["channels"], video["dim"], model["num_layers"]
    image = "image" in model["conditions"]
    cin = cout + model["conditions"].get("image_latents", {}).get("dim", 0) // math.prod(patch)

    def get(name, fn=None, shape=None):
        return stacking.get(src, name, dt, fn or (lambda a: a), shape)

    def linear(name, n_in, n_out):
        return {"kernel": get(name + ".weight", _T, (n_in, n_out)), "bias": get(name + ".bias", shape=(n_out,))}

    def norm(name, n):
        return {"scale": get(name + ".weight", shape=(n,)), "bias": get(name + ".bias", shape=(n,))}

    ce, text_dim, freq = "condition_embedder", model["conditions"]["text"]["dim"], model["freq_dim"]
    top = {
        # Conv3d weight [D, C_in, pt, ph, pw] flattened channel-major = our patchify order.
        "patch_embedding": {
            "proj": {
                "kernel": get("patch_embedding.weight", lambda a: a.reshape(a.shape[0], -1).T, (cin * math.prod(patch), dim)),
                "bias": get("patch_embedding.bias", shape=(dim,)),
            }
        },
        "time_embedding": {
            "linear_1": linear(f"{ce}.time_embedder.linear_1", freq, dim),
            "linear_2": linear(f"{ce}.time_embedder.linear_2", dim, dim),
            "time_proj": linear(f"{ce}.time_proj", dim, 6 * dim),
        },
        "cond_embedding_text": {
            "linear_1": linear(f"{ce}.text_embedder.linear_1", text_dim, dim),
            "linear_2": linear(f"{ce}.text_embedder.linear_2", dim, dim),
        },
    }
    if image:
        img = model["conditions"]["image"]["dim"]
        top["cond_embedding_image"] = {
            "norm1": norm(f"{ce}.image_embedder.norm1", img),
            "linear_1": linear(f"{ce}.image_embedder.ff.net.0.proj", img, img),
            "linear_2": linear(f"{ce}.image_embedder.ff.net.2", img, dim),
            "norm2": norm(f"{ce}.image_embedder.norm2", dim),
        }
    # proj_out rows are ordered (pt, ph, pw, C) (diffusers' unpatchify); ours (C, pt, ph, pw) (our patchify).
    k = len(patch)
    order = (k,) + tuple(range(k))
    out_dim = cout * math.prod(patch)
    top["head"] = {
        "modulation": {"scale_shift_table": get("scale_shift_table", lambda a: a.reshape(a.shape[-2:]), (2, dim))},
        "proj": {
            "kernel": get(
                "proj_out.weight",
                lambda a: a.reshape(*patch, cout, dim).transpose(*order, k + 1).reshape(-1, dim).T,
                (dim, out_dim),
            ),
            "bias": get("proj_out.bias", lambda a: a.reshape(*patch, cout).transpose(*order).reshape(-1), (out_dim,)),
        },
    }
    blocks = {}
    for ours, theirs, fn in _block_table(image):
        _put(blocks, ours, stacking.stack_layers(src, lambda i, t=theirs: f"blocks.{i}.{t}", layers, dt, fn or (lambda a: a)))
    return {"params": {STREAM: top, "blocks": {STREAM: blocks}}}
