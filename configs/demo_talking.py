"""TalkingMachines on the demo world: a video-only MM-DiT driven by windowed audio-feature cross-attention,
with the speaking/silence embedding trained from the world's own speaking labels (``mmdit train`` in
~5 minutes on 2 cores; ``bench/silence_mouth.py`` measures that silence mode keeps the mouth closed).

Video: the demo's layout (``configs/demo.py``): 32x32 faces at 25 fps, 49 frames, the ``pixels`` codec
with one latent frame per video frame (temporal=1) -> 49 x 4 x 4 x 8 latents, patch 1x4x4 = a token per
frame. No audio stream and no text: the speech reaches the video only through ``audio_features``, a
weight-free 50 Hz log-mel (``codecs.audio_features``, standing in for TalkingMachines' wav2vec2), 98
tokens per clip, cross-attended by each video token within +-1 latent frame (``window=1.0``).

Silence mode (``silence_embedding`` + ``silence_labels``): the records carry ``speaking_frames``, from the
synthetic world's ground truth (mmdit/data/synth_records.py: a frame is speaking inside the utterance,
first spoken phone to last); in the leading and trailing pauses (~26 % of the frames) the learned
silence embedding replaces the audio features, so the model learns "silence embedding = mouth closed,
listening". At sample time ``mmdit sample --silence 1.0:1.96`` (or ``speaking_frames``) switches it per
frame, whatever the audio says.

Task: ``ti2av`` (the first frame is given, as TalkingMachines' reference image; the only generated
stream is the video). Variants: ``tiny`` (tests: 2 layers, 32-wide, 9 frames, a few steps).
"""

from mmdit import config_lib


def get_config(arg=None):
    v = config_lib.parse_arg(arg, tiny=False)
    c = config_lib.sibling(__file__, "base")

    size, fps = 32, 25
    frames = 49
    dim, ffn, layers, heads = 128, 512, 4, 4
    n_mels = 32
    if v.tiny:
        frames = 9
        dim, ffn, layers, heads = 32, 64, 2, 2
        n_mels = 16
    seconds = frames / fps
    latent_hw = size // 8

    c.world = dict(video_size=size, fps=fps, sample_rate=16000, min_seconds=seconds, max_seconds=seconds, num_identities=16)
    c.codecs = dict(
        video=dict(kind="pixels", spatial=8, temporal=1, fps=25.0, luma_coeffs=6, chroma_coeffs=1),
        audio_features=dict(kind="mel", sample_rate=16000, hop_length=320, n_mels=n_mels, stack=1),
    )
    c.clip.seconds = seconds
    c.model.streams.video = dict(
        kind="grid",
        channels=8,
        shape=(frames, latent_hw, latent_hw),
        patch=(1, latent_hw, latent_hw),
        rate=25.0,
        dim=dim,
        ffn=ffn,
        cross=("audio_features",),
    )
    c.model.conditions.audio_features = dict(
        dim=n_mels,
        length=int(round(seconds * 50)),
        rate=50.0,
        window=1.0,
        silence_embedding=True,
        silence_labels=True,
    )
    c.model.num_layers = layers
    c.model.heads = heads

    c.tasks = dict(ti2av=1.0)
    c.flow.shift = 3.0

    c.sample.steps = 25
    c.sample.shift = 3.0
    c.sample.tasks = ("ti2av",)
    c.sample.num_per_task = 8

    c.data.num_train = 512
    c.data.num_eval = 16
    c.data.examples_per_shard = 128
    c.train.steps = 2000
    c.train.global_batch_size = 8
    c.train.lr = 1e-3
    c.train.log_every = 25
    c.train.checkpoint_every = 500
    c.train.sample_every = 0

    if v.tiny:
        c.sample.steps = 2
        c.sample.num_per_task = 1
        c.data.num_train, c.data.num_eval, c.data.examples_per_shard = 8, 4, 8
        c.train.steps = 3
        c.train.global_batch_size = 2
        c.train.warmup_steps = 1
        c.train.ema_decay = 0.5
        c.train.log_every = 1
        c.train.checkpoint_every = 3
        c.train.update(dict(keep_checkpoints=1, async_checkpoint=False))
    return c
