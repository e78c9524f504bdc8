"""Mirage-shaped (~10B): audio -> video without text or image. wav2vec2 audio features are a
*condition stream* inside the self-attention sequence (asymmetric attention: condition tokens never
look at noisy video tokens, ``no_peek``); per-modality CFG dropout and cosine CFG annealing.

Video: Wan2.1-style VAE (8x, 4x, 16 ch), 25 fps, 512x512, 4 s = 97 frames -> 25 x 64 x 64 latents
-> 25,600 tokens (patch 1x2x2). Audio features: 1024-d at 50 Hz, patch 2 -> 100 tokens, with their
own lighter weights (dim 1024) in the same 32 x 128 head space.
"""

from mmdit import config_lib


def get_config(arg=None):
    c = config_lib.sibling(__file__, "base")
    tiny = arg == "tiny"
    vdim, vffn, adim, affn, layers, heads = (4096, 16384, 1024, 4096, 44, 32) if not tiny else (64, 128, 32, 64, 2, 2)
    secs = 97 / 25 if not tiny else 17 / 25
    side = 512 if not tiny else 32
    c.clip.seconds = secs
    c.model.streams.video = config_lib.video_stream(
        seconds=secs, fps=25, height=side, width=side, temporal=4, spatial=8, channels=16, dim=vdim, ffn=vffn
    )
    c.model.streams.audio_features = config_lib.sequence_stream(
        seconds=secs, rate=50.0, channels=1024 if not tiny else 16, patch=2, dim=adim, ffn=affn, condition=True
    )
    c.model.num_layers = layers
    c.model.heads = heads
    c.model.head_dim = 128 if not tiny else 16
    c.model.mask = "no_peek"
    c.model.dtype = "bfloat16" if not tiny else "float32"
    c.model.remat = "full" if not tiny else "none"
    c.tasks = dict(a2v_features=1.0)
    c.flow.condition_dropout = dict(audio_features=0.1)
    c.sample.guidance = dict(audio_features=4.5)
    c.sample.guidance_schedule = "cosine"
    return c
