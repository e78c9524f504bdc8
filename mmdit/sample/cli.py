"""``mmdit-sample``: sample talking-portrait clips (H.264 + AAC MP4s) from a workdir or a bundle.

::

    mmdit-sample --workdir W [--task t2av,ti2av] [--text "..."] [--out W/samples]
    mmdit-sample --bundle B --task ti2av --text "..." --image face.png --out OUT
    mmdit-sample --bundle B --task a2v --audio speech.wav --text "..." --out OUT
    mmdit-sample --bundle B --task tv2a --video clip.mp4 --guidance "text=video:4,audio:3" --out OUT

Model: ``--workdir`` restores the EMA params and config of a training run
(``mmdit.train.checkpoint.restore_inference_params``); ``--bundle`` uses a serving bundle alone
(config, params and the exported step, ``mmdit/serve/export.py``).

Inputs a task needs (the content of its known streams, and the text): ``--text``; ``--image`` PNG/JPEG
(ti2av: the first frame, centre-cropped and resized to the model's frame size); ``--video`` MP4
(tv2a, inpaint; resampled to the codec's fps and resized, its first frames used; its audio track
also serves as the audio when ``--audio`` is absent); ``--audio`` WAV/FLAC/MP3 (librosa) or MP4
(PyAV), resampled to the audio codec's rate, cut or zero-padded to the clip length. A missing input
is taken from the workdir's eval records (``W/data/eval``) when there are some, else it is an error
naming the flag. Inputs are encoded with the config's codecs and text is byte-tokenized to
``model.conditions.text.length``.

Outputs: ``OUT/<task>_<i>.mp4`` (decoded video at the codec's fps + decoded audio) and
``OUT/samples.json`` (files, task, text, seed, sampler settings, input sources), both written
atomically; the MP4 paths are printed, one per line. Progress goes to stderr (tqdm).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib

import numpy as np

_MP4_EXTS = (".mp4", ".mov", ".m4v", ".mkv", ".webm")


# ----------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------


def parse_guidance(values: list[str] | None) -> dict | None:
    """``--guidance`` values -> ordered ``{cond: s}`` / ``{cond: {stream: s}}`` (None: not given).

    Forms: ``text=3``; ``text=video:4,audio:3``; several conditions separated by ``;`` or given as
    repeated flags (order = nested-CFG order); ``none`` = no guidance.
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
                raise ValueError(f"--guidance {item!r}: expected COND=SCALE or COND=STREAM:SCALE,STREAM:SCALE "
                                 "(e.g. text=3 or text=video:4,audio:3)")
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmdit-sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir: restore its EMA params (latest checkpoint)")
    src.add_argument("--bundle", help="serving bundle directory written by mmdit-export")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to restore (--workdir; default latest)")
    p.add_argument("--task", action="append", help="task(s), comma-separated or repeated (default: sample.tasks)")
    p.add_argument("--text", help="transcript / prompt (byte-tokenized)")
    p.add_argument("--image", help="first frame for ti2av (PNG/JPEG)")
    p.add_argument("--audio", help="driving audio for a2v (WAV/FLAC/MP3 or MP4)")
    p.add_argument("--video", help="driving video for tv2a / inpaint (MP4)")
    p.add_argument("--num", type=int, default=None, help="samples per task (default: sample.num_per_task)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: config seed)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: sample.steps)")
    p.add_argument("--shift", type=float, default=None, help="sigma schedule shift (default: sample.shift)")
    p.add_argument("--stream-shift", action="append", metavar="STREAM=SHIFT",
                   help="per-stream schedule shift overriding --shift, e.g. 'audio=1' (smaller: denoised ahead; "
                        "default: sample.stream_shift)")
    p.add_argument("--guidance", action="append",
                   help="CFG scales: 'text=3', 'text=video:4,audio:3', ';'-separated conditions, or 'none'")
    p.add_argument("--guidance-schedule", choices=("constant", "cosine"), default=None)
    p.add_argument("--guidance-mode", choices=("nested", "independent"), default=None)
    p.add_argument("--out", help="output directory (default: WORKDIR/samples; required with --bundle)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


class _Media:
    """Reads and encodes user media for one model (codecs + stream shapes)."""

    def __init__(self, spec, roles, video_codec, audio_codec):
        self.video_codec, self.audio_codec = video_codec, audio_codec
        self.visual, self.audio = spec.stream(roles.visual).spec, spec.stream(roles.audio).spec
        f, h, w, c = self.visual.latent_shape
        s = video_codec.spatial_compression
        self.size = (h * s, w * s)
        self.num_frames = video_codec.num_frames(f)
        self.num_samples = audio_codec.num_samples(self.audio.latent_shape[0])
        if video_codec.latent_channels != c:
            raise ValueError(f"codecs.video makes {video_codec.latent_channels} latent channels but "
                             f"model.streams.{roles.visual}.channels={c}; fix the config")
        if audio_codec.latent_channels != self.audio.latent_shape[-1]:
            raise ValueError(f"codecs.audio makes {audio_codec.latent_channels} latent channels but "
                             f"model.streams.{roles.audio}.channels={self.audio.latent_shape[-1]}; fix the config")
        if audio_codec.latent_length(self.num_samples) != self.audio.latent_shape[0]:
            raise ValueError(f"codecs.audio does not map {self.num_samples} samples to "
                             f"{self.audio.latent_shape[0]} latents (model.streams.{roles.audio}.shape)")

    def _fit_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` -> centre-cropped to the model's aspect, resized to its size."""
        from mmdit.data.ingest import resize_frames

        th, tw = self.size
        n, h, w, _ = frames.shape
        if h * tw > w * th:  # too tall
            ch = max(1, round(w * th / tw))
            frames = frames[:, (h - ch) // 2:(h - ch) // 2 + ch]
        elif h * tw < w * th:
            cw = max(1, round(h * tw / th))
            frames = frames[:, :, (w - cw) // 2:(w - cw) // 2 + cw]
        return resize_frames(np.ascontiguousarray(frames), (th, tw))

    def _encode_frames(self, frames: np.ndarray) -> np.ndarray:
        x = frames.astype(np.float32)[None] / 127.5 - 1.0
        return np.asarray(self.video_codec.encode(x), np.float32)[0]

    def image_latents(self, path: str) -> np.ndarray:
        """--image -> visual latents ``[F, h, w, C]``: latent frame 0 from the image, zeros after."""
        from PIL import Image, UnidentifiedImageError

        if not os.path.isfile(path):
            raise FileNotFoundError(f"--image {path}: no such file")
        try:
            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"--image {path}: not a readable image ({e}); pass a PNG or JPEG") from None
        first = self._encode_frames(self._fit_frames(img[None]))  # [1, h, w, C]
        out = np.zeros(self.visual.latent_shape, np.float32)
        out[:1] = first
        return out

    def read_video(self, path: str):
        """--video -> (frames uint8 [N, H, W, 3] at the codec fps and size, wave or None)."""
        from mmdit.data import media
        from mmdit.data.ingest import resample_frames

        frames, fps, wave, _ = media.read_mp4(path, sample_rate=self.audio_codec.sample_rate)
        frames = resample_frames(frames, fps, self.video_codec.fps)
        if len(frames) < self.num_frames:
            raise ValueError(f"--video {path}: {len(frames)} frames at {self.video_codec.fps:g} fps "
                             f"({len(frames) / self.video_codec.fps:.2f} s), but the model needs {self.num_frames} "
                             f"({self.num_frames / self.video_codec.fps:.2f} s); pass a longer clip")
        return self._fit_frames(frames[: self.num_frames]), wave

    def video_latents(self, path: str) -> np.ndarray:
        return self._encode_frames(self.read_video(path)[0])

    def read_audio(self, path: str, flag: str = "--audio") -> np.ndarray:
        """An audio (or MP4) file -> mono float32 ``[T]`` at the codec rate."""
        from mmdit.data import media

        rate = self.audio_codec.sample_rate
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {path}: no such file")
        if path.lower().endswith(_MP4_EXTS):
            wave = media.read_mp4(path, sample_rate=rate)[2]
            if wave is None:
                raise ValueError(f"{flag} {path}: the file has no audio stream")
            return wave
        import librosa

        try:
            wave, _ = librosa.load(path, sr=rate, mono=True)
        except Exception as e:  # noqa: BLE001 -- soundfile/audioread raise many types
            raise ValueError(f"{flag} {path}: cannot decode audio ({type(e).__name__}: {e}); pass a WAV, FLAC, "
                             "MP3 or MP4 file") from None
        return wave.astype(np.float32)

    def audio_latents(self, wave: np.ndarray, name: str) -> np.ndarray:
        """Mono wave -> audio latents ``[L, C]`` (cut, or zero-padded with a note, to the clip length)."""
        t = self.num_samples
        if len(wave) < t:
            print(f"mmdit-sample: {name} is {len(wave) / self.audio_codec.sample_rate:.2f} s; padding with "
                  f"silence to {t / self.audio_codec.sample_rate:.2f} s", file=sys.stderr)
            wave = np.pad(wave, (0, t - len(wave)))
        lat = self.audio_codec.encode(np.asarray(wave[:t], np.float32)[None], sample_rate=self.audio_codec.sample_rate)
        return np.asarray(lat, np.float32)[0]


class _EvalRecords:
    """The workdir's eval examples (``W/data/eval``), when there are some."""

    def __init__(self, workdir: str | None):
        self.path = os.path.join(workdir, "data", "eval") if workdir else None
        self._ds = None

    def available(self) -> bool:
        return bool(self.path) and os.path.isfile(os.path.join(self.path, "manifest.json"))

    def get(self, i: int) -> dict:
        if self._ds is None:
            from mmdit.data.records import open_dataset

            self._ds = open_dataset(self.path)
            if not len(self._ds):
                raise ValueError(f"{self.path}: the eval dataset is empty")
        return self._ds[i % len(self._ds)]


def _tile(x: np.ndarray, n: int) -> np.ndarray:
    return np.repeat(np.asarray(x, np.float32)[None], n, axis=0)


def _eval_latents(evals: _EvalRecords, stream, num: int) -> np.ndarray:
    key = f"{stream.name}_latents"
    out = []
    for i in range(num):
        rec = evals.get(i)
        if key not in rec:
            raise ValueError(f"{evals.path}: eval records have no {key!r} (keys {sorted(rec)})")
        lat = np.asarray(rec[key], np.float32)
        if lat.shape != tuple(stream.latent_shape):
            raise ValueError(f"{evals.path}: {key} has shape {lat.shape}, the model needs {tuple(stream.latent_shape)} "
                             "(eval data from another config?); pass the input flag instead")
        out.append(lat)
    return np.stack(out)


def _gather(task, needed, args, media, roles, evals, num) -> tuple[dict, dict]:
    """Known latents ``{stream: [num, ...]}`` for the ``needed`` streams, and their sources."""
    known, sources = {}, {}
    for name in needed:
        stream = media.visual if name == roles.visual else media.audio if name == roles.audio else None
        if stream is None:
            raise ValueError(f"task {task!r} needs known content for stream {name!r}, which mmdit-sample cannot "
                             "read from media files; use the Sampler API with known_latents")
        if name == roles.visual:
            flags = ("--image", "--video") if task == "ti2av" else ("--video",)
            if task == "ti2av" and args.image:
                known[name], sources[name] = _tile(media.image_latents(args.image), num), f"--image {args.image}"
            elif args.video:
                known[name], sources[name] = _tile(media.video_latents(args.video), num), f"--video {args.video}"
        else:
            flags = ("--audio", "--video")
            if args.audio:
                wave = media.read_audio(args.audio)
                known[name], sources[name] = _tile(media.audio_latents(wave, f"--audio {args.audio}"), num), f"--audio {args.audio}"
            elif args.video:
                wave = media.read_audio(args.video, "--video")
                known[name] = _tile(media.audio_latents(wave, f"--video {args.video}"), num)
                sources[name] = f"--video {args.video} (audio track)"
        if name not in known:
            if not evals.available():
                raise ValueError(f"task {task!r} needs the {name} stream's content: pass {' or '.join(flags)}"
                                 + (f" (no eval records in {evals.path} to take it from)" if evals.path else ""))
            known[name], sources[name] = _eval_latents(evals, stream, num), f"eval records {evals.path}"
    return known, sources


def _texts(task, args, evals, num) -> list[str]:
    if args.text is not None:
        return [args.text] * num
    if evals.available():
        return [str(evals.get(i).get("text", "")) for i in range(num)]
    raise ValueError(f"task {task!r} is conditioned on text: pass --text \"...\""
                     + (f" (no eval records in {evals.path} to take it from)" if evals.path else ""))


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def _load(args):
    """-> (cfg, params, step_fn or None, source description)."""
    if args.bundle:
        from mmdit.serve.export import load_bundle

        b = load_bundle(args.bundle)
        return b.config, b.params, b.step_fn, f"bundle {b.path}"
    try:
        from mmdit.train.checkpoint import restore_inference_params
    except ImportError as e:
        raise ValueError(f"--workdir needs mmdit.train.checkpoint ({e}); use --bundle instead") from None
    cfg, params = restore_inference_params(args.workdir, step=args.step)
    return cfg, params, None, f"workdir {os.path.abspath(args.workdir)}"


def run(args) -> list[str]:
    """Samples every requested task; returns the MP4 paths. Raises ValueError on bad inputs."""
    import jax

    from mmdit import config_lib
    from mmdit.codecs.registry import make_audio_codec, make_video_codec
    from mmdit.codecs.text import ByteTokenizer
    from mmdit.data import media
    from mmdit.data.records import write_json_atomic
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.sample.sampler import Sampler
    from mmdit.tasks import roles as task_roles

    guidance = parse_guidance(args.guidance)
    if args.bundle and not args.out:
        raise ValueError("--out is required with --bundle")
    cfg, params, step_fn, source = _load(args)
    cfg = cfg.copy_and_resolve_references()  # --set must not edit the caller's config
    model_before = json.dumps(cfg.model.to_dict(), sort_keys=True, default=str)
    config_lib.override(cfg, args.set)
    if step_fn is not None and json.dumps(cfg.model.to_dict(), sort_keys=True, default=str) != model_before:
        raise ValueError(f"--set {args.set} changes model.*, but the bundle's exported step is fixed; drop the "
                         "model override or re-export the bundle with mmdit-export")
    out_dir = args.out or os.path.join(args.workdir, "samples")
    if "codecs" not in cfg:
        raise ValueError("the config has no codecs section (codecs.video / codecs.audio); mmdit-sample needs them to "
                         "decode latents")

    model = DiffusionModel.from_config(cfg)
    spec = model.spec
    roles = task_roles(spec, cfg.model)
    if spec.stream(roles.visual).spec.kind != "grid" or roles.audio is None:
        raise ValueError(f"mmdit-sample writes video + audio MP4s, but this model's streams are {list(spec.names)} "
                         f"(visual {roles.visual!r}, audio {roles.audio!r}); use the Sampler API")
    media_io = _Media(spec, roles, make_video_codec(cfg.codecs.video), make_audio_codec(cfg.codecs.audio))
    sampler = Sampler(model, cfg, step_fn=step_fn, progress=not args.no_progress)
    sample_cfg = cfg.get("sample", {})
    tasks = [t.strip() for v in (args.task or [",".join(sample_cfg.get("tasks", ("t2av",)))]) for t in v.split(",")]
    tasks = [t for t in tasks if t]
    num = int(args.num if args.num is not None else sample_cfg.get("num_per_task", 1))
    seed = int(args.seed if args.seed is not None else cfg.get("seed", 0))
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    evals = _EvalRecords(args.workdir)
    text_cfg = spec.condition("text") if "text" in [c.name for c in spec.conditions] else None

    # Validate every task and gather its inputs before sampling anything.
    plans = []
    for task in tasks:
        rng = jax.random.fold_in(jax.random.key(seed), zlib.crc32(task.encode()))
        masks = sampler.task_masks(task, jax.random.split(rng)[1], num)  # the masks sample() will draw
        for c, flags in masks.present.items():
            if c != "text" and c not in spec.names and bool(np.any(np.asarray(flags))):
                raise ValueError(f"task {task!r} needs condition {c!r}, which mmdit-sample cannot compute from "
                                 "media files; use the Sampler API with raw_conds")
        needed = [a.name for a in spec.streams
                  if a.spec.condition or (a.name in spec.generated and bool(np.any(np.asarray(masks.known[a.name]))))]
        known, sources = _gather(task, needed, args, media_io, roles, evals, num)
        raw, texts = {}, [""] * num
        if text_cfg is not None and bool(np.any(np.asarray(masks.present.get("text", True)))):
            if model.text_encoder is None:
                raise ValueError("this model takes precomputed text features (model.conditions.text without "
                                 "model.text_encoder); mmdit-sample supports only the byte text path")
            texts = _texts(task, args, evals, num)
            raw["text_tokens"] = ByteTokenizer().encode_batch(texts, text_cfg.length)
        elif text_cfg is not None and model.text_encoder is not None:
            raw["text_tokens"] = np.zeros((num, text_cfg.length), np.int32)
        plans.append((task, rng, known, sources, raw, texts))

    os.makedirs(out_dir, exist_ok=True)
    stream_shift = parse_stream_shift(args.stream_shift)
    settings = dict(steps=args.steps, shift=args.shift, stream_shift=stream_shift, guidance=guidance, guidance_mode=args.guidance_mode,
                    guidance_schedule=args.guidance_schedule)
    paths, entries = [], []
    for task, rng, known, sources, raw, texts in plans:
        latents = sampler.sample(params, rng, task=task, batch=num, known_latents=known, raw_conds=raw, **settings)
        frames = np.asarray(media_io.video_codec.decode(np.asarray(latents[roles.visual])), np.float32)
        frames = np.clip(np.round((frames + 1.0) * 127.5), 0, 255).astype(np.uint8)
        waves = np.asarray(media_io.audio_codec.decode(np.asarray(latents[roles.audio])), np.float32)
        for i in range(num):
            path = os.path.join(out_dir, f"{task}_{i}.mp4")
            media.write_mp4(path, frames[i], media_io.video_codec.fps, waves[i], media_io.audio_codec.sample_rate)
            paths.append(path)
            entries.append({"file": os.path.basename(path), "task": task, "index": i, "text": texts[i],
                            "seed": seed, "inputs": sources})
            print(path, flush=True)
    g = sampler.resolve_guidance(guidance, args.guidance_mode, args.guidance_schedule)
    write_json_atomic(os.path.join(out_dir, "samples.json"), {
        "model": source, "seed": seed,
        "steps": int(args.steps if args.steps is not None else sample_cfg.get("steps", 30)),
        "shift": float(args.shift if args.shift is not None else sample_cfg.get("shift", 1.0)),
        "stream_shift": stream_shift or dict(sample_cfg.get("stream_shift", None) or {}),
        "guidance": dict(g.scales), "guidance_mode": g.mode, "guidance_schedule": g.schedule,
        "fps": media_io.video_codec.fps, "sample_rate": media_io.audio_codec.sample_rate,
        "samples": entries,
    })
    return paths


def parse_stream_shift(items) -> dict[str, float] | None:
    """``['audio=1', 'video=3']`` -> ``{'audio': 1.0, 'video': 3.0}``; None when no flag was given."""
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


def main(argv=None) -> int:
    """Console entry point ``mmdit-sample`` (see the module docstring)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        parser.exit(2, f"mmdit-sample: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
