"""Periodic samples during training: every ``train.sample_every`` steps, one clip per task in
``cfg.sample.tasks`` from the EMA params, logged to TensorBoard as an animated GIF plus its audio.

Training does not import this module: the caller (``mmdit-train``, ``mmdit demo``) builds the hook
with :func:`sample_hook_for_workdir` and passes it to ``mmdit.train.loop.train(..., sample_hook=)``.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from mmdit import config_spec
from mmdit import tasks as tasks_lib
from mmdit.codecs.registry import make_video_codec
from mmdit.eval import contact_sheet
from mmdit.eval.lipsync import clip_tracks
from mmdit.eval.run import eval_batch

__all__ = ["make_sample_hook", "sample_hook_for_workdir"]


def make_sample_hook(cfg, model, eval_dir: str, num_tasks: int = 2):
    """Returns ``hook(step, state, writer)`` for :func:`mmdit.train.loop.train`.

    The first ``num_tasks`` tasks of ``cfg.sample.tasks`` are sampled from ``state.ema`` on the first
    example of ``eval_dir`` (batch 1, key ``fold_in(key(step), task index)``) and logged as
    ``samples/<task>`` (frames ``[N, H, W, 3]`` at the codec fps) and ``samples/<task>_audio``, plus
    ``contact/<task>``: a contact sheet (:mod:`mmdit.eval.contact_sheet`) of the sample above the ground
    truth of the same eval clip, frames over time with the mel spectrogram and mouth/energy tracks.

    The sound is the audio stream's (``codecs.audio``) or, for a video-only model (Mirage,
    TalkingMachines), its driving audio decoded from the audio features
    (:class:`mmdit.sample.run.Soundtrack`, as ``mmdit sample`` writes it); features that cannot be
    decoded (wav2vec2) leave the samples silent: no ``_audio`` summary, a flat track on the sheet.
    """
    from mmdit.sample.run import Soundtrack
    from mmdit.sample.sampler import Sampler

    sampler = Sampler(model, cfg)
    batch = eval_batch(eval_dir, 1)
    schema = model.input_spec()
    known, raw = schema.latents_of(batch), schema.conditions_of(batch)
    tasks = sampler.defaults.tasks[:num_tasks]
    video_codec = make_video_codec(config_spec.complete(cfg).codecs.video)
    track = Soundtrack.from_config(cfg, model.spec, tasks_lib.roles(model.spec, cfg.model))
    fps = float(video_codec.fps)

    def decode(latents):  # -> frames uint8 [N, H, W, 3], wave float32 [T] or None (silent)
        frames, waves, _ = track.decode(video_codec, {**known, **latents}, raw)
        return frames[0], None if waves is None else waves[0]

    gt_frames, gt_wave = decode(known)

    def hook(step, state, writer):
        for i, task in enumerate(tasks):
            lat = sampler.sample(
                state.ema, jax.random.fold_in(jax.random.key(step), i), task=task, batch=1, known_latents=known, raw_conds=raw
            )
            frames, wave = decode(lat)
            writer.video(step, f"samples/{task}", frames, fps)
            if wave is not None:
                writer.audio(step, f"samples/{task}_audio", wave, track.sample_rate)
            sheet = _sheet(task, (frames, wave), (gt_frames, gt_wave), fps, track.sample_rate)
            writer.video(step, f"contact/{task}", sheet[None], 1.0)
        writer.flush()

    return hook


SILENT_RATE = 16000  # Hz of the flat track drawn for a silent clip


def _sheet(task: str, sample, truth, fps: float, sample_rate: int | None):
    """Contact sheet uint8 ``[H, W, 3]`` of one sample above its ground truth, each ``(frames uint8
    [N, H, W, 3], wave float32 [T] at sample_rate Hz, or None when silent)``. The mouth/energy tracks
    are left out for a clip whose portrait or speech cannot be measured (early in training, a silent
    model, or a rate the lip-sync metric is not defined at)."""
    clips, waves, mouths, envs = [], [], [], []
    for f, w in (sample, truth):
        x, mouth, env = f, None, None
        if w is None:
            w = np.zeros(int(round(len(f) / fps * SILENT_RATE)), np.float32)
        else:
            try:
                whole_fps = int(fps) if float(fps).is_integer() else fps  # the metric slices by samples per frame
                x, mouth, env, _ = clip_tracks(f, w, fps=whole_fps, sample_rate=sample_rate)
                x = np.round(x * 255).astype(np.uint8)  # clip_tracks gives [0, 1]; render reads floats as [-1, 1]
            except ValueError:
                pass
        clips.append(x)
        waves.append(w)
        mouths.append(mouth)
        envs.append(env)
    n = min(len(c) for c in clips)
    clips = [c[:n] for c in clips]
    if any(m is None for m in mouths):
        mouths = envs = None
    labels = [f"{task} sample", "ground truth"]
    return contact_sheet.render(clips, waves, mouths, envs, labels=labels, sample_rate=sample_rate or SILENT_RATE)


def sample_hook_for_workdir(cfg, workdir: str):
    """The TensorBoard sample hook of a run in ``workdir``, or None when there is nothing to sample:
    ``train.sample_every`` unset or 0, no codecs to decode the model's streams
    (:func:`mmdit.config_spec.has_codecs`: ``codecs.video``, and ``codecs.audio`` for a model with an
    audio stream), or no eval records to condition on (``WORKDIR/data/eval``, written by
    ``mmdit data synth`` or ``mmdit data ingest``)."""
    eval_dir = os.path.join(workdir, "data", "eval")
    if (
        not config_spec.train_spec(cfg).sample_every
        or not config_spec.has_codecs(cfg)
        or not os.path.exists(os.path.join(eval_dir, "manifest.json"))
    ):
        return None
    from mmdit.model.diffusion import DiffusionModel

    return make_sample_hook(cfg, DiffusionModel.from_config(cfg), eval_dir)
