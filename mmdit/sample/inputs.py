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
        self.visual = spec.stream(roles.visual).geometry
        self.condition_streams = {a.name: a.geometry for a in spec.streams if a.geometry.condition}
        f, h, w, c = self.visual.latent_shape
        s = video_codec.spatial_compression
        self.size = (h * s, w * s)
        self.num_frames = video_codec.num_frames(f)
        if video_codec.latent_channels != c:
            raise ValueError(
                f"codecs.video makes {video_codec.latent_channels} latent channels but "
                f"model.streams.{roles.visual}.channels={c}; fix the config"
            )
        self.audio = self.num_samples = None
        if roles.audio is None or audio_codec is None:  # a video-only model (Mirage, TalkingMachines)
            return
        self.audio = spec.stream(roles.audio).geometry
        self.num_samples = audio_codec.num_samples(self.audio.latent_shape[0])
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

        audio = make_audio_codec(cfg.codecs.audio) if roles.audio is not None else None
        return cls(spec, roles, make_video_codec(cfg.codecs.video), audio, note=note)

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

    def read_audio(self, path: str, label: str = "--audio", sample_rate: int | None = None) -> np.ndarray:
        """An audio file (WAV/FLAC/MP3, librosa) or MP4 (its audio track) -> mono float32 ``[T]`` at
        ``sample_rate`` (default: the audio codec's rate)."""
        from mmdit.data import media

        rate = int(sample_rate) if sample_rate is not None else self.audio_codec.sample_rate
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
        if stream is None and evals.available() and media.condition_streams.get(name) is not None:
            # a condition stream (Mirage's audio features): the eval records' when no file gives it
            known[name], sources[name] = evals.latents(media.condition_streams[name], num), f"eval records {evals.path}"
            continue
        if stream is None:
            flag = CONDITION_FLAGS.get(name)
            if flag is not None:  # e.g. Mirage's audio-feature condition stream
                raise ValueError(f"task {task!r} needs the {name} stream's content: pass {flag}" + _suffix(evals))
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
    regions: dict | None = None  # inpaint: {stream: [(start_s, end_s)]} to regenerate (Sampler.sample(regions=))


def condition_encoders(cfg, spec):
    """The frozen pretrained encoders ``cfg.encoders`` configures for the model ``spec``
    (``mmdit.encoders.registry.ConditionEncoders``, built lazily on first use; empty when none)."""
    from mmdit import config_spec
    from mmdit.encoders.registry import ConditionEncoders

    return ConditionEncoders(config_spec.encoders_spec(cfg, spec))


CONDITION_FLAGS = {"ref_audio": "--ref-audio", "audio_features": "--audio"}  # the flag that supplies each condition


