"""Frozen condition encoders built from converted checkpoints: ``make_encoder(cfg)``.

``cfg`` is a plain dict (a config's ``encoders.text`` / ``encoders.audio_features`` / ``encoders.image``)
with ``kind`` and ``checkpoint`` (a folder written by ``mmdit convert``, read with
:func:`mmdit.util.converted.load`; its manifest's family must be the kind) plus per-kind settings:

* ``umt5`` -> :class:`TextEncoder`: ``tokenizer`` (folder with the tokenizer files; default: the
  checkpoint folder, else the converted model's source folder or its sibling ``tokenizer/`` -- the
  Wan diffusers layout), ``max_length`` (tokens; Wan: 512). ``encode(texts) -> (features float32
  [B, max_length, d_model], mask bool [B, max_length])``, features zeroed past each prompt's end
  (Wan's pipeline does the same).
* ``wav2vec2`` -> :class:`AudioFeatureEncoder`: ``layer`` (None: ``last_hidden_state``; ``k``: the
  output of layer ``k``, transformers' ``hidden_states[k]``, negative counts from the end),
  ``rate`` (Hz of the output; None: the model's 50 Hz), ``length`` (frames of the output; None:
  what the wave gives), ``normalize`` (zero-mean unit-variance the wave first, as the wav2vec2
  feature extractor does; default True). ``encode(wave [B, T] at sample_rate, sample_rate) ->
  (features float32 [B, L, C], mask bool [B, L])``; the wave is resampled to 16 kHz first.
* ``clip_vision`` -> :class:`ImageEncoder`: ``layer`` (default ``-2``: the penultimate layer's
  output, what Wan2.1-I2V feeds its DiT). ``encode(images uint8 [B, H, W, 3]) -> (features float32
  [B, 1 + patches, C], mask all True)``.
* ``byte`` is refused with the fix: byte-token features come from the trainable encoder inside the
  model (``model.text_encoder = dict(kind="byte", ...)``), so they cannot be precomputed.

Every encoder has ``dim`` (feature width) and a jitted forward (compiled once per input shape);
``dtype`` (``"float32"`` default, or ``"bfloat16"``) is the compute dtype. Only layers up to the one
asked for are run (:func:`mmdit.encoders.layers.truncate_layers`).

:class:`ConditionEncoders` holds the configured encoders of one model and turns one clip's
transcript / wave / first frame into the record fields the model reads (used by ingest and sampling).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmdit.encoders.layers import truncate_layers

KINDS = ("umt5", "wav2vec2", "clip_vision", "byte")


def _dtype(name: str, field: str):
    table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if name not in table:
        raise ValueError(f"{field}.dtype={name!r}: choose float32 or bfloat16")
    return table[name]


def _load(cfg: Mapping[str, Any], field: str, family: str):
    """``(manifest, params)`` of ``cfg['checkpoint']``, checked to be a ``family`` conversion."""
    from mmdit.util import converted

    path = cfg.get("checkpoint")
    if not path:
        raise ValueError(f"{field}.checkpoint is not set: point it at a folder written by `mmdit convert --family {family}`")
    path = os.path.expanduser(path)
    manifest = converted.read_manifest(path)
    if manifest.get("family") != family:
        raise ValueError(
            f"{field}.checkpoint={path} holds a {manifest.get('family')!r} conversion, but {field}.kind={cfg.get('kind')!r} "
            f"needs {family!r}; convert the right model with `mmdit convert --family {family}`"
        )
    return converted.load(path)


def _layer_index(layer, num_layers: int, field: str) -> int | None:
    """None (the model's last output) or ``k`` in ``[0, num_layers]`` (negative counts from the end)."""
    if layer is None:
        return None
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"{field}.layer={layer!r}: expected an integer or None")
    k = layer + num_layers + 1 if layer < 0 else layer
    if not 0 <= k <= num_layers:
        raise ValueError(
            f"{field}.layer={layer}: the checkpoint has {num_layers} layers; use -{num_layers + 1}..{num_layers} or None"
        )
    return k


class _Encoder:
    """Common part: the flax module, its device params and one jitted forward."""

    def __init__(self, module, params, dtype):
        self.module = module.clone(dtype=dtype)
        self.params = jax.device_put(params)


