"""One clip window -> the training record of a config's model: exactly the fields of its input schema
(``DiffusionModel.input_spec().record_fields``) plus labels the trainer ignores unless the model reads
them.

Where each schema field comes from (:class:`RecordMaker`):

* ``{visual}_latents`` ``[F, h, w, C]`` -- the visual-role stream (``mmdit.tasks.roles``) from
  ``codecs.video``; frames centre-cropped to the model's aspect and resized to its frame size
  (``h·s x w·s`` pixels, ``s`` = the codec's spatial compression): the "area within" the config's
  resolution, one bucket per model shape;
* ``{audio}_latents`` ``[L, C]`` -- the audio-role stream (when the model has one) from ``codecs.audio``;
* ``text_tokens`` int32 ``[L]`` -- the byte tokenizer (model with ``model.text_encoder``), or
  precomputed features from ``encoders.text`` / ``encoders.audio_features`` / ``encoders.image``
  (:class:`mmdit.encoders.registry.ConditionEncoders`: ``text`` then holds the features and the
  caption is kept as ``transcript``);
* ``audio_features`` / ``audio_features_latents`` -- ``encoders.audio_features`` (wav2vec2), else the
  weight-free ``codecs.audio_features`` codec (as ``mmdit data synth`` does), cut/padded to the length;
* ``ref_audio`` ``[L_ref, C]`` (UniTalking's TR2AV) -- ``codecs.audio`` latents of the *neighbouring*
  window of the same source (the next one, else the previous one: the same voice, another
  utterance); a one-window source uses its own audio, which leaks the target: prefer long sources;
* ``speaking_frames`` int32 ``[F_ref]`` / ``speaking`` int32 ``[]`` -- :mod:`mmdit.data.speaking`
  over the time-reference stream's latent frames; ``face_box`` float32 ``[4]`` -- :mod:`mmdit.data.face_boxes`.

Any other schema field (e.g. a reference-audio condition, a motion stream) has no source here: the
maker refuses the config at construction, naming the field.

Extra keys of every record: ``text`` (the caption, str, unless features took the key), ``source``
(file path relative to the input dir), ``window_start_s`` / ``duration_s`` (float seconds),
``has_video`` int32 ``[]`` (0 for audio-only records), ``face_found`` int32 ``[]``.

**Audio-only records** (a WAV + transcript): the visual stream's latents are all zeros of the
model's shape and ``has_video`` is 0 (train them with the ``tts`` task, which marks the visual stream
invalid); ``face_box`` is the whole frame, ``face_found`` 0; other fields that need a frame are zeros.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmdit.codecs.text import ByteTokenizer
from mmdit.data.face_boxes import FULL_FRAME_BOX, FaceBoxDetector
from mmdit.data.speaking import SpeakingRule, latent_frame_spans
from mmdit.util.plain import plain

REF_AUDIO = "ref_audio"  # UniTalking's reference-audio condition (TR2AV)
AUDIO_FEATURES = "audio_features"  # the condition / condition stream fed audio features


def fit_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` -> centre-cropped to the aspect of ``size = (H', W')`` (see :func:`crop_to_aspect`)
    and resized to ``[N, H', W', 3]``."""
    from mmdit.data.ingest import resize_frames

    return resize_frames(np.ascontiguousarray(crop_to_aspect(frames, size)), size)


