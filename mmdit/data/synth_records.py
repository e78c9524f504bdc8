"""``mmdit-data synth``: renders synthetic talking clips, encodes them with the config's codecs and
writes record shards (train and eval splits) ready for ``mmdit-train``.

Each record holds exactly what the model's input schema asks (``DiffusionModel.input_spec()``), plus
``text`` (str), ``identity`` (int) and ``clip_index`` (int):

* ``{visual}_latents`` ``[F, h, w, C]`` from ``codecs.video`` (the visual stream: ``video``, or
  JAM-Flow's ``motion``) and ``{audio}_latents`` ``[L, C]`` from ``codecs.audio`` (when the model has
  an audio stream);
* text: ``text_tokens`` int32 ``[L_text]`` (byte tokenizer) for the in-model byte text encoder, else
  ``text`` features from ``encoders.text`` (the transcript then moves to ``transcript``);
* ``ref_audio`` ``[L_ref, C]`` (a ``ref_audio`` condition, UniTalking's TR2AV): the audio latents of the
  next clip of the same identity (another utterance of the same voice);
* audio features (a condition or condition stream named ``audio_features``, or the one
  ``encoders.audio_features`` names): from ``encoders.audio_features`` (wav2vec2), else from
  ``codecs.audio_features``, a weight-free audio codec (e.g. a 50 Hz log-mel) standing in for it;
* ``speaking_frames`` int32 ``[F_ref]`` and ``speaking`` int32 ``[]`` (a condition with
  ``silence_labels``): the world's ground truth, not an energy rule -- a latent frame of the
  time-reference stream is speaking when at least half of it lies inside the utterance (first spoken
  phone to last, :attr:`~mmdit.data.synthetic.Clip.utterance_span`), so the leading and trailing pauses
  are silence mode; the clip is speaking when ``SpeakingRule.min_fraction`` of its frames are.

World clips longer than ``clip.seconds`` (``world.min_seconds`` above it) are cut to a clip-length window at a
random offset, deterministic per index (``RecordMaker.window``). Latent sequences are cut or zero-padded along time to the model's length when they are within
:data:`MAX_LENGTH_MISMATCH` of it (codec rounding); a larger mismatch is an error naming the config.

Splits: ``train`` (indices ``[0, num)``), ``eval`` (``[10**6, 10**6 + num_eval)``, never shared with
train) and, for every ``train.stages`` entry whose ``data`` is a split name and whose tasks are all
audio-only (``tts``), that split (``[2*10**6, ...)``) written as **audio-only records**: the visual
latents are zeros (the ``tts`` task marks the visual stream absent, so they are never trained on or
attended) -- the records keep the model's schema so one pipeline reads every split.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from mmdit import config_spec
from mmdit.codecs.registry import make_audio_codec, make_video_codec
from mmdit.codecs.text import ByteTokenizer
from mmdit.data.codec_stamp import codecs_stamp
from mmdit.data.records import ShardWriter
from mmdit.data.speaking import SpeakingRule, latent_frame_spans
from mmdit.data.synthetic import SyntheticWorld, WorldConfig
from mmdit.util.lock import DirLock
from mmdit.util.plain import plain

EVAL_INDEX_OFFSET = 10**6
AUDIO_ONLY_INDEX_OFFSET = 2 * 10**6
AUDIO_ONLY_TASKS = ("tts",)
AUDIO_FEATURES = "audio_features"  # the default condition / condition stream fed audio features
MAX_LENGTH_MISMATCH = 0.15  # fraction of a stream's length that cutting / padding may absorb


def world_from_config(cfg, seed: int | None = None) -> SyntheticWorld:
    w = dict(cfg.world)
    return SyntheticWorld(WorldConfig(seed=int(cfg.seed if seed is None else seed), **w))


def fit_length(x: np.ndarray, length: int, field: str) -> np.ndarray:
    """``x [T, ...]`` cut or zero-padded to ``[length, ...]``; ValueError naming ``field`` when the
    mismatch exceeds :data:`MAX_LENGTH_MISMATCH` (codecs and model shapes disagree)."""
    t = x.shape[0]
    if t == length:
        return x
    if abs(t - length) > max(1, MAX_LENGTH_MISMATCH * length):
        raise ValueError(
            f"{field}: the codec makes {t} latents per clip but the model reads {length}; make codecs.* and "
            "model.streams/conditions (shape, rate) agree with clip.seconds"
        )
    if t > length:
        return x[:length]
    return np.concatenate([x, np.zeros((length - t, *x.shape[1:]), x.dtype)])


def utterance_frame_labels(utterance: tuple[float, float] | None, spans: np.ndarray) -> np.ndarray:
    """int32 ``[F]``: 1 where at least half of latent frame ``f`` (``spans[f] = (start_s, end_s)``) lies
    inside ``utterance`` ``(start_s, end_s)`` (None: nothing spoken, all 0)."""
    spans = np.asarray(spans, np.float64)
    if utterance is None:
        return np.zeros(len(spans), np.int32)
    start, end = utterance
    overlap = np.clip(np.minimum(spans[:, 1], end) - np.maximum(spans[:, 0], start), 0.0, None)
    return (overlap >= 0.5 * (spans[:, 1] - spans[:, 0]) - 1e-9).astype(np.int32)


class RecordMaker:
    """Turns synthetic clips into records of ``cfg``'s model (see the module docstring)."""

    def __init__(self, cfg, world: SyntheticWorld):
        from mmdit.model.diffusion import DiffusionModel
        from mmdit.tasks import roles

        self.cfg, self.world = cfg, world
        model = DiffusionModel.from_config(cfg)
        self.spec = model.spec
        self.roles = roles(self.spec, cfg.model)
        self.schema_fields = model.input_spec().fields
        codecs = plain(config_spec.complete(cfg).codecs) or {}
        self.visual = self.spec.stream(self.roles.visual).geometry
        if "video" not in codecs:
            raise ValueError(f"the config has no codecs.video for the visual stream {self.roles.visual!r}: it cannot make data")
        self.video_codec = make_video_codec(codecs["video"])
        self.audio = self.audio_codec = None
        if self.roles.audio is not None:
            if "audio" not in codecs:
                raise ValueError(f"the config has no codecs.audio for the audio stream {self.roles.audio!r}: it cannot make data")
            self.audio = self.spec.stream(self.roles.audio).geometry
            self.audio_codec = make_audio_codec(codecs["audio"])
        conditions = {c.name: c for c in self.spec.conditions}
        encoders = config_spec.encoders_spec(cfg, self.spec)
        self.encoders = None
        if encoders:
            from mmdit.encoders.registry import ConditionEncoders

            self.encoders = ConditionEncoders(encoders)
        self.text = conditions.get("text")
        self.byte_text = self.text is not None and cfg.model.get("text_encoder") is not None
        if self.text is not None and not self.byte_text and "text" not in encoders:
            raise ValueError(
                "model.conditions.text takes precomputed features: set encoders.text=dict(kind='umt5', checkpoint=...) "
                "or the in-model byte encoder (model.text_encoder=dict(kind='byte', ...))"
            )
        self.ref_audio = conditions.get("ref_audio")
        if self.ref_audio is not None and self.audio_codec is None:
            raise ValueError("model.conditions.ref_audio needs codecs.audio to encode the reference clip")
        self.features = None  # (key, length, codec or None) of the audio-feature input
        if "audio_features" not in encoders:
            streams = {a.name: a.geometry for a in self.spec.streams if a.geometry.condition}
            if AUDIO_FEATURES in conditions or AUDIO_FEATURES in streams:
                if "audio_features" not in codecs:
                    raise ValueError(
                        f"the model reads {AUDIO_FEATURES!r}: set encoders.audio_features (wav2vec2) or "
                        "codecs.audio_features (a weight-free audio codec such as the mel one) to make them"
                    )
                is_stream = AUDIO_FEATURES in streams
                key = AUDIO_FEATURES + ("_latents" if is_stream else "")
                length = streams[AUDIO_FEATURES].shape[0] if is_stream else conditions[AUDIO_FEATURES].length
                self.features = (key, length, make_audio_codec(codecs["audio_features"]))
        self.reference_spans = None  # [F_ref, 2] seconds of each time-reference latent frame, when labelled
        if any(c.silence_labels for c in self.spec.conditions):
            ref = self.spec.stream(self.spec.time_reference).geometry
            if self.spec.time_reference == self.roles.visual:
                vc = self.video_codec
                self.reference_spans = latent_frame_spans(ref.shape[0], int(vc.temporal_compression), float(vc.fps))
            else:
                k = np.arange(ref.shape[0])
                self.reference_spans = np.stack([k / ref.rate, (k + 1) / ref.rate], axis=1)

    def _wave(self, clip, seconds: float, rate: int) -> np.ndarray:
        if rate != clip.sample_rate:
            raise ValueError(f"codecs.*.sample_rate={rate} but world.sample_rate={clip.sample_rate}; make them equal")
        return np.asarray(clip.audio[: int(round(seconds * rate))], np.float32)

    def window(self, clip, index: int):
        """``clip`` cut to a ``clip.seconds``-long window at a random offset (deterministic per index) when
        the world renders longer clips (``world.min_seconds > clip.seconds``): a streaming model then sees
        speech at every phase of its chunks, not utterances that always start and end with the clip."""
        n = int(round(float(self.cfg.clip.seconds) * clip.fps))
        total = clip.video.shape[0]
        if total <= n + max(1, int(MAX_LENGTH_MISMATCH * n)):
            return clip
        start = int(np.random.default_rng([int(self.world.cfg.seed), index, 7]).integers(0, total - n + 1))
        spf = clip.sample_rate // clip.fps
        return dataclasses.replace(
            clip,
            video=clip.video[start : start + n],
            audio=clip.audio[start * spf : (start + n) * spf],
            mouth_open=clip.mouth_open[start : start + n],
            phones=[(p, a - start / clip.fps, b - start / clip.fps) for p, a, b in clip.phones],
        )

    def record(self, index: int, audio_only: bool = False) -> dict:
        clip = self.window(self.world.clip(index), index)
        vc = self.video_codec
        frames = clip.video.astype(np.float32)[None] / 127.5 - 1.0
        visual = np.asarray(vc.encode(frames, trim=True)[0], np.float32)
        seconds = vc.valid_num_frames(clip.video.shape[0]) / vc.fps
        vname = self.roles.visual
        visual = fit_length(visual, self.visual.latent_shape[0], f"model.streams.{vname} (codecs.video)")
        if tuple(visual.shape) != tuple(self.visual.latent_shape):
            raise ValueError(
                f"codecs.video makes latents {visual.shape[1:]} per frame, model.streams.{vname} reads "
                f"{tuple(self.visual.latent_shape[1:])}; make world.video_size / codecs.video / the stream's shape agree"
            )
        ex = {f"{vname}_latents": np.zeros_like(visual) if audio_only else visual}
        if self.audio_codec is not None:
            ex[f"{self.roles.audio}_latents"] = self._audio_latents(clip, seconds, f"model.streams.{self.roles.audio}")
        if self.text is not None:
            if self.byte_text:
                ex["text_tokens"] = ByteTokenizer().encode(clip.text, int(self.text.length)).astype(np.int32)
            else:
                ex.update(self.encoders.example_fields(text=clip.text))
        if self.ref_audio is not None:
            ref = self.world.clip(self._same_voice(index))
            lat = self._audio_latents(ref, ref.seconds, "model.conditions.ref_audio", check=False)
            n = int(self.ref_audio.length)
            ex["ref_audio"] = (
                lat[:n] if len(lat) >= n else np.concatenate([lat, np.zeros((n - len(lat), lat.shape[1]), lat.dtype)])
            )
        if self.encoders is not None and self.encoders.get("audio_features") is not None:
            ex.update(
                self.encoders.example_fields(wave=self._wave(clip, seconds, clip.sample_rate), sample_rate=clip.sample_rate)
            )
        elif self.features is not None:
            key, length, codec = self.features
            wave = self._wave(clip, seconds, codec.sample_rate)
            feats = np.asarray(codec.encode(wave[None])[0], np.float32)
            ex[key] = fit_length(feats, length, f"{key} (codecs.audio_features)")
        if self.text is not None and not self.byte_text:
            ex["transcript"] = clip.text
        else:
            ex["text"] = clip.text
        ex["identity"] = int(clip.identity)
        if any(f.name == "face_box" for f in self.schema_fields):  # face-local cross-attention (model.conditions.*.face_local)
            ident, size = self.world.identity_params(clip.identity), float(self.world.cfg.video_size)
            box = [ident.cx - ident.face_rx, ident.cy - ident.face_ry, ident.cx + ident.face_rx, ident.cy + ident.face_ry]
            ex["face_box"] = np.clip(np.asarray(box, np.float32) / size, 0.0, 1.0)
        if self.reference_spans is not None:  # silence labels (model.conditions.*.silence_labels)
            ex["speaking_frames"] = utterance_frame_labels(clip.utterance_span, self.reference_spans)
            ex["speaking"] = np.asarray(SpeakingRule().clip_label(ex["speaking_frames"]), np.int32)
        return ex

    def _audio_latents(self, clip, seconds: float, field: str, check: bool = True) -> np.ndarray:
        ac = self.audio_codec
        lat = np.asarray(ac.encode(self._wave(clip, seconds, ac.sample_rate)[None])[0], np.float32)
        return fit_length(lat, self.audio.latent_shape[0], f"{field} (codecs.audio)") if check else lat

    def _same_voice(self, index: int) -> int:
        """The next clip index after ``index`` spoken by the same identity (its voice)."""
        ident = self.world.identity_of(index)
        for j in range(index + 1, index + 1 + 64 * self.world.cfg.num_identities):
            if self.world.identity_of(j) == ident:
                return j
        return index


