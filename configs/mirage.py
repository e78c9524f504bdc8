"""Mirage-shaped (~10B): audio -> video without text or image. wav2vec2 audio features are a
*condition stream* inside the self-attention sequence (asymmetric attention: condition tokens never
look at noisy video tokens, ``no_peek``); per-modality CFG dropout and cosine CFG annealing.

Video: Wan2.1-style VAE (8x, 4x, 16 ch), 25 fps, 512x512, 4 s = 97 frames -> 25 x 64 x 64 latents
-> 25,600 tokens (patch 1x2x2). Audio features: 1024-d at 50 Hz, patch 2 -> 100 tokens, with their
own lighter weights (dim 1024) in the same 32 x 128 head space.

Codecs: the Wan2.1 VAE (``wan_vae``; set ``codecs.video.checkpoint`` to an ``mmdit convert`` folder);
the features from a converted wav2vec2-large (``encoders.audio_features``; set it). ``tiny`` runs on
CPU with the demo codecs: ``pixels`` (8x/4x, 16 channels) and, in place of wav2vec2, a 16-band 50 Hz
log-mel (``codecs.audio_features``, weight-free; it also gives the sampled MP4s their audio track).

Prediction: the output heads predict clean tokens (``model.prediction="x0"``, JiT's x-prediction; the model still
returns velocities, so losses and samplers are unchanged); ``velocity`` (variant) restores velocity heads. Mirage
trains from scratch, so no velocity-trained weights are lost. The evidence is the demo world in Wan's 4-frame
layout (``bench/results/demo_quality_wan4_plain_x0.json``, 16 clips, 2,400 steps on 2 cores): x-prediction alone
lifts audio-driven video (A2V) lag-0 sync from 0.24 to 0.81 of the way from chance to the ground-truth ceiling
(T2AV 0.78, TI2AV 0.81) and its frames reach the ground truth's Fréchet floor (1.78 vs 1.86); joint guidance
alone leaves A2V at 0.13 (``demo_quality_wan4_plain_jointcfg.json``). That model is the demo's twin with its
audio a generated stream, not Mirage's audio-feature condition stream: the transfer is by analogy. (Audio
*generation* given video, TV2A, fell to chance with x-prediction alone there; Mirage generates no audio.)
"""

from mmdit import config_lib


def get_config(arg=None):
    v = config_lib.parse_arg(arg, tiny=False, velocity=False)
    c = config_lib.sibling(__file__, "base")

    vdim, vffn, adim, affn, layers, heads, head_dim = 4096, 16384, 1024, 4096, 44, 32, 128
    secs = 97 / 25
    side = 512
    feature_dim = 1024
    if v.tiny:
        vdim, vffn, adim, affn, layers, heads, head_dim = 64, 128, 32, 64, 2, 2, 16
        secs = 17 / 25
        side = 32
        feature_dim = 16

    c.clip.seconds = secs
    c.model.streams.video = config_lib.video_stream(
        seconds=secs, fps=25, height=side, width=side, temporal=4, spatial=8, channels=16, dim=vdim, ffn=vffn
    )
    c.model.streams.audio_features = config_lib.sequence_stream(
        seconds=secs, rate=50.0, channels=feature_dim, patch=2, dim=adim, ffn=affn, condition=True
    )
    c.model.num_layers = layers
    c.model.heads = heads
    c.model.head_dim = head_dim
    c.model.mask = "no_peek"
    c.model.prediction = "velocity" if v.velocity else "x0"  # docstring: evidence from the 4-frame demo world
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.tasks = dict(a2v_features=1.0)
    c.flow.condition_dropout = dict(audio_features=0.1)
    c.sample.guidance = dict(audio_features=4.5)
    c.sample.guidance_schedule = "cosine"
    c.sample.tasks = ("a2v_features",)

    c.codecs = dict(video=dict(kind="wan_vae", checkpoint=None, fps=25.0))  # Wan2.1 VAE: `mmdit convert --family wan_vae`

    if v.tiny:  # CPU tests: f32, no remat, demo codecs and world
        c.model.dtype = "float32"
        c.model.remat = "none"
        config_lib.tiny_audio_driven_cpu_setup(c, side=side, seconds=secs, feature_dim=feature_dim)
        c.train.steps = 3
    return c