def condition_from_evals(task: str, condition, evals: EvalRecords, num: int) -> dict[str, np.ndarray]:
    """A precomputed condition (``ref_audio``, ``audio_features``, ...) of ``num`` rows from the eval
    records: ``{name: float32 [num, L, C]}`` (+ ``{name}_mask`` when the records hold one). Raises
    ValueError naming the flag that supplies it when there are no records to take it from."""
    name = condition.name
    if not evals.available():
        flag = CONDITION_FLAGS.get(name)
        how = f"pass {flag}" if flag else "use the Sampler API with raw_conds"
        raise ValueError(f"task {task!r} needs condition {name!r}: {how}" + _suffix(evals))
    out = {name: [], name + "_mask": []}
    for i in range(num):
        rec = evals.get(i)
        if name not in rec:
            raise ValueError(f"{evals.path}: eval records have no {name!r} for task {task!r} (keys {sorted(rec)})")
        x = np.asarray(rec[name], np.float32)
        if x.shape != (condition.length, condition.dim):
            raise ValueError(
                f"{evals.path}: {name} has shape {x.shape}, the model reads {(condition.length, condition.dim)} "
                f"(model.conditions.{name}); eval data from another config?"
            )
        out[name].append(x)
        out[name + "_mask"].append(np.asarray(rec.get(name + "_mask", np.ones(condition.length, bool)), bool))
    return {k: np.stack(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Time spans: --inpaint regions, --silence phases; conditions from files (--ref-audio, --audio)
# ----------------------------------------------------------------------------------------------


def _span(text: str, label: str) -> tuple[float, float]:
    """``"1.0-2.5"`` or ``"1.0:2.5"`` -> ``(1.0, 2.5)`` seconds."""
    for sep in (":", "-"):
        a, found, b = text.strip().partition(sep)
        if found:
            try:
                return float(a), float(b)
            except ValueError:
                break
    raise ValueError(f"{label} {text!r}: a span is START-END in seconds, e.g. 1.0-2.5")


def parse_regions(values: Sequence[str] | None) -> dict[str, list[tuple[float, float]]] | None:
    """``--inpaint`` values ``["audio:1.0-2.5", "video:0-0.5,2-3"]`` -> ``{stream: [(start_s, end_s)]}``
    (repeated streams merge); None when none was given. Raises ValueError naming ``--inpaint``."""
    if not values:
        return None
    out: dict[str, list[tuple[float, float]]] = {}
    for value in values:
        stream, sep, spans = value.partition(":")
        if not sep or not stream.strip() or not spans.strip():
            raise ValueError(f"--inpaint {value!r}: use STREAM:START-END[,START-END...] in seconds, e.g. audio:1.0-2.5")
        out.setdefault(stream.strip(), []).extend(_span(t, "--inpaint") for t in spans.split(",") if t.strip())
    return out


def parse_silence(values: Sequence[str] | None) -> list[tuple[float, float]] | None:
    """``--silence`` values ``["0:1.5,3.0:4.0"]`` -> ``[(0.0, 1.5), (3.0, 4.0)]`` seconds; None when not given."""
    if not values:
        return None
    return [_span(t, "--silence") for v in values for t in v.split(",") if t.strip()]


def speaking_frames(spec, silent_spans: Sequence[tuple[float, float]], *, label: str = "--silence") -> np.ndarray:
    """Silence-mode spans in seconds -> the ``speaking_frames`` input int32 ``[F]`` (latent frames of the
    time-reference stream; frame ``k`` covers ``[k/r, (k+1)/r)`` s at its latent rate ``r``): 0 for every
    frame a span overlaps (a listening phase), 1 elsewhere. Raises ValueError naming ``label`` for a model
    without a silence embedding or a span outside the clip."""
    if not any(c.silence_embedding for c in spec.conditions):
        raise ValueError(
            f"{label}: this model has no silence embedding; set model.conditions.<c>.silence_embedding=True "
            "(and train it) to sample listening phases"
        )
    g = spec.stream(spec.time_reference).geometry
    frames, seconds = g.shape[0], g.shape[0] / g.rate
    start = np.arange(frames) / g.rate
    out = np.ones(frames, np.int32)
    for t0, t1 in silent_spans:
        if not (0.0 <= t0 < t1 <= seconds + 1e-6):
            raise ValueError(f"{label}: span {t0:g}-{t1:g} s must satisfy 0 <= start < end <= {seconds:.3f} s (the clip)")
        out[(start < t1) & (start + 1.0 / g.rate > t0)] = 0
    return out


def parse_face_box(value: str | None) -> tuple[float, float, float, float] | None:
    """``--face-box "0.3,0.2,0.7,0.8"`` -> normalised ``(x0, y0, x1, y1)``; None when not given. Raises ValueError."""
    if value is None:
        return None
    try:
        box = tuple(float(v) for v in value.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not (0.0 <= box[0] < box[2] <= 1.0 and 0.0 <= box[1] < box[3] <= 1.0):
        raise ValueError(
            f"--face-box {value!r}: give X0,Y0,X1,Y1 as fractions of the frame, 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1"
        )
    return box  # type: ignore[return-value]


def face_boxes(evals: EvalRecords, num: int, box: Sequence[float] | None = None, *, note: Callable[[str], None] = _stderr_note):
    """The ``face_box`` input float32 ``[num, 4]`` of a face-local model and where it came from: ``box``
    (``--face-box``), else the eval records' ``face_box`` (written by the ingest), else the whole frame
    (with a note: a model trained face-local then lets the audio reach every token)."""
    from mmdit.model.inputs import FACE_BOX, FULL_FRAME_BOX

    if box is not None:
        return np.tile(np.asarray(box, np.float32), (num, 1)), f"--face-box {','.join(f'{v:g}' for v in box)}"
    if evals.available() and FACE_BOX in evals.get(0):
        return np.stack([np.asarray(evals.get(i)[FACE_BOX], np.float32) for i in range(num)]), f"eval records {evals.path}"
    note("no --face-box (and no face boxes in eval records): the face-local audio cross-attention covers the whole frame")
    return np.tile(np.asarray(FULL_FRAME_BOX, np.float32), (num, 1)), "whole frame"


def _fit_wave(wave: np.ndarray, n: int, label: str, rate: int, note: Callable[[str], None]) -> np.ndarray:
    if len(wave) < n:
        note(f"{label} is {len(wave) / rate:.2f} s; padding with silence to {n / rate:.2f} s")
        return np.pad(wave, (0, n - len(wave)))
    if len(wave) > n:
        note(f"{label} is {len(wave) / rate:.2f} s; using its first {n / rate:.2f} s")
    return wave[:n]


def reference_audio_latents(media: MediaEncoder, path: str, condition, label: str = "--ref-audio") -> np.ndarray:
    """UniTalking TR2AV's reference-audio (timbre) condition: an audio file -> the audio codec's latents
    float32 ``[L, C]`` of ``model.conditions.<condition>`` (the file cut or padded to ``L`` latents)."""
    codec = media.audio_codec
    if codec is None:
        raise ValueError(f"{label}: the reference audio is encoded with codecs.audio, which this config lacks")
    wave = media.read_audio(path, label)
    wave = _fit_wave(wave, codec.num_samples(condition.length), f"{label} {path}", codec.sample_rate, media.note)
    lat = np.asarray(codec.encode(np.asarray(wave, np.float32)[None], sample_rate=codec.sample_rate), np.float32)[0]
    if lat.shape != (condition.length, condition.dim):
        raise ValueError(
            f"{label}: codecs.audio makes latents {lat.shape}, but model.conditions.{condition.name} reads "
            f"({condition.length}, {condition.dim}); make the condition's length/dim match the audio codec"
        )
    return lat


def audio_features_of(
    media: MediaEncoder, encoders, path: str, name: str, length: int, feature_codec=None, label: str = "--audio"
) -> tuple[np.ndarray, np.ndarray]:
    """The audio-feature condition (TalkingMachines) or condition stream (Mirage) ``name`` of ``length``
    frames from an audio file: ``(features float32 [length, C], mask bool [length])``. Encoded with
    ``encoders.audio_features`` (wav2vec2) when it feeds ``name``, else with ``feature_codec`` (the config's
    ``codecs.audio_features``, a weight-free stand-in such as the tiny presets' log-mel); the file is cut
    or padded with silence to the condition's duration."""
    spec = (encoders.specs.get("audio_features") if encoders else None) or {}
    if spec.get("condition") == name:
        enc = encoders.get("audio_features")
        wave = media.read_audio(path, label, sample_rate=enc.sample_rate)
        n = int(round(spec["length"] / spec["rate"] * enc.sample_rate))
        feats, mask = enc.encode(_fit_wave(wave, n, f"{label} {path}", enc.sample_rate, media.note)[None], enc.sample_rate)
        return np.asarray(feats, np.float32)[0], np.asarray(mask, bool)[0]
    if feature_codec is None:
        raise ValueError(
            f"{label}: the model's {name!r} input is audio features; set encoders.audio_features=dict(kind='wav2vec2', "
            f"checkpoint=..., condition={name!r}) or codecs.audio_features (a weight-free audio codec) to encode {label}"
        )
    rate = feature_codec.sample_rate
    wave = _fit_wave(
        media.read_audio(path, label, sample_rate=rate), feature_codec.num_samples(length), f"{label} {path}", rate, media.note
    )
    feats = np.asarray(feature_codec.encode(np.asarray(wave, np.float32)[None])[0], np.float32)
    feats = feats[:length] if len(feats) >= length else np.pad(feats, ((0, length - len(feats)), (0, 0)))
    return feats, np.ones(length, bool)


def feature_codec_of(cfg):
    """The config's ``codecs.audio_features`` codec (None when it has none)."""
    from mmdit import config_spec
    from mmdit.codecs.registry import make_audio_codec
    from mmdit.util.plain import plain

    codecs = plain(config_spec.complete(cfg).codecs) or {}
    return make_audio_codec(codecs["audio_features"]) if codecs.get("audio_features") else None


def condition_from_files(task, condition, media, encoders, num, *, ref_audio=None, audio=None, feature_codec=None):
    """``(raw fields {name: [num, L, C], name_mask: [num, L]}, source)`` of a precomputed condition from
    the file flag that supplies it (``--ref-audio`` for ``ref_audio``, ``--audio`` for ``audio_features``),
    or None when that flag was not given."""
    name = condition.name
    if name == "ref_audio" and ref_audio:
        lat = reference_audio_latents(media, ref_audio, condition)
        return {name: tile(lat, num), name + "_mask": np.ones((num, condition.length), bool)}, f"--ref-audio {ref_audio}"
    if name == "audio_features" and audio:
        feats, mask = audio_features_of(media, encoders, audio, name, condition.length, feature_codec)
        return {name: tile(feats, num), name + "_mask": np.repeat(mask[None], num, 0)}, f"--audio {audio}"
    return None


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
    ref_audio: str | None = None,
    regions: dict | None = None,
    silence: Sequence[tuple[float, float]] | None = None,
    face_box: Sequence[float] | None = None,
) -> TaskInputs:
    """Validates ``task`` for media-file sampling and gathers its inputs (nothing is sampled).

    ``sampler`` is the ``mmdit.sample.sampler.Sampler`` that will sample: its task masks (the ones
    ``sample`` draws from the same key) decide which streams need known content and whether the text
    is present. Streams come from :func:`gather_known_latents`, transcripts from :func:`gather_texts`,
    byte-tokenized to ``model.conditions.text.length`` -- or, for a model that takes precomputed text
    features, encoded by the configured ``encoders.text`` (``encoders``: a :func:`condition_encoders`
    object, built from ``sampler.cfg`` when None). Raises ValueError when the task needs a condition
    other than text and media streams, or an input that neither the files nor ``evals`` give.

    ``ref_audio`` (``--ref-audio``): the reference-audio condition of TR2AV, encoded with the audio codec;
    ``audio`` (``--audio``) also feeds an audio-feature condition or condition stream through
    ``encoders.audio_features``; ``regions`` (``--inpaint``, :func:`parse_regions`): the spans task
    ``inpaint`` regenerates; ``silence`` (``--silence``, :func:`parse_silence`): listening phases, as the
    ``speaking_frames`` input (:func:`speaking_frames`); ``face_box`` (``--face-box``): the face region of a
    model with ``face_local`` conditions (:func:`face_boxes`).
    """
    import jax

    from mmdit import tasks as tasks_lib
    from mmdit.codecs.text import ByteTokenizer
    from mmdit.model.inputs import FACE_BOX, SPEAKING_FRAMES

    model = sampler.model
    spec = model.spec
    text_cfg = spec.condition("text") if "text" in [c.name for c in spec.conditions] else None
    rng = task_rng(seed, task)
    masks = sampler.task_masks(task, jax.random.split(rng)[1], num)  # the masks sample() will draw
    if regions and task == "inpaint":
        masks = tasks_lib.with_regions(masks, spec, regions, label="--inpaint")
    encoders = encoders if encoders is not None else condition_encoders(sampler.cfg, spec)
    feature_codec = feature_codec_of(sampler.cfg) if audio else None
    raw, cond_sources = {}, {}
    derived = {c.name for c in spec.conditions if c.derived is not None}  # computed by the model from the latents
    read = {c.name for c in spec.conditions} - derived - {"text"}  # not the streams, not the "joint" keep-name
    for c, flags in masks.present.items():
        if c in read and bool(np.any(np.asarray(flags))):
            found = condition_from_files(
                task, spec.condition(c), media, encoders, num, ref_audio=ref_audio, audio=audio, feature_codec=feature_codec
            )
            if found is None:
                raw.update(condition_from_evals(task, spec.condition(c), evals, num))
                cond_sources[c] = f"eval records {evals.path}"
            else:
                raw.update(found[0])
                cond_sources[c] = found[1]
    if silence:
        raw[SPEAKING_FRAMES] = np.repeat(speaking_frames(spec, silence)[None], num, axis=0)
        cond_sources[SPEAKING_FRAMES] = "--silence " + ",".join(f"{a:g}:{b:g}" for a, b in silence)
    if any(c.face_local for c in spec.conditions):
        raw[FACE_BOX], cond_sources[FACE_BOX] = face_boxes(evals, num, face_box, note=media.note)
    for c in spec.conditions:  # conditions the task leaves out: the schema's zeros (dropped by the masks)
        if c.name != "text" and c.name not in raw and c.name not in derived:
            raw[c.name] = np.zeros((num, c.length, c.dim), np.float32)
    needed = [
        a.name
        for a in spec.streams
        if a.geometry.condition or (a.name in spec.generated and bool(np.any(np.asarray(masks.known[a.name]))))
    ]
    fed = (encoders.specs.get("audio_features") or {}).get("condition") if encoders else None
    fed = fed or "audio_features"  # codecs.audio_features feeds the stream of that name
    stream_known, stream_sources = {}, {}
    if audio and fed in needed and spec.stream(fed).geometry.condition:  # Mirage: --audio -> the feature stream
        feats, _ = audio_features_of(media, encoders, audio, fed, spec.stream(fed).geometry.shape[0], feature_codec)
        stream_known[fed], stream_sources[fed] = tile(feats, num), f"--audio {audio} (audio features)"
        needed = [n for n in needed if n != fed]
    known, sources = gather_known_latents(task, needed, media, roles, evals, num, image=image, audio=audio, video=video)
    known, sources = {**known, **stream_known}, {**sources, **stream_sources}
    texts = [""] * num
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
    if task == "inpaint" and regions:
        cond_sources["regions"] = "--inpaint " + ",".join(f"{n}:{a:g}-{b:g}" for n, spans in regions.items() for a, b in spans)
    return TaskInputs(task, rng, known, {**sources, **cond_sources}, raw, texts, regions if task == "inpaint" else None)