def audio_only_splits(cfg) -> list[str]:
    """The split names ``train.stages`` reads whose tasks are all audio-only (:data:`AUDIO_ONLY_TASKS`)."""
    out = []
    for s in plain(cfg.train.get("stages", ())) or ():
        data, tasks = s.get("data"), s.get("tasks") or {}
        if isinstance(data, str) and not os.path.isabs(data) and tasks and set(tasks) <= set(AUDIO_ONLY_TASKS):
            out.append(data)
    return list(dict.fromkeys(out))


def write_split(cfg, out_dir: str, indices, *, audio_only: bool = False, progress: bool = True) -> dict:
    maker = RecordMaker(cfg, world_from_config(cfg))
    indices = list(indices)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(indices), desc=f"synth {os.path.basename(out_dir)}", unit="clip", dynamic_ncols=True)
    with ShardWriter(
        out_dir,
        prefix="synth",
        examples_per_shard=config_spec.data_spec(cfg).examples_per_shard,
        overwrite=True,
        producer="mmdit-data synth",
        metadata={"codecs": codecs_stamp(cfg)},
    ) as writer:
        for i in indices:
            ex = maker.record(i, audio_only=audio_only)
            ex["clip_index"] = int(i)
            writer.write(ex)
            if bar is not None:
                bar.update(1)
        manifest = writer.close()
    if bar is not None:
        bar.close()
    return manifest


