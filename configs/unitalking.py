"""UniTalking-shaped twin: a Wan2.2-TI2V-5B video stream and an identical-twin audio stream.

Video: Wan2.2 VAE (16x spatial, 4x temporal, 48 channels) at 24 fps, 704x704, 5 s = 121 frames ->
31 x 44 x 44 latents -> 15,004 tokens. Audio: MMAudio 16 kHz VAE latents (20 ch, 31.25 Hz) -> 157
tokens, RoPE'd on the temporal band only at 6/31.25 = 0.192 video latent frames per audio latent.
Text (UMT5-XXL, 4096-d, 512 tokens) cross-attention in both streams; the audio stream also
cross-attends a reference-audio clip (TR2AV), summed with its text cross-attention.
Args: ``tiny`` shrinks widths/depth for tests (same structure); ``ovi`` uses Ovi's fixed time factor.
"""

from mmdit import config_lib


def get_config(arg=None):
    c = config_lib.sibling(__file__, "base")
    tiny = arg == "tiny"
    dim, ffn, layers, heads = (3072, 14336, 30, 24) if not tiny else (64, 128, 2, 2)
    secs = 121 / 24 if not tiny else 1.0  # 121 frames = 1 + 4*30 (Wan's causal VAE layout)
    side = 704 if not tiny else 64
    c.clip.seconds = secs
    c.model.streams.video = config_lib.video_stream(
        seconds=secs, fps=24, height=side, width=side, temporal=4, spatial=16, channels=48, dim=dim, ffn=ffn, cross=("text",)
    )
    c.model.streams.audio = config_lib.sequence_stream(
        seconds=5.0 if not tiny else secs, rate=31.25, channels=20, dim=dim, ffn=ffn, cross=("text", "ref_audio"),
        time_factor=0.19676 if arg == "ovi" else None,
    )
    c.model.conditions.text = dict(dim=4096 if not tiny else 32, length=512 if not tiny else 16)
    c.model.conditions.ref_audio = dict(dim=20, length=157 if not tiny else 31)
    c.model.num_layers = layers
    c.model.heads = heads
    c.model.mask = "full & no_peek"  # tv2a: the given video must not attend to the noisy audio
    c.model.dtype = "bfloat16" if not tiny else "float32"
    c.model.remat = "full" if not tiny else "none"
    c.tasks = dict(t2av=0.4, ti2av=0.2, tr2av=0.2, tv2a=0.2)
    c.flow.condition_dropout = dict(text=0.1, ref_audio=0.1)
    c.sample.steps = 50
    c.sample.shift = 5.0
    c.sample.guidance = dict(text=dict(video=4.0, audio=3.0))  # Ovi's video / audio CFG
    return c
