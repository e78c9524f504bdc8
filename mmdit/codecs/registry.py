"""Codec construction from config: ``config.codecs.video`` / ``config.codecs.audio`` name a kind and
its arguments: the weight-free kinds (``pixels``, ``mel``) and the converted pretrained ones (``wan_vae``,
``mmaudio``, built from ``mmdit convert`` checkpoints). A new codec is one entry here."""

from __future__ import annotations

import importlib

_VIDEO = {
    "pixels": ("mmdit.codecs.pixels", "PixelCodec"),
    # Wan2.1 / Wan2.2 VAE from a converted checkpoint: kind=wan_vae, checkpoint=DIR, fps, optional tile/tile_stride (px)
    "wan_vae": ("mmdit.codecs.wan_vae", "WanVAECodec"),
}
_AUDIO = {
    "mel": ("mmdit.codecs.mel", "MelCodec"),
    # MMAudio VAE + BigVGAN vocoder from converted checkpoints: kind=mmaudio, vae=DIR, vocoder=DIR,
    # optional scaling_factor, dtype, left_context / lookahead (chunked decode, latents)
    "mmaudio": ("mmdit.codecs.mmaudio", "MMAudioCodec"),
}


def _make(table, cfg, field):
    args = dict(cfg)
    kind = args.pop("kind", None)
    if kind not in table:
        raise ValueError(f"{field}.kind={kind!r}: choose one of {sorted(table)}")
    module, name = table[kind]
    try:
        return getattr(importlib.import_module(module), name)(**args)
    except TypeError as e:
        raise ValueError(f"{field}: bad arguments for {name}: {e}") from None


def make_video_codec(cfg):
    return _make(_VIDEO, cfg, "codecs.video")


def make_audio_codec(cfg):
    return _make(_AUDIO, cfg, "codecs.audio")