def synth(cfg, out_dir: str, num: int | None = None, num_eval: int | None = None, progress: bool = True) -> dict:
    """Writes ``out_dir/train``, ``out_dir/eval`` and the audio-only stage splits; returns their
    manifests. Holds ``out_dir``'s lock (:mod:`mmdit.util.lock`) meanwhile; each split is committed
    atomically (:class:`ShardWriter`)."""
    data = config_spec.data_spec(cfg)
    num = int(data.num_train if num is None else num)
    num_eval = int(data.num_eval if num_eval is None else num_eval)
    if num < 1 or num_eval < 0:
        raise ValueError(f"synth: num={num} (--num) must be >= 1 and num_eval={num_eval} (--num-eval) >= 0")
    if "video" not in (plain(config_spec.complete(cfg).codecs) or {}):
        raise ValueError("the config has no codecs section (codecs.video / codecs.audio): it cannot make data")
    if not plain(cfg.world):
        raise ValueError("the config has no world section (mmdit/data/synthetic.py WorldConfig fields): synth renders it")
    with DirLock(out_dir, command=f"mmdit-data synth --out {os.path.abspath(out_dir)}"):
        out = {"train": write_split(cfg, os.path.join(out_dir, "train"), range(num), progress=progress)}
        if num_eval:
            out["eval"] = write_split(
                cfg, os.path.join(out_dir, "eval"), range(EVAL_INDEX_OFFSET, EVAL_INDEX_OFFSET + num_eval), progress=progress
            )
        for split in audio_only_splits(cfg):
            idx = range(AUDIO_ONLY_INDEX_OFFSET, AUDIO_ONLY_INDEX_OFFSET + num)
            out[split] = write_split(cfg, os.path.join(out_dir, split), idx, audio_only=True, progress=progress)
    return out
