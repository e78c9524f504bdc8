"""Sample talking-portrait clips to files: config + params (+ an exported step) -> H.264/AAC MP4s
and ``samples.json``.

:func:`sample_to_files` is what ``mmdit-sample`` runs (:mod:`mmdit.cli.sample`); it takes plain
arguments and a model already loaded by the caller -- a workdir's EMA params
(``mmdit.train.checkpoint.restore_inference_params``) or a serving bundle
(``mmdit.serve.export.load_bundle``: config, params and the exported step). Inputs are gathered
with :mod:`mmdit.sample.inputs` for every task before anything is sampled.

Outputs: ``OUT/<task>_<i>.mp4`` (decoded video at the codec's fps + decoded audio at its rate) and
``OUT/samples.json`` (files, task, text, seed, sampler settings, input sources), both written
atomically.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Callable, Mapping, Sequence


from mmdit import config_spec
from mmdit.sample import inputs as inputs_lib
from mmdit.util import preflight
from mmdit.util.files import chmod_as_umask
from mmdit.util.plain import plain

__all__ = ["with_overrides", "sample_to_files", "Soundtrack"]


class Soundtrack:
    """Decodes a sampled batch to frames and the MP4's audio track.

    A model with an audio stream decodes it with ``codecs.audio``. A video-only model (Mirage,
    TalkingMachines) has no audio stream: its driving audio features are the soundtrack when
    ``codecs.audio_features`` is a decodable codec (the tiny presets' weight-free log-mel), taken from
    the condition stream's latents or the condition's features; otherwise the MP4 is silent (wav2vec2
    features cannot be turned back into sound).
    """

    def __init__(self, roles, audio_codec=None, feature_codec=None, feature_source: tuple[str, str] | None = None):
        self.roles, self.audio_codec, self.feature_codec, self.feature_source = roles, audio_codec, feature_codec, feature_source
        codec = audio_codec or (feature_codec if feature_source else None)
        self.sample_rate = codec.sample_rate if codec is not None else None

    @classmethod
    def from_config(cls, cfg, spec, roles) -> "Soundtrack":
        from mmdit.codecs.registry import make_audio_codec

        codecs = plain(config_spec.complete(cfg).codecs) or {}
        if roles.audio is not None:
            return cls(roles, audio_codec=make_audio_codec(codecs["audio"]))
        if "audio_features" not in codecs:
            return cls(roles)
        streams = {a.name for a in spec.streams if a.geometry.condition}
        conditions = {c.name for c in spec.conditions}
        source = ("stream", "audio_features") if "audio_features" in streams else None
        source = source or (("condition", "audio_features") if "audio_features" in conditions else None)
        return cls(roles, feature_codec=make_audio_codec(codecs["audio_features"]), feature_source=source)

    def decode(self, video_codec, latents: Mapping, raw: Mapping):
        """``latents`` ``{stream: [B, ...]}`` (the condition streams' known content included) and the raw
        conditions -> ``(frames uint8 [B, N, H, W, 3], waves float32 [B, T] or None, sample rate or None)``."""
        import numpy as np

        from mmdit.codecs.clip import to_uint8

        frames = to_uint8(video_codec.decode(np.asarray(latents[self.roles.visual], np.float32)))
        if self.audio_codec is not None:
            lat = np.asarray(latents[self.roles.audio], np.float32)
            return frames, np.asarray(self.audio_codec.decode(lat), np.float32), self.sample_rate
        if self.feature_source is None:
            return frames, None, None
        kind, name = self.feature_source
        feats = latents.get(name) if kind == "stream" else raw.get(name)
        if feats is None:
            return frames, None, None
        return frames, np.asarray(self.feature_codec.decode(np.asarray(feats, np.float32)), np.float32), self.sample_rate


def with_overrides(cfg, overrides: Sequence[str] = (), *, fixed_model: bool = False):
    """A resolved copy of ``cfg`` with ``KEY=VALUE`` overrides applied (``cfg`` itself is not edited).

    ``fixed_model``: the params come with an exported step (a serving bundle), so an override that
    changes ``model.*`` is refused (ValueError).
    """
    from mmdit import config_lib

    model_before = json.dumps(cfg.model.to_dict(), sort_keys=True, default=str)
    cfg = config_lib.override(cfg, list(overrides))
    if fixed_model and json.dumps(cfg.model.to_dict(), sort_keys=True, default=str) != model_before:
        raise ValueError(
            f"--set {list(overrides)} changes model.*, but the bundle's exported step is fixed; drop the "
            "model override or re-export the bundle with mmdit-export"
        )
    return cfg


MP4_BYTES_ESTIMATE = 4 << 20  # free space asked per clip (the demo's clips are ~100 KiB)


def check_sampling_flags(*, num=None, steps=None, shift=None, stream_shift=None) -> None:
    """ValueError naming the flag for a sampler setting out of range (None: the config's, checked by
    config_spec): ``--num`` >= 1, ``--steps`` >= 1, ``--shift`` > 0 and finite."""
    if num is not None and (isinstance(num, bool) or int(num) != num or num < 1):
        raise ValueError(f"--num {num}: sample at least one clip per task (--num >= 1)")
    if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 1):
        raise ValueError(f"--steps {steps}: the sampler needs at least one Euler step (--steps >= 1)")
    if shift is not None and not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"--shift {shift}: the sigma schedule shift must be > 0 (1 = unshifted, 3..5 typical)")
    config_spec.check_stream_shift(stream_shift or {}, list((stream_shift or {}).keys()))


def sample_to_files(
    cfg,
    params,
    out_dir: str,
    *,
    step_fn=None,
    source: str = "",
    overrides: Sequence[str] = (),
    tasks: Sequence[str] | None = None,
    num: int | None = None,
    seed: int | None = None,
    text: str | None = None,
    image: str | None = None,
    audio: str | None = None,
    video: str | None = None,
    ref_audio: str | None = None,
    regions: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    silence: Sequence[tuple[float, float]] | None = None,
    face_box: Sequence[float] | None = None,
    eval_dir: str | None = None,
    steps: int | None = None,
    shift: float | None = None,
    stream_shift: Mapping[str, float] | None = None,
    guidance=None,
    guidance_mode: str | None = None,
    guidance_schedule: str | None = None,
    guidance_interval=None,
    progress: bool = True,
    on_file: Callable[[str], None] | None = None,
    note: Callable[[str], None] | None = None,
) -> list[str]:
    """Samples ``num`` clips of every task and writes them to ``out_dir``; returns the MP4 paths.

    Args:
      cfg, params: the model's config (with ``codecs.video`` / ``codecs.audio``) and its inference params.
      out_dir: output directory (created).
      step_fn: an exported step function (``load_bundle(path).step_fn``); None: the in-process step.
        With it, ``overrides`` may not change ``model.*``.
      source: where the model came from (``samples.json``'s ``model``).
      overrides: ``KEY=VALUE`` config overrides (:func:`with_overrides`).
      tasks: task names (default ``cfg.sample.tasks``); num: clips per task (default
        ``cfg.sample.num_per_task``); seed: default ``cfg.seed``.
      text, image, audio, video: input files / transcript (:func:`mmdit.sample.inputs.gather_known_latents`).
      ref_audio, regions, silence, face_box: TR2AV's reference audio file, the spans task ``inpaint``
        regenerates, the listening phases and the face region of face-local models
        (:func:`mmdit.sample.inputs.prepare_task_inputs`).
      eval_dir: record directory whose examples fill inputs not given (a workdir's ``W/data/eval``).
      steps, shift, stream_shift, guidance, guidance_mode, guidance_schedule, guidance_interval: ``Sampler.sample``
        settings (None: ``cfg.sample``); parse strings with ``mmdit.sample.inputs.parse_*``.
      progress: tqdm bars on stderr.
      on_file: called with each MP4 path once it is written.
      note: receives one-line notes about adjusted inputs (default: stderr).

    Every task is validated and its inputs gathered before anything is sampled. Raises ValueError
    (FileNotFoundError for missing files) on a bad config, task or input.
    """
    from mmdit.data import media
    from mmdit.util.files import write_json_atomic
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.sample.sampler import Sampler
    from mmdit.tasks import roles as task_roles

    cfg = with_overrides(cfg, overrides, fixed_model=step_fn is not None)
    model = DiffusionModel.from_config(cfg)
    spec = model.spec
    roles = task_roles(spec, cfg.model)
    codecs = set(plain(config_spec.complete(cfg).codecs) or {})
    missing = [k for k, needed in (("video", True), ("audio", roles.audio is not None)) if needed and k not in codecs]
    if missing:
        raise ValueError(
            f"the config has no codecs.{' / codecs.'.join(missing)} (codecs section); mmdit-sample needs them to "
            "decode latents (see configs/demo.py)"
        )
    if spec.stream(roles.visual).geometry.kind != "grid":
        raise ValueError(
            f"mmdit-sample writes video MP4s, but this model's visual stream {roles.visual!r} is not a video grid "
            f"(streams {list(spec.names)}); use the Sampler API"
        )
    media_io = inputs_lib.MediaEncoder.from_config(cfg, spec, roles, note=note)
    soundtrack = Soundtrack.from_config(cfg, spec, roles)
    sampler = Sampler(model, cfg, step_fn=step_fn, progress=progress)
    defaults = sampler.defaults  # the validated config.sample
    tasks = [t.strip() for t in (defaults.tasks if tasks is None else tasks)]
    tasks = [t for t in tasks if t]
    check_sampling_flags(num=num, steps=steps, shift=shift)
    num = int(num if num is not None else defaults.num_per_task)
    seed = int(seed if seed is not None else config_spec.complete(cfg).seed)
    evals = inputs_lib.EvalRecords(eval_dir)
    note = note or (lambda m: print(f"note: {m}", file=sys.stderr))
    if text is not None:
        text.encode("utf-8")  # UnicodeEncodeError for undecodable command-line bytes, before any work
        # Byte tokens (the in-model text encoder): one token per byte plus BOS/EOS. A frozen text encoder
        # (encoders.text) tokenizes itself and reports its own truncation.
        byte_text = "text" in cfg.model.conditions and cfg.model.get("text_encoder") is not None
        limit = int(cfg.model.conditions.text.length) - 2 if byte_text else None
        if limit is not None and len(text.encode("utf-8")) > limit:
            note(
                f"--text is {len(text.encode('utf-8'))} bytes; the model reads only the first {limit} "
                f"(model.conditions.text.length={limit + 2} tokens incl. BOS/EOS), the rest is dropped"
            )

    # Validate every task and gather its inputs before sampling anything.
    encoders = inputs_lib.condition_encoders(cfg, spec)  # frozen text encoder (encoders.text), built on first use
    plans = [
        inputs_lib.prepare_task_inputs(
            sampler,
            task,
            num,
            seed,
            media_io,
            roles,
            evals,
            text=text,
            image=image,
            audio=audio,
            video=video,
            encoders=encoders,
            ref_audio=ref_audio,
            regions=regions,
            silence=silence,
            face_box=face_box,
        )
        for task in tasks
    ]
    if regions and "inpaint" not in tasks:
        raise ValueError(f"--inpaint chooses the spans task 'inpaint' regenerates, but the tasks are {tasks}; add --task inpaint")

    if text is None and evals.available() and any(any(p.texts) for p in plans):
        note(f"no --text: the transcripts come from the eval records in {evals.path}")
    preflight.check_output_dir(out_dir, len(plans) * num * MP4_BYTES_ESTIMATE, f"{len(plans) * num} MP4(s)")
    stream_shift = dict(stream_shift) if stream_shift is not None else None
    settings = dict(
        steps=steps,
        shift=shift,
        stream_shift=stream_shift,
        guidance=guidance,
        guidance_mode=guidance_mode,
        guidance_schedule=guidance_schedule,
        guidance_interval=guidance_interval,
    )
    paths, entries = [], []
    for p in plans:
        latents = sampler.sample(
            params, p.rng, task=p.task, batch=num, known_latents=p.known, raw_conds=p.raw, regions=p.regions, **settings
        )
        frames, waves, rate = soundtrack.decode(media_io.video_codec, {**p.known, **latents}, p.raw)
        for i in range(num):
            path = os.path.join(out_dir, f"{p.task}_{i}.mp4")
            media.write_mp4(path, frames[i], media_io.video_codec.fps, None if waves is None else waves[i], rate)
            chmod_as_umask(path)  # media.write_mp4 goes through mkstemp (0600)
            paths.append(path)
            entries.append(
                {
                    "file": os.path.basename(path),
                    "task": p.task,
                    "index": i,
                    "text": p.texts[i],
                    "seed": seed,
                    "inputs": p.sources,
                }
            )
            if on_file is not None:
                on_file(path)
    g = sampler.resolve_guidance(guidance, guidance_mode, guidance_schedule, interval=guidance_interval)
    write_json_atomic(
        os.path.join(out_dir, "samples.json"),
        {
            "model": source,
            "seed": seed,
            "steps": int(steps if steps is not None else defaults.steps),
            "shift": float(shift if shift is not None else defaults.shift),
            "stream_shift": stream_shift or dict(defaults.stream_shift),
            "guidance": dict(g.scales),
            "guidance_order": g.conditions,  # the nested order (the file's keys are written sorted)
            "guidance_mode": g.mode,
            "guidance_schedule": g.schedule,
            "guidance_interval": list(g.interval),
            "fps": media_io.video_codec.fps,
            "sample_rate": soundtrack.sample_rate,
            "samples": entries,
        },
    )
    return paths
