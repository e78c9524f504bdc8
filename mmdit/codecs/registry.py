"""Codec construction from config: ``config.codecs.video`` / ``config.codecs.audio`` name a kind and
its arguments. Today only the weight-free kinds exist (``pixels``, ``mel``); a new codec is one entry here."""

from __future__ import annotations

import importlib

_VIDEO = {"pixels": ("mmdit.codecs.pixels", "PixelCodec")}
_AUDIO = {"mel": ("mmdit.codecs.mel", "MelCodec")}


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
