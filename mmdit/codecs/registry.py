"""Codec construction from config: ``config.codecs.video`` / ``config.codecs.audio`` name a kind and
its arguments: the weight-free kinds (``pixels``, ``mel``) and the converted pretrained ones (``wan_vae``,
``mmaudio``, built from ``mmdit convert`` checkpoints). A new codec is one entry here."""

from __future__ import annotations

import importlib
import inspect

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


def check_codec_args(codecs) -> None:
    """Validates a whole ``config.codecs`` mapping without building anything (no checkpoint is read):
    each entry's ``kind`` exists and every other key is an argument its class takes. ``video`` takes a video
    codec, every other entry (``audio``, ``audio_features``, ...) an audio one. Raises ValueError naming the
    field."""
    for name, entry in (codecs or {}).items():
        field = f"codecs.{name}"
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"{field}={entry!r}: expected a dict(kind=..., ...)")
        table = _VIDEO if name == "video" else _AUDIO
        args = dict(entry)
        kind = args.pop("kind", None)
        if kind not in table:
            raise ValueError(f"{field}.kind={kind!r}: choose one of {sorted(table)}")
        module, cls = table[kind]
        params = inspect.signature(getattr(importlib.import_module(module), cls)).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        unknown = sorted(set(args) - set(params))
        if unknown:
            raise ValueError(f"{field}.{unknown[0]}: {cls} ({kind}) takes no such argument; it takes {', '.join(sorted(params))}")
