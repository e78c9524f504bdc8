"""Sampling inputs from user media: files -> known latents, transcripts -> text tokens, eval records
as the fallback, and the string forms of the sampler settings.

Used by ``mmdit-sample`` (:mod:`mmdit.cli.sample` via :func:`mmdit.sample.run.sample_to_files`) and
meant for any other front end (a streaming sampler, a server): nothing here parses a command line.
Error messages name the ``mmdit-sample`` flag that supplies each input (``label`` arguments let a
caller name its own field instead).

* :class:`MediaEncoder` -- reads an image / video / audio file, centre-crops and resizes frames to
  the model's frame size, resamples to the codecs' fps and rate, cuts or pads to the clip length, and
  encodes with the config's codecs: visual latents ``[F, h, w, C]``, audio latents ``[L, C]``.
* :class:`EvalRecords` -- a record directory (a workdir's ``W/data/eval``) whose latents and
  transcripts fill the inputs a caller did not give.
* :func:`gather_known_latents` / :func:`gather_texts` -- one task's known latents ``{stream:
  [num, ...]}`` (with where each came from) and its ``num`` transcripts.
* :func:`prepare_task_inputs` -- both, plus the task's RNG and the byte-tokenized text (or the
  configured ``encoders.text``'s features, :func:`condition_encoders`), validated
  against the masks the sampler will draw: a :class:`TaskInputs` ready for ``Sampler.sample``.
* :func:`parse_guidance` / :func:`parse_stream_shift` -- ``"text=video:4,audio:3"`` and
  ``"audio=1"`` strings -> the ``guidance`` / ``stream_shift`` arguments of ``Sampler.sample``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import zlib
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "MP4_EXTS",
    "parse_guidance",
    "parse_stream_shift",
    "MediaEncoder",
    "EvalRecords",
    "tile",
    "gather_known_latents",
    "gather_texts",
    "TaskInputs",
    "prepare_task_inputs",
    "condition_encoders",
    "task_rng",
]

MP4_EXTS = (".mp4", ".mov", ".m4v", ".mkv", ".webm")  # containers read with PyAV (their audio track as audio)


# ----------------------------------------------------------------------------------------------
# Sampler settings from strings
# ----------------------------------------------------------------------------------------------


def parse_guidance(values: Sequence[str] | None) -> dict | None:
    """``--guidance`` values -> ordered ``{cond: s}`` / ``{cond: {stream: s}}`` (None: not given).

    Forms: ``text=3``; ``text=video:4,audio:3``; several conditions separated by ``;`` or given as
    repeated values (order = nested-CFG order); ``none`` = no guidance. Raises ValueError.
    """
    if not values:
        return None
    out: dict = {}
    for value in values:
        for item in filter(None, (p.strip() for p in value.split(";"))):
            if item.lower() == "none":
                continue
            cond, sep, rest = item.partition("=")
            if not sep or not cond.strip() or not rest.strip():
                raise ValueError(
                    f"--guidance {item!r}: expected COND=SCALE or COND=STREAM:SCALE,STREAM:SCALE "
                    "(e.g. text=3 or text=video:4,audio:3)"
                )
            try:
                if ":" in rest:
                    scales = {}
                    for part in rest.split(","):
                        stream, colon, s = part.partition(":")
                        if not colon:
                            raise ValueError
                        scales[stream.strip()] = float(s)
                    out[cond.strip()] = scales
                else:
                    out[cond.strip()] = float(rest)
            except ValueError:
                raise ValueError(f"--guidance {item!r}: scales must be numbers, e.g. text=video:4,audio:3") from None
    return out


def parse_stream_shift(items: Sequence[str] | None) -> dict[str, float] | None:
    """``['audio=1', 'video=3']`` -> ``{'audio': 1.0, 'video': 3.0}``; None when none was given. Raises ValueError."""
    if not items:
        return None
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"--stream-shift {item!r}: use STREAM=SHIFT, e.g. audio=1.0")
    return out


# ----------------------------------------------------------------------------------------------
# Media files -> latents
# ----------------------------------------------------------------------------------------------


def _stderr_note(message: str) -> None:
    print(message, file=sys.stderr)


class MediaEncoder:
    """Reads user media and encodes it for one model (its codecs and stream shapes).

    Args:
      spec: the model's ``ModelSpec`` (``DiffusionModel.spec``).
      roles: ``mmdit.tasks.roles(spec, cfg.model)``: which streams are the visual and the audio one.
      video_codec, audio_codec: the config's codecs (``mmdit.codecs.registry.make_*_codec``).
      note: receives a one-line message when an input is adjusted (audio padded with silence);
        default: printed to stderr.

    Attributes: ``visual`` / ``audio`` (the two streams' geometry: ``latent_shape`` ``[F, h, w, C]`` /
    ``[L, C]``), ``size`` (frame ``(H, W)`` in pixels), ``num_frames`` (video frames of a clip),
    ``num_samples`` (audio samples of a clip). Raises ValueError when codecs and streams disagree.
    """

    def __init__(self, spec, roles, video_codec, audio_codec, *, note: Callable[[str], None] | None = None):
        self.video_codec, self.audio_codec = video_codec, audio_codec
        self.note = note or _stderr_note
        self.visual, self.audio = spec.stream(roles.visual).geometry, spec.stream(roles.audio).geometry
        f, h, w, c = self.visual.latent_shape
        s = video_codec.spatial_compression
        self.size = (h * s, w * s)
        self.num_frames = video_codec.num_frames(f)
        self.num_samples = audio_codec.num_samples(self.audio.latent_shape[0])
        if video_codec.latent_channels != c:
            raise ValueError(
                f"codecs.video makes {video_codec.latent_channels} latent channels but "
                f"model.streams.{roles.visual}.channels={c}; fix the config"
            )
        if audio_codec.latent_channels != self.audio.latent_shape[-1]:
            raise ValueError(
                f"codecs.audio makes {audio_codec.latent_channels} latent channels but "
                f"model.streams.{roles.audio}.channels={self.audio.latent_shape[-1]}; fix the config"
            )
        if audio_codec.latent_length(self.num_samples) != self.audio.latent_shape[0]:
            raise ValueError(
                f"codecs.audio does not map {self.num_samples} samples to "
                f"{self.audio.latent_shape[0]} latents (model.streams.{roles.audio}.shape)"
            )

    @classmethod
    def from_config(cls, cfg, spec, roles, *, note: Callable[[str], None] | None = None) -> "MediaEncoder":
        """The encoder of ``cfg.codecs.video`` / ``cfg.codecs.audio`` for ``spec``."""
        from mmdit.codecs.registry import make_audio_codec, make_video_codec

        return cls(spec, roles, make_video_codec(cfg.codecs.video), make_audio_codec(cfg.codecs.audio), note=note)

    def fit_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` -> centre-cropped to the model's aspect, resized to ``[N, *size, 3]``."""
        from mmdit.data.ingest import resize_frames

        th, tw = self.size
        n, h, w, _ = frames.shape
        if h * tw > w * th:  # too tall
            ch = max(1, round(w * th / tw))
            frames = frames[:, (h - ch) // 2 : (h - ch) // 2 + ch]
        elif h * tw < w * th:
            cw = max(1, round(h * tw / th))
            frames = frames[:, :, (w - cw) // 2 : (w - cw) // 2 + cw]
        return resize_frames(np.ascontiguousarray(frames), (th, tw))

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 ``[N, *size, 3]`` -> float32 visual latents ``[F', h, w, C]`` (the codec's frame grouping)."""
        x = frames.astype(np.float32)[None] / 127.5 - 1.0
        return np.asarray(self.video_codec.encode(x), np.float32)[0]

    def image_latents(self, path: str, label: str = "--image") -> np.ndarray:
        """A PNG/JPEG -> visual latents ``[F, h, w, C]``: latent frame 0 from the image, zeros after."""
        from PIL import Image, UnidentifiedImageError

        if not os.path.isfile(path):
            raise FileNotFoundError(f"{label} {path}: no such file")
        try:
            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{label} {path}: not a readable image ({e}); pass a PNG or JPEG") from None
        first = self.encode_frames(self.fit_frames(img[None]))  # [1, h, w, C]
        out = np.zeros(self.visual.latent_shape, np.float32)
        out[:1] = first
        return out

    def read_video(self, path: str, label: str = "--video") -> tuple[np.ndarray, np.ndarray | None]:
        """An MP4 -> (frames uint8 ``[num_frames, *size, 3]`` at the codec fps, its audio ``[T]`` or None)."""
        from mmdit.data import media
        from mmdit.data.ingest import resample_frames

        frames, fps, wave, _ = media.read_mp4(path, sample_rate=self.audio_codec.sample_rate)
        frames = resample_frames(frames, fps, self.video_codec.fps)
        if len(frames) < self.num_frames:
            raise ValueError(
                f"{label} {path}: {len(frames)} frames at {self.video_codec.fps:g} fps "
                f"({len(frames) / self.video_codec.fps:.2f} s), but the model needs {self.num_frames} "
                f"({self.num_frames / self.video_codec.fps:.2f} s); pass a longer clip"
            )
        return self.fit_frames(frames[: self.num_frames]), wave

    def video_latents(self, path: str, label: str = "--video") -> np.ndarray:
        """An MP4 -> visual latents ``[F, h, w, C]`` of its first ``num_frames`` frames."""
        return self.encode_frames(self.read_video(path, label)[0])

    def read_audio(self, path: str, label: str = "--audio") -> np.ndarray:
        """An audio file (WAV/FLAC/MP3, librosa) or MP4 (its audio track) -> mono float32 ``[T]`` at the codec rate."""
        from mmdit.data import media

        rate = self.audio_codec.sample_rate
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{label} {path}: no such file")
        if path.lower().endswith(MP4_EXTS):
            wave = media.read_mp4(path, sample_rate=rate)[2]
            if wave is None:
                raise ValueError(f"{label} {path}: the file has no audio stream")
            return wave
        import librosa

        try:
            wave, _ = librosa.load(path, sr=rate, mono=True)
        except Exception as e:  # noqa: BLE001 -- soundfile/audioread raise many types
            raise ValueError(
                f"{label} {path}: cannot decode audio ({type(e).__name__}: {e}); pass a WAV, FLAC, MP3 or MP4 file"
            ) from None
        return wave.astype(np.float32)

    def audio_latents(self, wave: np.ndarray, name: str) -> np.ndarray:
        """Mono wave ``[T]`` -> audio latents ``[L, C]`` (cut or zero-padded to the clip length, with a
        note naming ``name``)."""
        t = self.num_samples
        if len(wave) < t:
            self.note(
                f"{name} is {len(wave) / self.audio_codec.sample_rate:.2f} s; padding with "
                f"silence to {t / self.audio_codec.sample_rate:.2f} s"
            )
            wave = np.pad(wave, (0, t - len(wave)))
        elif len(wave) > t:
            self.note(
                f"{name} is {len(wave) / self.audio_codec.sample_rate:.2f} s; using its first "
                f"{t / self.audio_codec.sample_rate:.2f} s (the clip length), the rest is ignored"
            )
        lat = self.audio_codec.encode(np.asarray(wave[:t], np.float32)[None], sample_rate=self.audio_codec.sample_rate)
        return np.asarray(lat, np.float32)[0]


# ----------------------------------------------------------------------------------------------
# Eval records as the fallback
# ----------------------------------------------------------------------------------------------


class EvalRecords:
    """Examples of a record directory (``mmdit.data.records``), opened on first use; ``path`` None: none.

    Record ``i`` of a batch is example ``i % len`` (a short eval split repeats).
    """

    def __init__(self, path: str | None):
        self.path = path or None
        self._ds = None

    @classmethod
    def of_workdir(cls, workdir: str | None) -> "EvalRecords":
        """A training workdir's eval split, ``W/data/eval`` (none without a workdir)."""
        return cls(os.path.join(workdir, "data", "eval") if workdir else None)

    def available(self) -> bool:
        """Whether the directory holds a record set (its ``manifest.json``)."""
        return bool(self.path) and os.path.isfile(os.path.join(self.path, "manifest.json"))

    def get(self, i: int) -> dict:
        """Example ``i % len`` as a dict of arrays / strings."""
        if self._ds is None:
            from mmdit.data.records import open_dataset

            self._ds = open_dataset(self.path)
            if not len(self._ds):
                raise ValueError(f"{self.path}: the eval dataset is empty")
        return self._ds[i % len(self._ds)]

    def latents(self, stream, num: int) -> np.ndarray:
        """``{stream.name}_latents`` of examples ``0..num-1`` -> float32 ``[num, *stream.latent_shape]``."""
        key = f"{stream.name}_latents"
        out = []
        for i in range(num):
            rec = self.get(i)
            if key not in rec:
                raise ValueError(f"{self.path}: eval records have no {key!r} (keys {sorted(rec)})")
            lat = np.asarray(rec[key], np.float32)
            if lat.shape != tuple(stream.latent_shape):
                raise ValueError(
                    f"{self.path}: {key} has shape {lat.shape}, the model needs {tuple(stream.latent_shape)} "
                    "(eval data from another config?); pass the input flag instead"
                )
            out.append(lat)
        return np.stack(out)

    def texts(self, num: int) -> list[str]:
        """The transcripts of examples ``0..num-1`` (``""`` where a record has none; records whose ``text``
        holds precomputed features keep the transcript as ``transcript``)."""
        out = []
        for i in range(num):
            rec = self.get(i)
            t = rec.get("transcript", rec.get("text", ""))
            out.append(t if isinstance(t, str) else "")
        return out


def _suffix(evals: EvalRecords) -> str:
    return f" (no eval records in {evals.path} to take it from)" if evals.path else ""


# ----------------------------------------------------------------------------------------------
# One task's inputs
# ----------------------------------------------------------------------------------------------


def tile(x: np.ndarray, n: int) -> np.ndarray:
    """``[...]`` -> float32 ``[n, ...]`` (one input shared by a batch)."""
    return np.repeat(np.asarray(x, np.float32)[None], n, axis=0)


def gather_known_latents(
    task: str,
    needed: Sequence[str],
    media: MediaEncoder,
    roles,
    evals: EvalRecords,
    num: int,
    *,
    image: str | None = None,
    audio: str | None = None,
    video: str | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Known latents for the ``needed`` streams of ``task``, from files, else from ``evals``.

    The visual stream comes from ``image`` (ti2av only: its first latent frame) or ``video``; the
    audio stream from ``audio`` (audio file or MP4) or ``video``'s audio track. Each file is encoded
    once and tiled over the batch; eval records give one example per row.

    Returns ``(known, sources)``: ``{stream: float32 [num, *latent_shape]}`` and ``{stream: where it
    came from}``. Raises ValueError naming the missing input when neither files nor records have it.
    """
    known, sources = {}, {}
    for name in needed:
        stream = media.visual if name == roles.visual else media.audio if name == roles.audio else None
        if stream is None:
            raise ValueError(
                f"task {task!r} needs known content for stream {name!r}, which mmdit-sample cannot "
                "read from media files; use the Sampler API with known_latents"
            )
        if name == roles.visual:
            flags = ("--image", "--video") if task == "ti2av" else ("--video",)
            if task == "ti2av" and image:
                known[name], sources[name] = tile(media.image_latents(image), num), f"--image {image}"
            elif video:
                known[name], sources[name] = tile(media.video_latents(video), num), f"--video {video}"
        else:
            flags = ("--audio", "--video")
            if audio:
                wave = media.read_audio(audio)
                known[name], sources[name] = tile(media.audio_latents(wave, f"--audio {audio}"), num), f"--audio {audio}"
            elif video:
                wave = media.read_audio(video, "--video")
                known[name] = tile(media.audio_latents(wave, f"--video {video}"), num)
                sources[name] = f"--video {video} (audio track)"
        if name not in known:
            if not evals.available():
                raise ValueError(f"task {task!r} needs the {name} stream's content: pass {' or '.join(flags)}" + _suffix(evals))
            known[name], sources[name] = evals.latents(stream, num), f"eval records {evals.path}"
    return known, sources


def gather_texts(task: str, num: int, evals: EvalRecords, *, text: str | None = None) -> list[str]:
    """``num`` transcripts: ``text`` for every row, else the eval records'. Raises ValueError without either."""
    if text is not None:
        return [text] * num
    if evals.available():
        return evals.texts(num)
    raise ValueError(f'task {task!r} is conditioned on text: pass --text "..."' + _suffix(evals))


@dataclasses.dataclass
class TaskInputs:
    """Everything ``Sampler.sample`` needs for one task's batch of ``num`` (besides params and settings).

    Fields: ``task``; ``rng`` (the key passed to ``sample``); ``known`` ``{stream: float32 [num,
    *latent_shape]}`` for condition streams and the task's given streams; ``sources`` ``{stream: where
    its content came from}``; ``raw`` (``text_tokens`` int32 ``[num, L]`` when the model has a byte
    text encoder; ``text`` float32 ``[num, L, C]`` + ``text_mask`` bool ``[num, L]`` from the configured
    ``encoders.text`` when it takes precomputed features; else empty); ``texts`` (the ``num``
    transcripts, ``""`` when unconditioned).
    """

    task: str
    rng: Any
    known: dict[str, np.ndarray]
    sources: dict[str, str]
    raw: dict[str, np.ndarray]
    texts: list[str]


def condition_encoders(cfg, spec):
    """The frozen pretrained encoders ``cfg.encoders`` configures for the model ``spec``
    (``mmdit.encoders.registry.ConditionEncoders``, built lazily on first use; empty when none)."""
    from mmdit import config_spec
    from mmdit.encoders.registry import ConditionEncoders

    return ConditionEncoders(config_spec.encoders_spec(cfg, spec))


def task_rng(seed: int, task: str):
    """The sampling key of ``task`` under ``seed``: ``fold_in(key(seed), crc32(task))``."""
    import jax

    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(task.encode()))


def prepare_task_inputs(
    sampler,
    task: str,
    num: int,
    seed: int,
    media: MediaEncoder,
    roles,
    evals: EvalRecords,
    *,
    text: str | None = None,
    image: str | None = None,
    audio: str | None = None,
    video: str | None = None,
    encoders=None,
) -> TaskInputs:
    """Validates ``task`` for media-file sampling and gathers its inputs (nothing is sampled).

    ``sampler`` is the ``mmdit.sample.sampler.Sampler`` that will sample: its task masks (the ones
    ``sample`` draws from the same key) decide which streams need known content and whether the text
    is present. Streams come from :func:`gather_known_latents`, transcripts from :func:`gather_texts`,
    byte-tokenized to ``model.conditions.text.length`` -- or, for a model that takes precomputed text
    features, encoded by the configured ``encoders.text`` (``encoders``: a :func:`condition_encoders`
    object, built from ``sampler.cfg`` when None). Raises ValueError when the task needs a condition
    other than text and media streams, or an input that neither the files nor ``evals`` give.
    """
    import jax

    from mmdit.codecs.text import ByteTokenizer

    model = sampler.model
    spec = model.spec
    text_cfg = spec.condition("text") if "text" in [c.name for c in spec.conditions] else None
    rng = task_rng(seed, task)
    masks = sampler.task_masks(task, jax.random.split(rng)[1], num)  # the masks sample() will draw
    for c, flags in masks.present.items():
        if c != "text" and c not in spec.names and bool(np.any(np.asarray(flags))):
            raise ValueError(
                f"task {task!r} needs condition {c!r}, which mmdit-sample cannot compute from "
                "media files; use the Sampler API with raw_conds"
            )
    needed = [
        a.name
        for a in spec.streams
        if a.geometry.condition or (a.name in spec.generated and bool(np.any(np.asarray(masks.known[a.name]))))
    ]
    known, sources = gather_known_latents(task, needed, media, roles, evals, num, image=image, audio=audio, video=video)
    raw, texts = {}, [""] * num
    if text_cfg is not None and bool(np.any(np.asarray(masks.present.get("text", True)))):
        if model.text_encoder is not None:
            texts = gather_texts(task, num, evals, text=text)
            raw["text_tokens"] = ByteTokenizer().encode_batch(texts, text_cfg.length)
        else:
            encoders = encoders if encoders is not None else condition_encoders(sampler.cfg, spec)
            if encoders.get("text") is None:
                raise ValueError(
                    "this model takes precomputed text features (model.conditions.text without model.text_encoder); "
                    "set encoders.text=dict(kind='umt5', checkpoint=...) to encode --text, or use the Sampler API with raw_conds"
                )
            texts = gather_texts(task, num, evals, text=text)
            feats, mask = encoders.get("text").encode(texts)
            raw["text"], raw["text_mask"] = np.asarray(feats, np.float32), np.asarray(mask, bool)
    elif text_cfg is not None and model.text_encoder is not None:
        raw["text_tokens"] = np.zeros((num, text_cfg.length), np.int32)
    elif text_cfg is not None:  # features path, text dropped by the task: the schema's defaults
        raw["text"] = np.zeros((num, text_cfg.length, text_cfg.dim), np.float32)
    return TaskInputs(task, rng, known, sources, raw, texts)