def crop_to_aspect(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The largest centred crop of ``[N, H, W, 3]`` with the aspect ratio of ``size = (H', W')``."""
    th, tw = size
    _, h, w, _ = frames.shape
    if h * tw > w * th:  # too tall
        ch = max(1, round(w * th / tw))
        return frames[:, (h - ch) // 2 : (h - ch) // 2 + ch]
    if h * tw < w * th:  # too wide
        cw = max(1, round(h * tw / th))
        return frames[:, :, (w - cw) // 2 : (w - cw) // 2 + cw]
    return frames


@dataclasses.dataclass
class Window:
    """One clip-length piece of a source: ``frames`` uint8 ``[N, H, W, 3]`` at the codec fps (source
    size; None for audio-only), ``wave`` float32 ``[T]`` at the codec rate, its start in seconds."""

    frames: np.ndarray | None
    wave: np.ndarray
    start_s: float


class RecordMaker:
    """The config's codecs / encoders / labels, checked against its model (module docstring).

    Attributes: ``num_frames`` (video frames of a window), ``num_samples`` (audio samples at
    ``sample_rate``), ``window_s`` (seconds a window spans: the longer of the two), ``size`` (model
    frame ``(H, W)``). Raises ValueError naming the config field when codecs, encoders and model disagree.
    """

    def __init__(self, cfg, *, face_detector: FaceBoxDetector | None = None, speaking_rule: SpeakingRule | None = None):
        from mmdit import config_spec, tasks
        from mmdit.codecs.registry import make_audio_codec, make_video_codec
        from mmdit.encoders.registry import ConditionEncoders
        from mmdit.model.diffusion import DiffusionModel

        model = DiffusionModel.from_config(cfg)
        self.spec = model.spec
        self.fields = model.input_spec().record_fields
        self.roles = tasks.roles(self.spec, cfg.model)
        codecs = plain(config_spec.complete(cfg).codecs) or {}
        if "video" not in codecs:
            raise ValueError(
                f"the config has no codecs.video for the visual stream {self.roles.visual!r}: set it to ingest media"
            )
        if self.roles.audio is not None and "audio" not in codecs:
            raise ValueError(f"the config has no codecs.audio for the audio stream {self.roles.audio!r}: set it to ingest media")
        self.video_codec = make_video_codec(codecs["video"])
        self.audio_codec = make_audio_codec(codecs["audio"]) if "audio" in codecs else None
        self.encoders = ConditionEncoders(config_spec.encoders_spec(cfg, self.spec))
        self.text_length = model.spec.condition("text").length if model.text_encoder is not None else None
        names = {f.name: f for f in self.fields}
        self.ref_audio = names.get(REF_AUDIO) if self.audio_codec is not None else None
        self.feature_codec = None  # (key, length, codec): audio features from a weight-free codec
        feature_key = next((k for k in (AUDIO_FEATURES, AUDIO_FEATURES + "_latents") if k in names), None)
        if feature_key and "audio_features" not in self.encoders.specs and "audio_features" in codecs:
            self.feature_codec = (feature_key, names[feature_key].shape[0], make_audio_codec(codecs["audio_features"]))
        self.faces = face_detector or FaceBoxDetector()
        self.speaking_rule = speaking_rule or SpeakingRule()
        self._check_sources()
        visual = self.spec.stream(self.roles.visual).geometry
        f, h, w, c = visual.latent_shape
        vc = self.video_codec
        s = int(vc.spatial_compression)
        self.size = (h * s, w * s)
        self.num_frames = int(vc.num_frames(f))
        if int(vc.latent_channels) != int(c):
            raise ValueError(
                f"codecs.video makes {vc.latent_channels} latent channels but model.streams.{self.roles.visual}.channels={c}"
            )
        rate_of = self.audio_codec or (self.feature_codec[2] if self.feature_codec else None)
        self.sample_rate = int(rate_of.sample_rate) if rate_of is not None else 16000
        self.audio_shape = None
        if self.roles.audio is not None:
            audio, ac = self.spec.stream(self.roles.audio).geometry, self.audio_codec
            self.audio_shape = tuple(audio.latent_shape)
            self.num_samples = int(ac.num_samples(audio.latent_shape[0]))
            if int(ac.latent_channels) != int(audio.latent_shape[-1]):
                raise ValueError(
                    f"codecs.audio makes {ac.latent_channels} latent channels but "
                    f"model.streams.{self.roles.audio}.channels={audio.latent_shape[-1]}"
                )
        else:
            self.num_samples = int(round(self.num_frames / float(vc.fps) * self.sample_rate))
        self.window_s = max(self.num_frames / float(vc.fps), self.num_samples / self.sample_rate)
        self.visual_shape = tuple(visual.latent_shape)
        ref = self.spec.stream(self.spec.time_reference).geometry
        if self.spec.time_reference == self.roles.visual:
            self.reference_spans = latent_frame_spans(f, int(vc.temporal_compression), float(vc.fps))
        else:
            k = np.arange(ref.shape[0])
            self.reference_spans = np.stack([k / ref.rate, (k + 1) / ref.rate], axis=1)

    def _check_sources(self) -> None:
        """Every schema field must have a source (module docstring); ValueError naming the first that has none."""
        made = {f"{self.roles.visual}_latents", "speaking_frames", "face_box"}
        made |= {s["key"] for s in self.encoders.specs.values()} | {s["key"] + "_mask" for s in self.encoders.specs.values()}
        if self.roles.audio is not None:
            made.add(f"{self.roles.audio}_latents")
        if self.text_length is not None:
            made.add("text_tokens")
        if self.ref_audio is not None:
            made.add(REF_AUDIO)
        if self.feature_codec is not None:
            made.add(self.feature_codec[0])
        missing = [f for f in self.fields if f.name not in made]
        if missing:
            f = missing[0]
            where = f"model.streams.{f.source}" if f.role == "latents" else f"model.conditions.{f.source}"
            raise ValueError(
                f"mmdit data ingest cannot make the record field {f.name!r} ({where}, role {f.role}): it makes the "
                f"visual/audio streams from codecs.video/audio, byte text tokens, ref_audio (codecs.audio), audio "
                f"features (encoders.audio_features or codecs.audio_features) and the configured encoders.* "
                f"({sorted(self.encoders.specs)}); configure a source for it or drop it from the model"
            )

    # -- windows -> records ---------------------------------------------------------------------

    def records(self, windows: list[Window], caption: str, source: str) -> tuple[list[dict], int]:
        """Records of the windows of one source (all with frames, or all audio-only), and how many of
        them fell back to the default face box (no face found)."""
        from mmdit.data.synth_records import fit_length

        if not windows:
            return [], 0
        has_video = windows[0].frames is not None
        waves = np.stack([w.wave for w in windows]).astype(np.float32)
        streams = {}
        if self.roles.audio is not None:
            streams[f"{self.roles.audio}_latents"] = audio = np.asarray(self.audio_codec.encode(waves), np.float32)
            if tuple(audio.shape[1:]) != self.audio_shape:
                raise RuntimeError(f"codecs.audio made latents {audio.shape[1:]} per clip, the model needs {self.audio_shape}")
        if has_video:
            crops = [crop_to_aspect(w.frames, self.size) for w in windows]
            fitted = np.stack([fit_frames(c, self.size) for c in crops])
            video = np.asarray(self.video_codec.encode(fitted.astype(np.float32) / 127.5 - 1.0), np.float32)
            if tuple(video.shape[1:]) != self.visual_shape:
                raise RuntimeError(f"codecs.video made latents {video.shape[1:]} per clip, the model needs {self.visual_shape}")
        else:
            video = np.zeros((len(windows), *self.visual_shape), np.float32)
        streams[f"{self.roles.visual}_latents"] = video
        ref = None
        if self.ref_audio is not None:  # the neighbouring window: the same voice, another utterance
            n = self.ref_audio.shape[0]
            lat = np.asarray(self.audio_codec.encode(waves), np.float32)
            ref = [
                fit_length(lat[i + 1 if i + 1 < len(windows) else max(i - 1, 0)], n, "model.conditions.ref_audio")
                for i in range(len(windows))
            ]
        features = None
        if self.feature_codec is not None:
            key, n, codec = self.feature_codec
            if int(codec.sample_rate) != self.sample_rate:
                raise ValueError(
                    f"codecs.audio_features.sample_rate={codec.sample_rate} must equal codecs.audio's {self.sample_rate} Hz"
                )
            feats = np.asarray(codec.encode(waves), np.float32)
            features = [fit_length(x, n, f"{key} (codecs.audio_features)") for x in feats]
        out, no_face = [], 0
        for i, w in enumerate(windows):
            frames = self.speaking_rule.frame_labels(w.wave, self.sample_rate, self.reference_spans)
            if has_video:
                box, found = self.faces.clip_box(crops[i])
                no_face += int(not found)
            else:
                box, found = FULL_FRAME_BOX.copy(), False
            ex = {k: v[i] for k, v in streams.items()}
            ex.update(
                text=caption,
                source=source,
                window_start_s=float(w.start_s),
                duration_s=float(self.window_s),
                has_video=np.asarray(int(has_video), np.int32),
                speaking_frames=frames,
                speaking=np.asarray(self.speaking_rule.clip_label(frames), np.int32),
                face_box=np.asarray(box, np.float32),
                face_found=np.asarray(int(found), np.int32),
            )
            if self.text_length is not None:
                ex["text_tokens"] = ByteTokenizer().encode(caption, self.text_length).astype(np.int32)
            if ref is not None:
                ex[REF_AUDIO] = ref[i]
            if features is not None:
                ex[self.feature_codec[0]] = features[i]
            if self.encoders:
                extra = self.encoders.example_fields(
                    text=caption, wave=w.wave, sample_rate=self.sample_rate, frame=fitted[i][0] if has_video else None
                )
                if "text" in extra:
                    ex["transcript"] = caption
                ex.update(
                    {k: np.asarray(v, np.float32) if np.asarray(v).dtype.kind == "f" else np.asarray(v) for k, v in extra.items()}
                )
            for f in self.fields:  # audio-only: a frame-derived condition is absent -> zeros
                if f.name not in ex:
                    ex[f.name] = np.zeros(f.shape, np.dtype(f.dtype))
            out.append(ex)
        return out, no_face
