"""JAM-Flow-shaped: a Motion-DiT and an F5-TTS-sized Audio-DiT (dim 1024, 22 layers, 16 heads,
ffn 2048) coupled by *selective* joint attention (every other layer) under a localized mask
(cross-stream pairs only within +-2 motion frames), trained with an inpainting objective.

Motion: LivePortrait-style keypoint motion (70-d) at 25 Hz, the time reference. Audio: 100-band
mel at 24 kHz / hop 256 = 93.75 Hz. 10 s clips -> 250 motion + 937 audio tokens.
"""

from mmdit import config_lib


def get_config(arg=None):
    c = config_lib.sibling(__file__, "base")
    tiny = arg == "tiny"
    dim, ffn, layers, heads = (1024, 2048, 22, 16) if not tiny else (32, 64, 4, 2)
    secs = 10.0 if not tiny else 1.0
    c.clip.seconds = secs
    c.model.streams.motion = config_lib.sequence_stream(seconds=secs, rate=25.0, channels=70, dim=dim, ffn=ffn, cross=("text",))
    c.model.streams.audio = config_lib.sequence_stream(seconds=secs, rate=93.75, channels=100, dim=dim, ffn=ffn, cross=("text",))
    c.model.conditions.text = dict(dim=512 if not tiny else 16, length=256 if not tiny else 8)
    c.model.time_reference = "motion"
    c.model.num_layers = layers
    c.model.heads = heads
    c.model.joint_layers = tuple(range(0, layers, 2))
    c.model.mask = "local(2)"
    c.model.dtype = "bfloat16" if not tiny else "float32"
    c.tasks = dict(t2av=0.3, inpaint=0.4, a2v=0.15, tv2a=0.15)
    c.flow.condition_dropout = dict(text=0.2)
    return c
