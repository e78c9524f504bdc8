"""The embedded default: a tiny twin video/audio MM-DiT on the synthetic talking world, sized to
train on 2 CPU cores in minutes (``mmdit demo``).

World: 32x32 faces at 25 fps speaking 1.96 s utterances (49 frames) at 16 kHz.
Codecs (weight-free): ``pixels`` (8x space-to-depth + DCT: 6 luma + 1 + 1 chroma coefficients per
block, one latent frame per video frame) -> 49 x 4 x 4 x 8 video latents -> 49 tokens (patch 1x4x4,
a token per frame); ``mel`` (64 bands, 25 Hz) -> 49 x 128 audio latents -> 49 tokens. Every video
token has a same-instant audio token, and the joint mask ``local(1)`` (JAM-Flow's localized joint
attention) lets a token see the other stream only within +-1 frame, so lip-sync is learnable in
minutes on CPU.

Why not Wan's 4-frame groups (``temporal=4``, what ``configs/unitalking.py`` uses at scale)? A
grouped video token carries 4 frames in its channels, and an audio token, whose RoPE only gives
*relative* time, cannot tell which of the 4 is its own; ``mmdit.eval.cross_stream`` measured such
tiny models ignoring the partner's timing entirely after 4000 steps (lip sync at chance), while
per-frame tokens with the local mask learn it in a few hundred.

Text: byte tokens through a small trainable encoder, cross-attended by both streams.
Variants: ``tiny`` (tests: 2 layers, 48-wide, 17 frames, few steps).
"""

from mmdit import config_lib


def get_config(arg=None):
    v = config_lib.parse_arg(arg, tiny=False)
    c = config_lib.sibling(__file__, "base")

    size, fps = 32, 25
    frames = 49  # 1 + 4k frames at 25 fps
    dim, ffn, layers, heads = 128, 512, 4, 4
    text_dim, text_len = 64, 48
    if v.tiny:
        frames = 17
        dim, ffn, layers, heads = 48, 96, 2, 2
        text_dim, text_len = 32, 24
    seconds = frames / fps
    latent_hw = size // 8

    c.world = dict(video_size=size, fps=fps, sample_rate=16000, min_seconds=seconds, max_seconds=seconds, num_identities=16)
    c.codecs = dict(
        video=dict(kind="pixels", spatial=8, temporal=1, fps=25.0, luma_coeffs=6, chroma_coeffs=1),
        audio=dict(kind="mel", sample_rate=16000, hop_length=320, n_mels=64, stack=2),
    )
    c.clip.seconds = seconds
    c.model.streams.video = dict(
        kind="grid",
        channels=8,
        shape=(frames, latent_hw, latent_hw),
        patch=(1, latent_hw, latent_hw),
        rate=25.0,
        dim=dim,
        ffn=ffn,
        cross=("text",),
    )
    c.model.streams.audio = dict(
        kind="sequence", channels=128, shape=(frames,), patch=(1,), rate=25.0, dim=dim, ffn=ffn, cross=("text",)
    )
    c.model.conditions.text = dict(dim=text_dim, length=text_len)
    c.model.text_encoder = dict(kind="byte", layers=2, heads=2)
    c.model.num_layers = layers
    c.model.heads = heads
    c.model.mask = "local(1) & no_peek"

    c.tasks = dict(t2av=0.55, ti2av=0.15, tv2a=0.15, a2v=0.15)
    c.flow.condition_dropout = dict(text=0.1)
    c.flow.shift = 3.0  # train mostly at high noise, where the speech rhythm (and so the sync) is laid out
    c.flow.independent_streams = 0.5  # half the samples noise audio and video independently

    c.sample.steps = 25
    c.sample.shift = 3.0
    c.sample.guidance = dict(text=dict(video=2.0, audio=2.0))
    c.sample.tasks = ("t2av", "ti2av", "tv2a", "a2v")
    c.sample.num_per_task = 8

    c.data.num_train = 512
    c.data.num_eval = 16
    c.data.examples_per_shard = 128
    c.train.steps = 2400
    c.train.global_batch_size = 8
    c.train.lr = 1e-3
    c.train.log_every = 25
    c.train.checkpoint_every = 400
    c.train.sample_every = 800

    if v.tiny:
        c.sample.steps = 4
        c.sample.num_per_task = 1
        c.data.num_train, c.data.num_eval = 16, 4
        c.train.steps = 6
        c.train.global_batch_size = 2
        c.train.warmup_steps = 2
        c.train.ema_decay = 0.5
        c.train.log_every = 1
        c.train.checkpoint_every = 3
        c.train.sample_every = 6
    return c
