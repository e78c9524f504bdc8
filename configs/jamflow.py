"""JAM-Flow-shaped: a Motion-DiT and an F5-TTS-sized Audio-DiT (dim 1024, 22 layers, 16 heads,
ffn 2048) coupled by *selective* joint attention (every other layer) under a localized mask
(cross-stream pairs only within +-2 motion frames), trained with an inpainting objective.

Motion: LivePortrait-style keypoint motion (70-d) at 25 Hz, the time reference. Audio: 100-band
mel at 24 kHz / hop 256 = 93.75 Hz. 10 s clips -> 250 motion + 937 audio tokens.
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

    if v.tiny:  # CPU tests: f32
        c.model.dtype = "float32"
    return c