class TextEncoder(_Encoder):
    """UMT5 text features (see the module docstring)."""

    kind = "umt5"

    def __init__(self, cfg: Mapping[str, Any], field: str = "encoders.text"):
        from mmdit.encoders.umt5 import Tokenizer, UMT5Encoder, has_tokenizer

        manifest, params = _load(cfg, field, "umt5")
        t = {k: v for k, v in manifest["target"].items() if k != "kind"}
        super().__init__(UMT5Encoder(**t), params, _dtype(cfg.get("dtype", "float32"), field))
        self.dim = int(t["dim"])
        self.max_length = int(cfg.get("max_length") or 512)
        candidates = [
            os.path.expanduser(p) if p else p for p in (cfg.get("tokenizer"), cfg["checkpoint"], manifest.get("source_dir"))
        ]
        if manifest.get("source_dir"):
            candidates.append(os.path.join(os.path.dirname(manifest["source_dir"]), "tokenizer"))
        path = next((p for p in candidates if has_tokenizer(p)), None)
        if path is None:
            raise FileNotFoundError(
                f"{field}.tokenizer: no tokenizer files in {[p for p in candidates if p]}; set {field}.tokenizer to the folder "
                "holding tokenizer.json / spiece.model (Wan diffusers: <pipeline>/tokenizer)"
            )
        self.tokenizer = Tokenizer(path)
        if self.tokenizer.vocab_size > int(t["vocab_size"]):
            raise ValueError(
                f"{field}.tokenizer={path} has {self.tokenizer.vocab_size} tokens but the checkpoint embeds {t['vocab_size']}; "
                "the tokenizer belongs to another model"
            )

        def fwd(params, ids, mask):
            feats = self.module.apply(params, ids, mask)
            return jnp.where(mask[..., None], feats, 0.0), mask

        self._fwd = jax.jit(fwd)

    def encode_ids(self, ids, mask):
        """int ``[B, L]`` ids + bool mask -> ``(float32 [B, L, dim], mask)`` (padding positions zeroed)."""
        return self._fwd(self.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool))

    def encode(self, texts):
        """A string or list of strings -> ``(float32 [B, max_length, dim], bool [B, max_length])``."""
        ids, mask = self.tokenizer(texts, self.max_length)
        return self.encode_ids(ids, mask)


class AudioFeatureEncoder(_Encoder):
    """wav2vec2 features of one layer at a chosen rate (see the module docstring)."""

    kind = "wav2vec2"

    def __init__(self, cfg: Mapping[str, Any], field: str = "encoders.audio_features"):
        from mmdit.encoders.wav2vec2 import SAMPLE_RATE, Wav2Vec2

        manifest, params = _load(cfg, field, "wav2vec2")
        t = {k: (tuple(v) if isinstance(v, list) else v) for k, v in manifest["target"].items() if k != "kind"}
        full = int(t["num_layers"])
        self.layer = _layer_index(cfg.get("layer"), full, field)
        if self.layer is not None:
            t["num_layers"] = self.layer
            params = truncate_layers(params, self.layer)
        super().__init__(Wav2Vec2(**t), params, _dtype(cfg.get("dtype", "float32"), field))
        self.dim = int(t["dim"])
        self.sample_rate = SAMPLE_RATE
        self.model_rate = SAMPLE_RATE / float(np.prod(t["conv_stride"]))  # 50 Hz for every published config
        self.rate = float(cfg.get("rate") or self.model_rate)
        self.length = cfg.get("length")
        self.normalize = bool(cfg.get("normalize", True))
        key = "last_hidden_state" if self.layer is None else "hidden_states"

        def fwd(params, wave, mask):
            out = self.module.apply(params, wave, mask)
            feats = out[key] if self.layer is None else out[key][-1]
            return jnp.where(out["mask"][..., None], feats, 0.0), out["mask"]

        self._fwd = jax.jit(fwd)

    def encode(self, wave, sample_rate: int | None = None, mask=None):
        """``wave`` float ``[B, T]`` (or ``[T]``) at ``sample_rate`` Hz (default 16 kHz), ``mask`` bool
        valid samples (right padding) -> ``(float32 [B, L, dim], bool [B, L])`` at :attr:`rate` Hz (``length`` frames
        when configured: cut, or zero-padded with the mask False)."""
        from mmdit.encoders.wav2vec2 import normalize_wave, resample_features

        wave = np.asarray(wave, np.float32)
        wave = wave[None] if wave.ndim == 1 else wave
        sr = int(sample_rate or self.sample_rate)
        if sr != self.sample_rate:
            import librosa

            wave = librosa.resample(wave, orig_sr=sr, target_sr=self.sample_rate, axis=-1).astype(np.float32)
            if mask is not None:  # right-padded examples: the valid length scales with the rate
                n = np.round(np.asarray(mask, bool).sum(-1) * self.sample_rate / sr)
                mask = np.arange(wave.shape[-1])[None, :] < n[:, None]
        if self.normalize:
            wave = normalize_wave(wave, mask)
        feats, fmask = self._fwd(self.params, jnp.asarray(wave), None if mask is None else jnp.asarray(mask, bool))
        feats, fmask = np.asarray(feats), np.asarray(fmask)
        if self.rate != self.model_rate:
            n = int(round(feats.shape[1] * self.rate / self.model_rate))
            feats = resample_features(feats, self.model_rate, self.rate, n)
            fmask = resample_features(fmask[..., None].astype(np.float32), self.model_rate, self.rate, n)[..., 0] > 0.5
        if self.length is not None:
            L = int(self.length)
            if feats.shape[1] >= L:
                feats, fmask = feats[:, :L], fmask[:, :L]
            else:
                pad = L - feats.shape[1]
                feats = np.pad(feats, ((0, 0), (0, pad), (0, 0)))
                fmask = np.pad(fmask, ((0, 0), (0, pad)))
        return feats.astype(np.float32), fmask


