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
from mmdit.codecs.clip import ClipDecoder
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
    """
    from mmdit.sample.sampler import Sampler

    sampler = Sampler(model, cfg)
    batch = eval_batch(eval_dir, 1)
    schema = model.input_spec()
    known, raw = schema.latents_of(batch), schema.conditions_of(batch)
    tasks = sampler.defaults.tasks[:num_tasks]
    decode, r = ClipDecoder.from_config(cfg.codecs), tasks_lib.roles(model.spec, cfg.model)
    gt_frames, gt_waves = decode(known[r.visual], known[r.audio])

    def hook(step, state, writer):
        for i, task in enumerate(tasks):
            lat = sampler.sample(
                state.ema, jax.random.fold_in(jax.random.key(step), i), task=task, batch=1, known_latents=known, raw_conds=raw
            )
            frames, waves = decode(lat[r.visual], lat[r.audio])
            writer.video(step, f"samples/{task}", frames[0], decode.fps)
            writer.audio(step, f"samples/{task}_audio", waves[0], decode.sample_rate)
            writer.video(step, f"contact/{task}", _sheet(task, frames[0], waves[0], gt_frames[0], gt_waves[0])[None], 1.0)
        writer.flush()

    return hook


def _sheet(task: str, frames, wave, gt_frames, gt_wave):
    """Contact sheet uint8 ``[H, W, 3]`` of one sample above its ground truth; the mouth/energy tracks
    are left out for a clip whose portrait or speech cannot be measured (early in training)."""
    clips, waves, mouths, envs = [], [], [], []
    for f, w in ((frames, wave), (gt_frames, gt_wave)):
        try:
            x, mouth, env, _ = clip_tracks(f, w)
            x = np.round(x * 255).astype(np.uint8)  # clip_tracks gives [0, 1]; render reads floats as [-1, 1]
        except ValueError:
            x, mouth, env = f, None, None
        clips.append(x)
        waves.append(w)
        mouths.append(mouth)
        envs.append(env)
    n = min(len(c) for c in clips)
    clips = [c[:n] for c in clips]
    if any(m is None for m in mouths):
        mouths = envs = None
    return contact_sheet.render(clips, waves, mouths, envs, labels=[f"{task} sample", "ground truth"])


def sample_hook_for_workdir(cfg, workdir: str):
    """The TensorBoard sample hook of a run in ``workdir``, or None when there is nothing to sample:
    ``train.sample_every`` unset or 0, no ``codecs`` section, or no eval records to condition on
    (``WORKDIR/data/eval``, written by ``mmdit-data synth``)."""
    eval_dir = os.path.join(workdir, "data", "eval")
    if (
        not config_spec.train_spec(cfg).sample_every
        or not config_spec.has_codecs(cfg)
        or not os.path.exists(os.path.join(eval_dir, "manifest.json"))
    ):
        return None
    from mmdit.model.diffusion import DiffusionModel

    return make_sample_hook(cfg, DiffusionModel.from_config(cfg), eval_dir)
