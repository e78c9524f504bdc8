"""TalkingMachines-shaped: Wan2.1-14B video DiT (I2V, 512x512) driven by windowed audio
cross-attention over wav2vec2 features, sparse causal chunks of 3 latent frames, 2-step DMD target.

Video: Wan2.1 VAE (8x spatial, 4x temporal, 16 ch), 25 fps, 81 frames -> 21 x 64 x 64 latents ->
21,504 tokens. The first latent frame is the reference image (TI2V-style known token).
Audio features: wav2vec2-base (768-d, 50 Hz), each video token attends those within +-1 latent frame.
The ~4.2B of audio cross-attention sit on top of Wan2.1-14B's 14B (paper: 18B).
"""

from mmdit import config_lib


def get_config(arg=None):
    c = config_lib.sibling(__file__, "base")
    tiny = arg == "tiny"
    dim, ffn, layers, heads = (5120, 13824, 40, 40) if not tiny else (64, 128, 2, 2)
    secs = 81 / 25 if not tiny else 17 / 25
    side = 512 if not tiny else 32
    c.clip.seconds = secs
    c.model.streams.video = config_lib.video_stream(
        seconds=secs, fps=25, height=side, width=side, temporal=4, spatial=8, channels=16, dim=dim, ffn=ffn, cross=("text", "audio_features")
    )
    c.model.conditions.text = dict(dim=4096 if not tiny else 32, length=512 if not tiny else 16)
    n_feat = int(round(secs * 50))
    c.model.conditions.audio_features = dict(dim=768 if not tiny else 16, length=n_feat, rate=50.0, window=1.0)
    c.model.num_layers = layers
    c.model.heads = heads
    c.model.mask = "chunk_causal"
    c.model.chunk_frames = 3.0
    c.model.dtype = "bfloat16" if not tiny else "float32"
    c.model.remat = "full" if not tiny else "none"
    c.tasks = dict(ti2av=1.0)
    c.flow.condition_dropout = dict(text=0.1, audio_features=0.1)
    c.sample.steps = 2
    c.sample.shift = 5.0
    return c
