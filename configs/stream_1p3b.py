"""Self-Forcing-sized streaming benchmark (issue 12's GPU figure): a Wan2.1-1.3B-shaped video stream
(dim 1536, ffn 8960, 30 layers, 12 heads of 128) at 480x832, 16 fps, Wan VAE layout (4x temporal, 8x
spatial, 16 channels, patch 1x2x2 -> 1,560 tokens per latent frame), chunks of 3 latent frames
(4,680 tokens), sparse chunk-causal mask, 4 denoising steps, UMT5-XXL-sized text features (4096 x 512).
Self-Forcing reports 17 FPS on one H100 for this shape with decode; our goal is 34.

Only for ``bench/stream.py`` (speed does not depend on the weights; ``bench/gpu_check.sh`` runs it).
Variants: ``tiny`` (CPU check of the same structure).
"""

from mmdit import config_lib


def get_config(arg=None):
    v = config_lib.parse_arg(arg, tiny=False)
    c = config_lib.sibling(__file__, "base")
    dim, ffn, layers, heads, text_dim, text_len = 1536, 8960, 30, 12, 4096, 512
    height, width = 480, 832
    if v.tiny:
        dim, ffn, layers, heads, text_dim, text_len = 64, 128, 2, 2, 32, 16
        height, width = 32, 64
    fps, chunk, chunks = 16, 3, 3
    latent_frames = chunk * chunks  # a 3-chunk clip: the bounded streaming window
    c.clip.seconds = (1 + 4 * (latent_frames - 1)) / fps
    c.model.streams.video = dict(
        kind="grid",
        channels=16,
        shape=(latent_frames, height // 8, width // 8),
        patch=(1, 2, 2),
        rate=fps / 4,
        dim=dim,
        ffn=ffn,
        cross=("text",),
    )
    c.model.conditions.text = dict(dim=text_dim, length=text_len)
    c.model.num_layers = layers
    c.model.heads = heads
    c.model.mask = "chunk_causal"
    c.model.chunk_frames = float(chunk)
    c.model.dtype = "float32" if v.tiny else "bfloat16"
    c.tasks = dict(t2av=1.0)
    c.sample.steps = 4
    c.sample.shift = 5.0
    c.sample.guidance = dict()  # a distilled few-step student runs without CFG
    c.sample.tasks = ("t2av",)
    return c