class ImageEncoder(_Encoder):
    """CLIP vision features of one layer (see the module docstring)."""

    kind = "clip_vision"

    def __init__(self, cfg: Mapping[str, Any], field: str = "encoders.image"):
        from mmdit.encoders.clip_vision import CLIPVision

        manifest, params = _load(cfg, field, "clip_vision")
        t = {k: v for k, v in manifest["target"].items() if k != "kind"}
        self.layer = _layer_index(cfg.get("layer", -2), int(t["num_layers"]), field)
        if self.layer is not None:
            t["num_layers"] = self.layer
            params = truncate_layers(params, self.layer)
        super().__init__(CLIPVision(**t), params, _dtype(cfg.get("dtype", "float32"), field))
        self.dim, self.image_size = int(t["dim"]), int(t["image_size"])
        self.num_tokens = 1 + (self.image_size // int(t["patch"])) ** 2

        def fwd(params, pixels):
            return self.module.apply(params, pixels)["last_hidden_state"]

        self._fwd = jax.jit(fwd)

    def encode_pixels(self, pixels):
        """Normalised float ``[B, S, S, 3]`` -> float32 ``[B, tokens, dim]``."""
        return self._fwd(self.params, jnp.asarray(pixels, jnp.float32))

    def encode(self, images):
        """uint8 ``[B, H, W, 3]`` (any size; CLIP-preprocessed here) -> ``(float32 [B, tokens, dim], mask all True)``."""
        from mmdit.encoders.clip_vision import preprocess

        feats = self.encode_pixels(preprocess(images, self.image_size))
        return feats, jnp.ones(feats.shape[:2], bool)


def make_encoder(cfg: Mapping[str, Any], field: str = "encoders"):
    """The encoder ``cfg`` describes (module docstring); ValueError naming ``field`` on a bad setting."""
    cfg = dict(cfg)
    kind = cfg.get("kind")
    if kind == "byte":
        raise ValueError(
            f"{field}.kind='byte': byte-token text features come from the trainable encoder inside the model; set "
            f"model.text_encoder=dict(kind='byte', ...) and leave {field} None"
        )
    table = {"umt5": TextEncoder, "wav2vec2": AudioFeatureEncoder, "clip_vision": ImageEncoder}
    if kind not in table:
        raise ValueError(f"{field}.kind={kind!r}: choose one of {sorted(table)}")
    return table[kind](cfg, field)


class ConditionEncoders:
    """The configured encoders of one model, keyed by the condition they feed.

    ``specs``: ``{slot: dict(kind, checkpoint, ..., condition=NAME, key=RECORD_KEY, length=L)}`` for
    the slots ``text`` / ``audio_features`` / ``image`` (what ``mmdit.config_spec.encoders_spec``
    returns: ``condition`` is the model condition or condition stream fed, ``key`` the record/batch
    field, ``length`` its token count, ``rate`` its Hz for audio features). Encoders are built on
    first use.
    """

    def __init__(self, specs: Mapping[str, Mapping[str, Any]]):
        self.specs = {k: dict(v) for k, v in specs.items() if v}
        self._built: dict[str, Any] = {}

    def __bool__(self) -> bool:
        return bool(self.specs)

    def get(self, slot: str):
        """The encoder of ``slot`` (built once), None when not configured."""
        if slot not in self.specs:
            return None
        if slot not in self._built:
            s = self.specs[slot]
            cfg = {k: v for k, v in s.items() if k not in ("condition", "key", "mask_key", "dim")}
            if slot == "text":
                cfg["max_length"] = s["length"]
            enc = make_encoder(cfg, f"encoders.{slot}")
            if s.get("dim") is not None and enc.dim != int(s["dim"]):
                raise ValueError(
                    f"encoders.{slot}.checkpoint={s['checkpoint']} makes {enc.dim}-d features but the model reads "
                    f"{s['dim']}-d ones at {s['condition']!r}; set the model's width there to {enc.dim} or use another checkpoint"
                )
            self._built[slot] = enc
        return self._built[slot]

    def example_fields(self, *, text: str | None = None, wave=None, sample_rate: int | None = None, frame=None) -> dict:
        """One example's encoder fields: ``{key: float32 [L, C]}`` (+ ``{mask_key: bool [L]}`` for
        padded conditions) from its transcript, mono wave ``[T]`` at ``sample_rate`` and first frame
        uint8 ``[H, W, 3]``; slots whose input is None are skipped."""
        out = {}
        if "text" in self.specs and text is not None:
            s = self.specs["text"]
            f, m = self.get("text").encode([text])
            out[s["key"]], out[s["key"] + "_mask"] = np.asarray(f)[0], np.asarray(m)[0]
        if "audio_features" in self.specs and wave is not None:
            s = self.specs["audio_features"]
            f, m = self.get("audio_features").encode(np.asarray(wave)[None], sample_rate)
            out[s["key"]] = f[0]
            if s.get("mask_key"):
                out[s["mask_key"]] = m[0]
        if "image" in self.specs and frame is not None:
            s = self.specs["image"]
            out[s["key"]] = np.asarray(self.get("image").encode(np.asarray(frame)[None])[0])[0]
        return out
