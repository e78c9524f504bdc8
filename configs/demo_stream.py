"""The embedded streaming default: the demo's synthetic talking world and twin video/audio model,
made chunk-causal, trained on 3-chunk clips, then streamed chunk by chunk for as long as wanted
(``mmdit stream --config configs/demo_stream.py --workdir W --seconds 60``).

A chunk is 16 latent frames (0.64 s) of video plus the 16 audio latents of the same span (both
streams at 25 latents/s, one token per latent frame). The mask adds TalkingMachines' sparse chunk
causality (chunk c sees chunks {0, c-1, c}) to the demo's ``local(1) & no_peek``. Clips are exactly
3 chunks (sink, previous, current), so with bounded positions (``sample.stream_positions``) every
streamed chunk from the third on sees the geometry training's third chunk saw.

Variants: ``tiny`` (tests: 6-frame chunks, 18-frame clips, 2 layers).
"""

from mmdit import config_lib

CLIP_CHUNKS = 3  # sink + previous + current: the bounded streaming window


def set_clip_chunks(c, chunks: int) -> None:
    """Makes the clip ``chunks`` chunks long (world, clip seconds, both streams' latent lengths)."""
    frames = int(c.model.chunk_frames) * chunks
    seconds = frames / 25.0
    c.world.min_seconds = c.world.max_seconds = seconds
    c.clip.seconds = seconds
    c.model.streams.video.shape = (frames,) + tuple(c.model.streams.video.shape[1:])
    c.model.streams.audio.shape = (frames,)


def get_config(arg=None):
    v = config_lib.parse_arg(arg, tiny=False)
    c = config_lib.sibling(__file__, "demo", "tiny,plain" if v.tiny else "plain")
    c.model.chunk_frames = 6.0 if v.tiny else 16.0
    set_clip_chunks(c, CLIP_CHUNKS)
    c.model.mask = "chunk_causal & local(1) & no_peek"
    # The world speaks 3x longer than a clip and each record is a random clip-length window of it, so speech
    # falls at every phase of the 3 chunks: a stream's chunk 500 (always at window position 2) must follow
    # speech that starts, continues or stops anywhere, not utterances that always end in the third chunk.
    c.world.min_seconds = c.world.max_seconds = 3 * c.clip.seconds
    c.sample.tasks = ("t2av", "ti2av", "tv2a", "a2v")
    return c
