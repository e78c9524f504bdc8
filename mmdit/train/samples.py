"""Periodic samples during training: every ``train.sample_every`` steps, one clip per task in
``cfg.sample.tasks`` from the EMA params, logged to TensorBoard as an animated GIF plus its audio."""

from __future__ import annotations

import jax

from mmdit.eval.run import decode, eval_batch


def make_sample_hook(cfg, model, eval_dir: str, num_tasks: int = 2):
    """Returns ``hook(step, state, writer)`` for :func:`mmdit.train.loop.train`."""
    from mmdit.sample.sampler import Sampler

    sampler = Sampler(model, cfg)
    batch = eval_batch(eval_dir, 1)
    known = {"video": batch["video_latents"], "audio": batch["audio_latents"]}
    raw = {"text_tokens": batch["text_tokens"]} if model.text_encoder is not None else {}
    tasks = tuple(cfg.sample.get("tasks", ("t2av",)))[:num_tasks]
    fps = float(cfg.codecs.video.get("fps", 25.0))
    sr = int(cfg.codecs.audio.get("sample_rate", 16000))

    def hook(step, state, writer):
        for i, task in enumerate(tasks):
            lat = sampler.sample(state.ema, jax.random.fold_in(jax.random.key(step), i), task=task, batch=1, known_latents=known, raw_conds=raw)
            frames, waves = decode(cfg, lat)
            writer.video(step, f"samples/{task}", frames[0], fps)
            writer.audio(step, f"samples/{task}_audio", waves[0], sr)
        writer.flush()

    return hook
