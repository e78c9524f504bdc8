"""JAM-Flow-shaped: a Motion-DiT and an F5-TTS-sized Audio-DiT (dim 1024, 22 layers, 16 heads,
ffn 2048) coupled by *selective* joint attention (every other layer) under a localized mask
(cross-stream pairs only within +-2 motion frames), trained with an inpainting objective.

Motion: LivePortrait-style keypoint motion (70-d) at 25 Hz, the time reference. Audio: 100-band
mel at 24 kHz / hop 256 = 93.75 Hz. 10 s clips -> 250 motion + 937 audio tokens.

Training: one joint stage over T2AV, inpainting (a random span of each stream regenerated, the rest
given), A2V and TV2A. Codecs: the audio is the weight-free ``mel`` codec at JAM-Flow's settings (a
vocoder is not ported: it decodes with Griffin-Lim); no keypoint-motion codec (LivePortrait) is
ported, so the full size cannot make data or write MP4s. ``tiny`` runs on CPU on the synthetic
world: its "motion" is the demo ``pixels`` codec's per-frame latents of the rendered face (a grid
stream whose one token per frame stands where a 70-d keypoint vector would), audio a 50 Hz log-mel,
text the byte encoder.
"""

from mmdit import config_lib


def get_config(arg=None):
    v = config_lib.parse_arg(arg, tiny=False)
    c = config_lib.sibling(__file__, "base")

    dim, ffn, layers, heads = 1024, 2048, 22, 16
    secs = 10.0
    text_dim, text_len = 512, 256
    if v.tiny:
        dim, ffn, layers, heads = 32, 64, 4, 2
        secs = 1.0
        text_dim, text_len = 16, 8

    c.clip.seconds = secs
    c.model.streams.motion = config_lib.sequence_stream(seconds=secs, rate=25.0, channels=70, dim=dim, ffn=ffn, cross=("text",))
    c.model.streams.audio = config_lib.sequence_stream(seconds=secs, rate=93.75, channels=100, dim=dim, ffn=ffn, cross=("text",))
    c.model.conditions.text = dict(dim=text_dim, length=text_len)
    c.model.time_reference = "motion"
    c.model.num_layers = layers
    c.model.heads = heads
    c.model.joint_layers = tuple(range(0, layers, 2))
    c.model.mask = "local(2) & no_peek"  # a2v / tv2a: the given stream must not attend to the noisy one
    c.model.dtype = "bfloat16"
    c.tasks = dict(t2av=0.3, inpaint=0.4, a2v=0.15, tv2a=0.15)
    c.flow.condition_dropout = dict(text=0.2)

    c.sample.tasks = ("t2av", "inpaint", "a2v", "tv2a")
    c.codecs = dict(audio=dict(kind="mel", sample_rate=24000, n_fft=1024, hop_length=256, n_mels=100, stack=1))

    if v.tiny:  # CPU tests: f32, the synthetic world, demo codecs, byte text encoder
        c.model.dtype = "float32"
        c.model.text_encoder = dict(kind="byte", layers=1, heads=2)
        c.world = dict(video_size=32, fps=25, sample_rate=16000, min_seconds=secs, max_seconds=secs, num_identities=4)
        c.codecs = dict(
            video=dict(kind="pixels", spatial=8, temporal=1, fps=25.0, luma_coeffs=6, chroma_coeffs=1),
            audio=dict(kind="mel", sample_rate=16000, hop_length=320, n_mels=16, stack=1),
        )
        c.model.streams.motion = dict(
            kind="grid", channels=8, shape=(25, 4, 4), patch=(1, 4, 4), rate=25.0, dim=dim, ffn=ffn, cross=("text",)
        )
        c.model.streams.audio = config_lib.sequence_stream(
            seconds=secs, rate=50.0, channels=16, dim=dim, ffn=ffn, cross=("text",)
        )
        c.sample.steps, c.sample.num_per_task = 2, 1
        c.data.num_train, c.data.num_eval, c.data.examples_per_shard = 8, 2, 8
        c.train.update(dict(steps=3, global_batch_size=2, warmup_steps=1, ema_decay=0.5, log_every=1, checkpoint_every=1))
        c.train.update(dict(keep_checkpoints=1, async_checkpoint=False))
    return c
