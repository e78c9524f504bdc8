"""``mmdit-data synth``: renders synthetic talking clips, encodes them with the config's codecs and
writes record shards (train and eval splits) ready for ``mmdit-train``.

Each record: ``video_latents`` ``[F, h, w, C]``, ``audio_latents`` ``[L, C]`` (float32),
``text_tokens`` int32 ``[L_text]`` (byte tokenizer), ``text`` (str), ``identity`` (int),
``clip_index`` (int). Train clips use indices ``[0, num)``, eval clips ``[10**6, 10**6 + num_eval)``
so the splits never share a clip.
"""

from __future__ import annotations

import os

import numpy as np

from mmdit import config_spec
from mmdit.codecs.registry import make_audio_codec, make_video_codec
from mmdit.codecs.text import ByteTokenizer
from mmdit.data.records import ShardWriter
from mmdit.data.synthetic import SyntheticWorld, WorldConfig
from mmdit.util.lock import DirLock

EVAL_INDEX_OFFSET = 10**6


def world_from_config(cfg, seed: int | None = None) -> SyntheticWorld:
    w = dict(cfg.world)
    return SyntheticWorld(WorldConfig(seed=int(cfg.seed if seed is None else seed), **w))


def encode_clip(clip, video_codec, audio_codec, text_len: int) -> dict:
    frames = clip.video.astype(np.float32)[None] / 127.5 - 1.0
    video = video_codec.encode(frames, trim=True)[0]
    n_audio = int(round(video_codec.valid_num_frames(clip.video.shape[0]) / video_codec.fps * audio_codec.sample_rate))
    audio = audio_codec.encode(clip.audio[None, :n_audio])[0]
    return {
        "video_latents": np.asarray(video, np.float32),
        "audio_latents": np.asarray(audio, np.float32),
        "text_tokens": ByteTokenizer().encode(clip.text, text_len).astype(np.int32),
        "text": clip.text,
        "identity": int(clip.identity),
    }


def write_split(cfg, out_dir: str, indices, *, progress: bool = True) -> dict:
    world = world_from_config(cfg)
    vc, ac = make_video_codec(cfg.codecs.video), make_audio_codec(cfg.codecs.audio)
    text_len = int(cfg.model.conditions.text.length)
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
    ) as writer:
        for i in indices:
            ex = encode_clip(world.clip(i), vc, ac, text_len)
            ex["clip_index"] = int(i)
            writer.write(ex)
            if bar is not None:
                bar.update(1)
        manifest = writer.close()
    if bar is not None:
        bar.close()
    return manifest


def synth(cfg, out_dir: str, num: int | None = None, num_eval: int | None = None, progress: bool = True) -> dict:
    """Writes ``out_dir/train`` and ``out_dir/eval``; returns their manifests. Holds ``out_dir``'s lock
    (:mod:`mmdit.util.lock`) meanwhile; each split is committed atomically (:class:`ShardWriter`)."""
    data = config_spec.data_spec(cfg)
    num = int(data.num_train if num is None else num)
    num_eval = int(data.num_eval if num_eval is None else num_eval)
    if num < 1 or num_eval < 0:
        raise ValueError(f"synth: num={num} (--num) must be >= 1 and num_eval={num_eval} (--num-eval) >= 0")
    if not config_spec.has_codecs(cfg):
        raise ValueError("the config has no codecs section (codecs.video / codecs.audio): it cannot make data")
    with DirLock(out_dir, command=f"mmdit-data synth --out {os.path.abspath(out_dir)}"):
        out = {"train": write_split(cfg, os.path.join(out_dir, "train"), range(num), progress=progress)}
        if num_eval:
            out["eval"] = write_split(
                cfg, os.path.join(out_dir, "eval"), range(EVAL_INDEX_OFFSET, EVAL_INDEX_OFFSET + num_eval), progress=progress
            )
    return out
