"""UniTalking-shaped twin: a Wan2.2-TI2V-5B video stream and an identical-twin audio stream.

Video: Wan2.2 VAE (16x spatial, 4x temporal, 48 channels) at 24 fps, 704x704, 5 s = 121 frames ->
31 x 44 x 44 latents -> 15,004 tokens. Audio: MMAudio 16 kHz VAE latents (20 ch, 31.25 Hz) -> 157
tokens, RoPE'd on the temporal band only at 6/31.25 = 0.192 video latent frames per audio latent.
Text (UMT5-XXL, 4096-d, 512 tokens) cross-attention in both streams; the audio stream also
cross-attends a reference-audio clip (TR2AV), summed with its text cross-attention.
Proven (tests/test_parity_wan_dit.py): the video stream is Wan2.2-TI2V-5B's DiT weight for weight --
the same param tree as a converted checkpoint (``mmdit convert``, family ``wan_dit``; 4,999,787,712
params) -- and that layout reproduces diffusers' forward (per-token timesteps included) to 1e-5 in f32.
The audio twin shares the block layout, not the weights' shapes (20-channel patches, ref_audio).
Variants (combine with commas, e.g. ``unitalking.py:tiny,ovi``): ``tiny`` shrinks widths/depth for tests
(same structure); ``ovi`` uses Ovi's fixed audio time factor.
"""

from mmdit import config_lib


def get_config(arg=None):
    v = config_lib.parse_arg(arg, tiny=False, ovi=False)
    c = config_lib.sibling(__file__, "base")

    dim, ffn, layers, heads = 3072, 14336, 30, 24
    secs = 121 / 24  # 121 frames = 1 + 4*30 (Wan's causal VAE layout)
    audio_secs = 5.0
    side = 704
    text_dim, text_len, ref_len = 4096, 512, 157
    if v.tiny:
        dim, ffn, layers, heads = 64, 128, 2, 2
        secs = audio_secs = 1.0
        side = 64
        text_dim, text_len, ref_len = 32, 16, 31

    c.clip.seconds = secs
    c.model.streams.video = config_lib.video_stream(
        seconds=secs, fps=24, height=side, width=side, temporal=4, spatial=16, channels=48, dim=dim, ffn=ffn, cross=("text",)
    )
    c.model.streams.audio = config_lib.sequence_stream(
        seconds=audio_secs,
        rate=31.25,
        channels=20,
        dim=dim,
        ffn=ffn,
        cross=("text", "ref_audio"),
        time_factor=0.19676 if v.ovi else None,
    )
    c.model.conditions.text = dict(dim=text_dim, length=text_len)
    c.model.conditions.ref_audio = dict(dim=20, length=ref_len)
    c.model.num_layers = layers
    c.model.heads = heads
    c.model.mask = "full & no_peek"  # tv2a: the given video must not attend to the noisy audio
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.tasks = dict(t2av=0.4, ti2av=0.2, tr2av=0.2, tv2a=0.2)
    c.flow.condition_dropout = dict(text=0.1, ref_audio=0.1)
    c.sample.steps = 50
    c.sample.shift = 5.0
    c.sample.guidance = dict(text=dict(video=4.0, audio=3.0))  # Ovi's video / audio CFG

    if v.tiny:  # CPU tests: f32, no remat
        c.model.dtype = "float32"
        c.model.remat = "none"
    return c
