"""The embedded default: a tiny twin video/audio MM-DiT on the synthetic talking world, sized to
train on 2 CPU cores in minutes (``mmdit demo``).

World: 64x64 faces at 25 fps speaking 1.96 s utterances (49 frames = 1 + 4*12) at 16 kHz.
Codecs (weight-free): ``pixels`` (8x space-to-depth + DCT, 4-frame groups) -> 13 x 8 x 8 x 64
video latents -> 208 tokens (patch 1x2x2); ``mel`` (64 bands, 25 Hz) -> 49 x 128 audio latents.
Text: byte tokens through a small trainable encoder, cross-attended by both streams.
Args: ``tiny`` (tests: 2 layers, 48-wide, 32x32 video, few steps).
"""

from mmdit import config_lib


def get_config(arg=None):
    c = config_lib.sibling(__file__, "base")
    tiny = arg == "tiny"
    size = 64 if not tiny else 32
    seconds = 49 / 25 if not tiny else 17 / 25  # 1 + 4k frames at 25 fps
    dim, ffn, layers, heads = (128, 512, 4, 4) if not tiny else (48, 96, 2, 2)

    c.world = dict(video_size=size, fps=25, sample_rate=16000, min_seconds=seconds, max_seconds=seconds, num_identities=16)
    c.codecs = dict(
        video=dict(kind="pixels", spatial=8, temporal=4, fps=25.0, luma_coeffs=10, chroma_coeffs=3),
        audio=dict(kind="mel", sample_rate=16000, hop_length=320, n_mels=64, stack=2),
    )
    latent_hw = size // 8
    frames = int(round(seconds * 25))
    c.clip.seconds = seconds
    c.model.streams.video = dict(
        kind="grid", channels=64, shape=(1 + (frames - 1) // 4, latent_hw, latent_hw), patch=(1, 2, 2), rate=25 / 4,
        dim=dim, ffn=ffn, cross=("text",),
    )
    c.model.streams.audio = dict(
        kind="sequence", channels=128, shape=(int(round(seconds * 25)),), patch=(1,), rate=25.0, dim=dim, ffn=ffn, cross=("text",),
    )
    c.model.conditions.text = dict(dim=64 if not tiny else 32, length=48 if not tiny else 24)
    c.model.text_encoder = dict(kind="byte", layers=2, heads=2)
    c.model.num_layers = layers
    c.model.heads = heads
    c.model.mask = "full & no_peek"

    c.tasks = dict(t2av=0.55, ti2av=0.15, tv2a=0.15, a2v=0.15)
    c.flow.condition_dropout = dict(text=0.1)
    c.flow.shift = 1.0

    c.sample.steps = 25 if not tiny else 4
    c.sample.shift = 2.0
    c.sample.guidance = dict(text=dict(video=2.0, audio=2.0))
    c.sample.tasks = ("t2av", "ti2av", "tv2a", "a2v")
    c.sample.num_per_task = 4 if not tiny else 1

    c.data = dict(num_train=512 if not tiny else 16, num_eval=16 if not tiny else 4, examples_per_shard=128, num_workers=0)
    c.train = dict(
        steps=1500 if not tiny else 6,
        global_batch_size=8 if not tiny else 2,
        lr=1e-3 if not tiny else 1e-3,
        warmup_steps=100 if not tiny else 2,
        schedule="cosine",
        weight_decay=0.01,
        grad_clip=1.0,
        ema_decay=0.999 if not tiny else 0.5,
        grad_accum=1,
        log_every=25 if not tiny else 1,
        checkpoint_every=250 if not tiny else 3,
        keep_checkpoints=2,
        sample_every=500 if not tiny else 6,
        async_checkpoint=True,
    )
    c.profile = dict(start_step=-1, num_steps=0)
    c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
    return c
