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
Training recipe (``train.stages``, one ``mmdit train`` launch, mmdit/train/stages.py): stage ``tts``
pretrains the audio branch as text-to-speech on audio-only records (task ``tts``: the video stream is
marked absent; only ``dit/params/blocks/audio/*`` and the audio stream's in/out layers train, the
video and text branches are frozen), stage ``joint`` then trains everything on T2AV / TI2AV / TR2AV /
TV2A starting from the ``tts`` stage's params (``init_from``). The ``tts`` stage reads the
``train_audio`` split (``mmdit data synth`` writes it: records whose ``video_latents`` are zeros).
Codecs: the Wan2.2 VAE (``wan_vae``) and the MMAudio 16 kHz VAE + vocoder (``mmaudio``) from
``mmdit convert`` folders (set ``codecs.video.checkpoint`` / ``codecs.audio.vae`` / ``.vocoder``), text
from a converted UMT5 (``encoders.text``, set its ``checkpoint``).
Variants (combine with commas, e.g. ``unitalking.py:tiny,ovi``): ``tiny`` shrinks widths/depth for tests
(same structure) and runs on CPU with the demo codecs (``pixels`` 16x/4x with 48 channels, ``mel`` 20
bands at 31.25 Hz), the byte text encoder and the synthetic world (25 fps, 16 kHz); ``ovi`` uses Ovi's fixed
audio time factor.
"""

from mmdit import config_lib


def get_config(arg=None):
    v = config_lib.parse_arg(arg, tiny=False, ovi=False)
    c = config_lib.sibling(__file__, "base")

    dim, ffn, layers, heads = 3072, 14336, 30, 24
    fps, secs = 24, 121 / 24  # 121 frames = 1 + 4*30 (Wan's causal VAE layout)
    audio_secs = 5.0
    side = 704
    text_dim, text_len, ref_len = 4096, 512, 157
    if v.tiny:
        dim, ffn, layers, heads = 64, 128, 2, 2
        fps, secs = 25, 21 / 25  # 1 + 4*5 frames at the synthetic world's (and lip-sync metric's) 25 fps / 16 kHz
        audio_secs = secs
        side = 64
        text_dim, text_len, ref_len = 32, 16, 27

    c.clip.seconds = secs
    c.model.streams.video = config_lib.video_stream(
        seconds=secs, fps=fps, height=side, width=side, temporal=4, spatial=16, channels=48, dim=dim, ffn=ffn, cross=("text",)
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

    c.sample.tasks = ("t2av", "ti2av", "tr2av", "tv2a")
    # A reference-audio clip (TR2AV) is another utterance of the same speaker: its audio latents.
    c.codecs = dict(
        video=dict(kind="wan_vae", checkpoint=None, fps=24.0),  # Wan2.2 VAE: `mmdit convert --family wan_vae`
        audio=dict(kind="mmaudio", vae=None, vocoder=None),  # MMAudio 16 kHz: `mmdit convert --family mmaudio_*`
    )
    audio_branch = ("dit/params/blocks/audio/*", "dit/params/audio/*")  # the audio stream: blocks + in/out
    c.train.stages = (
        dict(name="tts", steps=20000, tasks=dict(tts=1.0), trainable=audio_branch, data="train_audio"),
        dict(name="joint", steps=100000, tasks=dict(t2av=0.4, ti2av=0.2, tr2av=0.2, tv2a=0.2)),
    )

    if v.tiny:  # CPU tests: f32, no remat, demo codecs and world, byte text encoder
        c.model.dtype = "float32"
        c.model.remat = "none"
        c.model.text_encoder = dict(kind="byte", layers=1, heads=2)
        c.world = dict(video_size=side, fps=25, sample_rate=16000, min_seconds=secs, max_seconds=secs, num_identities=4)
        c.codecs = dict(
            video=dict(kind="pixels", spatial=16, temporal=4, fps=25.0, luma_coeffs=10, chroma_coeffs=1),
            audio=dict(kind="mel", sample_rate=16000, hop_length=512, n_mels=20, stack=1),
        )
        _tiny_run(c)
        c.train.stages = (
            dict(name="tts", steps=4, tasks=dict(tts=1.0), trainable=audio_branch, data="train_audio", lr=3e-3),
            dict(name="joint", steps=2, tasks=dict(t2av=0.4, ti2av=0.2, tr2av=0.2, tv2a=0.2)),
        )
    return c


def _tiny_run(c):
    """Seconds-long CPU runs: a few records, few steps, checkpoints every step."""
    c.sample.steps, c.sample.num_per_task = 2, 1
    c.data.num_train, c.data.num_eval, c.data.examples_per_shard = 8, 2, 8
    c.train.global_batch_size = 2
    c.train.warmup_steps = 1
    c.train.ema_decay = 0.5
    c.train.log_every = 1
    c.train.checkpoint_every = 1
    c.train.keep_checkpoints = 1
    c.train.async_checkpoint = False
