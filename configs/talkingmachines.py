"""TalkingMachines-shaped: Wan2.1-14B video DiT (I2V, 512x512) driven by windowed audio
cross-attention over wav2vec2 features, sparse causal chunks of 3 latent frames (the paper
distils it to a 2-step student; distillation is not built yet, so ``sample.steps=2`` is only a fast preview).

Video: Wan2.1 VAE (8x spatial, 4x temporal, 16 ch), 25 fps, 81 frames -> 21 x 64 x 64 latents ->
21,504 tokens. The first latent frame is the reference image (TI2V-style known token).
Audio features: wav2vec2-base (768-d, 50 Hz), each video token attends those within +-1 latent frame.
The ~4.2B of audio cross-attention sit on top of Wan2.1-14B's 14B (paper: 18B).
Proven (tests/test_parity_wan_dit.py): without its audio cross-attention the video stream is
Wan2.1-T2V-14B's DiT weight for weight (the param tree of a converted checkpoint, 14,288,491,584
params), a layout that reproduces diffusers' forward to 1e-5 in f32. Wan2.1-I2V-14B itself would add
the opt-in CLIP ``image`` condition (``added_to="text"``) and the ``image_latents`` channel concat
(``model.streams.video.concat``), see mmdit/convert/wan_dit.py; here the reference image is the known
first latent frame instead, so those are not declared.

Training recipe (``train.stages``, one ``mmdit train`` launch, mmdit/train/stages.py): stage ``warmup``
trains everything (all params trainable), stage ``audio`` then trains only the new audio
cross-attention layers (``cross_audio_features`` and its condition embedder), starting from the
warm-up's params (``init_from``). Stage 3 of the paper, distillation to the 2-step student, is the
distillation issue's ``mmdit distill`` run on this run's result, not a stage here.
Codecs: the Wan2.1 VAE (``wan_vae``; set ``codecs.video.checkpoint`` to an ``mmdit convert`` folder);
audio features from a converted wav2vec2 and text from a converted UMT5 (``encoders``; set them).
``tiny`` runs on CPU with the demo codecs: ``pixels`` (8x/4x, 16 channels) and, in place of wav2vec2,
a 16-band 50 Hz log-mel (``codecs.audio_features``, weight-free) as the audio features; the byte text
encoder and the synthetic world.
"""

from mmdit import config_lib


def get_config(arg=None):
    v = config_lib.parse_arg(arg, tiny=False)
    c = config_lib.sibling(__file__, "base")

    dim, ffn, layers, heads = 5120, 13824, 40, 40
    secs = 81 / 25
    side = 512
    text_dim, text_len, feature_dim = 4096, 512, 768
    if v.tiny:
        dim, ffn, layers, heads = 64, 128, 2, 2
        secs = 33 / 25  # 9 latent frames: whole chunks of 3
        side = 32
        text_dim, text_len, feature_dim = 32, 16, 16

    c.clip.seconds = secs
    c.model.streams.video = config_lib.video_stream(
        seconds=secs,
        fps=25,
        height=side,
        width=side,
        temporal=4,
        spatial=8,
        channels=16,
        dim=dim,
        ffn=ffn,
        cross=("text", "audio_features"),
    )
    c.model.conditions.text = dict(dim=text_dim, length=text_len)
    c.model.conditions.audio_features = dict(dim=feature_dim, length=int(round(secs * 50)), rate=50.0, window=1.0)
    c.model.num_layers = layers
    c.model.heads = heads
    c.model.mask = "chunk_causal"
    c.model.chunk_frames = 3.0
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.tasks = dict(ti2av=1.0)
    c.flow.condition_dropout = dict(text=0.1, audio_features=0.1)
    c.sample.steps = 2  # the paper's distilled student samples in 2 steps; undistilled, this is only a fast preview
    c.sample.shift = 5.0
    c.sample.tasks = ("ti2av",)

    c.codecs = dict(video=dict(kind="wan_vae", checkpoint=None, fps=25.0))  # Wan2.1 VAE: `mmdit convert --family wan_vae`
    audio_layers = ("dit/params/blocks/video/cross_audio_features/*", "dit/params/video/cond_embedding_audio_features/*")
    c.train.stages = (
        dict(name="warmup", steps=10000),
        dict(name="audio", steps=20000, trainable=audio_layers),
        # stage 3, distillation to the 2-step student: `mmdit distill` on this run (the distillation issue)
    )

    if v.tiny:  # CPU tests: f32, no remat, demo codecs and world, byte text encoder
        c.model.dtype = "float32"
        c.model.remat = "none"
        c.model.text_encoder = dict(kind="byte", layers=1, heads=2)
        config_lib.tiny_audio_driven_cpu_setup(c, side=side, seconds=secs, feature_dim=feature_dim)
        c.train.stages = (dict(name="warmup", steps=2), dict(name="audio", steps=2, trainable=audio_layers))
    return c
