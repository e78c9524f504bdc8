"""The embedded default: a tiny twin video/audio MM-DiT on the synthetic talking world, sized to
train on 2 CPU cores in minutes (``mmdit demo``).

World: 32x32 faces at 25 fps speaking 1.96 s utterances (49 frames) at 16 kHz.
Codecs (weight-free): ``pixels`` (8x space-to-depth + DCT: 6 luma + 1 + 1 chroma coefficients per
block, one latent frame per video frame) -> 49 x 4 x 4 x 8 video latents -> 49 tokens (patch 1x4x4,
a token per frame); ``mel`` (64 bands, 25 Hz) -> 49 x 128 audio latents -> 49 tokens. Every video
token has a same-instant audio token, and the joint mask ``local(1)`` (JAM-Flow's localized joint
attention) lets a token see the other stream only within +-1 frame, so lip-sync is learnable in
minutes on CPU.

Wan's 4-frame groups (``temporal=4``, what the real presets use) are the ``wan4`` variant: the video
latent frame ``g`` holds frames ``4g-3..4g`` in its channels (frame 0 alone, copied into 4 slots),
and the audio is grouped the *same* way (``MelCodec(temporal=4)``: 32 mels at 25 Hz, 4 per token),
so audio token ``g`` covers exactly video latent frame ``g``'s frames, sits at the same RoPE time,
and the within-group timing travels in channels on both sides; ``local(1)`` then means +-1 group.
Video patch ``1x2x2``, so 52 video + 13 audio tokens, each exactly 128 wide: a token wider than the
model dim (``1x4x4`` video, or 64-mel audio: 512) cannot carry its own noise through the 128-d
residual, and training stalls (audio/video loss 1.07/0.93 at step 900, against 0.57/0.30 with
128-wide tokens and 0.43/0.23 for the default).
Measured with the default's five model additions, sampled with guidance at every step (before the guidance
interval joined the default; not re-measured) (2,400 steps, ``python3 bench/demo_quality.py --config demo:wan4
--skip-ablation --num 16``, 5.4 min of training on 2 cores; ``bench/results/demo_quality_wan4.json``): strict
sync, fraction of the way from chance to ceiling (lag-0 / change), T2AV 0.94 / 0.87, TI2AV 0.93 / 0.84, TV2A
0.99 / 0.96, A2V 0.88 / 0.78 (T2AV r@0 0.81 against chance -0.01, ceiling 0.87; untrained at chance); the
cross-stream probe's audio time-shift ratio at sigma 0.9 is 0.19 (untrained 1.00), so the audio reads the
video's timing; T2AV's Fréchet distance 2.50 (floor 1.86), TI2AV identity 0.89 (ground truth 0.92), T2AV flicker
1.1e-4 (ground truth 2.1e-6). With the first four only (before the temporal-difference loss,
``bench/results/demo_quality_wan4_before_tdiff.json``, one training seed each) it was 0.69 / 0.55, 0.76 / 0.64,
0.93 / 0.86, 0.78 / 0.67, Fréchet 1.84, flicker 1.5e-4: the term that prices frame-to-frame changes also lifted
this layout's sync to the per-frame default's level; a second training seed (``--set seed=1``, which also draws
another world; ``bench/results/demo_quality_wan4_seed1.json``, no run without the term beside it) gave 1.00 / 0.96,
0.98 / 0.91, 0.99 / 0.99, 0.95 / 0.90. Without the additions (``wan4,plain``, 8 clips, measured
earlier) T2AV's lag-0 fraction was 0.21 with probe ratio 0.54. One addition
at a time (16 clips): ``wan4,plain,x0`` gives 0.78 / 0.64, 0.81 / 0.67, 0.05 / 0.07 (TV2A at chance), 0.81 / 0.72
(``bench/results/demo_quality_wan4_plain_x0.json``), ``wan4,plain,jointcfg`` 0.11 / 0.08, 0.14 / 0.09, 0.30 / 0.25,
0.13 / 0.10 (``..._jointcfg.json``): x-prediction is what carries sync into this layout (``configs/mirage.py`` now
predicts x0).

Text: byte tokens through a small trainable encoder, cross-attended by both streams.

The default adds five things to that model and one to its sampler (the ``plain`` variant leaves all six out;
``plain,<name>`` adds one):

* **Joint guidance** (``jointcfg``, :func:`mmdit.config_lib.use_joint_guidance`): cross-stream attention is dropped for 10% of the
  training samples (each stream then attends only to itself) and sampling guides by it,
  ``v = v_text + 3 (v_text,joint - v_text)`` per stream (Mirage's per-modality CFG; MMAudio's CFG on the
  video), so each stream takes more of its timing from its partner;
* **the reference frame as channels** (``ref``, :func:`use_reference_frame`): in TI2AV the given first frame is
  tiled over every video token as extra input channels (Wan2.1 I2V's channel concat), zeros elsewhere;
* **a key-frame residual codec** (``residual``, :func:`use_residual_frames`): every frame after the first is coded
  as twice its difference from frame 0 (``codecs.video.residual_gain=2``), so a static background is exact zeros
  and the mouth's motion is the whole signal there; frame 0's token weighs 16 in the video loss;
* **x-prediction** (``x0``): the output heads predict the clean tokens and the model returns the implied velocity
  (``model.prediction="x0"``, JiT), so no head has to carry its 128-wide input's noise through.
* **the error of frame-to-frame changes in the loss** (``tdiff``, ``flow.temporal_difference_weight=1``,
  :func:`mmdit.flow.temporal_difference_loss`): besides each frame's error, the error of each change between
  consecutive video frames (after the key frame), so a mistake that stays put costs less than one that jumps.
  It is what removed the rare glitched frame (a whole frame off in colour): over 16 eval clips x 10 sampling seeds
  (``python3 bench/glitch_rate.py --workdir <run> --seeds 10``, ``bench/results/glitch_rate_tdiff.json``), T2AV clips
  with a glitched frame went 10 -> 0 of 160 (training seed 0) and 15 -> 1 (seed 1), mean background flicker
  5.6e-5 -> 1.9e-5 and 7.4e-5 -> 2.2e-5 (median clip 2.1e-5 -> 1.6e-5, 2.3e-5 -> 1.9e-5; ground truth 2.1e-6), lag-0 /
  change sync 0.88 / 0.79 -> 0.91 / 0.84 and 0.91 / 0.83 -> 0.91 / 0.85, T2AV Fréchet distance 2.66 -> 2.30 and
  2.66 -> 2.95 (floor 1.86). Weight 4 (seed 0): 1 of 160 glitched, flicker 1.7e-5, FD 2.96, so 1.

The sampler then guides only while sigma > 0.5 (``interval``, ``sample.guidance_interval=(0.5, 1.0)``, the first
19 of 25 steps; Kynkaenniemi et al. 2024), unguided after: CFG (text 2, joint 3) amplifies the model's per-frame
errors late in sampling, when sync is long laid out (unguided, the median clip is cleanest but a few clips glitch;
guided throughout, none glitches and every clip shimmers). Over 160 T2AV clips of one trained model
(``python3 bench/glitch_rate.py --workdir <run> --sample 'sample.guidance_interval=(0.0,1.0)' --seeds 10``,
``bench/results/glitch_rate_interval.json``): flicker mean 1.9e-5 -> 1.4e-5, median clip 1.6e-5 -> 1.1e-5, 0 -> 0
glitched clips, lag-0 / change sync 0.91 / 0.84 -> 0.96 / 0.90, Fréchet distance 2.30 -> 2.06; on training seed 1
(``bench/results/glitch_rate_interval_seed1.json``) flicker 2.7e-5 -> 1.2e-5, sync 0.97 / 0.96 -> 0.98 / 0.97, Fréchet
2.55 -> 2.47 (floor 2.33), 0 -> 0 glitched; A2V and TI2AV alike
(BUILD.md, "Guidance interval"). Lower bounds 0.3 and 0.7 measured alike. It is a sampling setting: the trained
model is the same, so ``plain`` leaves it out and any run can be re-sampled either way.

Measured on 2 cores (2,400 steps, ~7 min of training; ``mmdit-eval`` figures, fraction of the way from chance to
the ground-truth ceiling, lag-0 / change correlation; one training seed per row, so differences of ~0.05 are
within run-to-run spread; FD = Fréchet distance of frame features to the ground truth over its floor, which
depends on the clip count; flicker = the background's mean squared frame-to-frame change, ground truth 2e-6):

=============================  ===========  ===========  ===========  ===========  ===========  =========  ========
run (clips)                    T2AV         TI2AV        TV2A         A2V          TI2AV ident  T2AV FD    T2AV flk
=============================  ===========  ===========  ===========  ===========  ===========  =========  ========
``plain`` (16; others 8)       0.57 / 0.38  0.51 / 0.39  0.73 / 0.62  0.67 / 0.54  0.29         2.66/1.86  6.6e-3
``ref`` + ``jointcfg`` (16)    0.84 / 0.68  0.84 / 0.68  0.90 / 0.80  0.85 / 0.74  0.45         2.56/1.86  5.5e-3
+ ``x0`` alone (8)             0.90 / 0.83  0.88 / 0.82  0.60 / 0.54  0.94 / 0.88  0.65         2.58/4.05  9.2e-5
+ residual, weight 1 (8)       0.46 / 0.31  0.89 / 0.71  0.99 / 0.91  0.56 / 0.38  0.74         4.38/4.05  1.2e-3
+ residual, weight 16 (8)      0.93 / 0.79  0.94 / 0.81  1.02 / 0.96  0.85 / 0.73  0.65         9.84/4.05  2.0e-3
+ ``x0`` (16)                  0.89 / 0.80  0.91 / 0.82  1.01 / 1.00  0.89 / 0.80  0.91         3.28/1.86  9.0e-5
+ ``tdiff`` (16)               0.92 / 0.85  0.95 / 0.89  1.00 / 0.98  0.91 / 0.86  0.91         2.18/1.86  1.8e-5
**default** (+ interval, 16)   0.96 / 0.91  0.98 / 0.94  1.00 / 0.98  0.98 / 0.97  0.93         1.96/1.86  1.1e-5
+ ``x0``, residual gain 4 (8)  0.80 / 0.73  0.93 / 0.84  0.99 / 0.94  0.92 / 0.85  0.91         5.65/4.05  2.2e-4
=============================  ===========  ===========  ===========  ===========  ===========  =========  ========

(TI2AV identity: colour-histogram similarity to the given frame; the ground truth's is 0.92.) Joint guidance
moves sync most; guided harder (4, 6) sync keeps rising while the Fréchet distance grows, hence 3. The residual
codec alone loses T2AV: its key frame is one token of 49 and came out grey and blurred until it weighed 16.
x-prediction is what cleans the frames (alone, on the absolute codec: ``plain,ref,jointcfg,x0``, T2AV flicker
down ~60x, its frames at the ground truth's Fréchet floor); with the residual codec TI2AV also keeps the given
identity at the ground truth's level and its flicker drops another 9x, and TV2A is exact. The temporal-difference
loss then took out the rare single wrong frame that kept T2AV's mean flicker at ~40x the ground truth's static
background (below); guided only while sigma > 0.5 (below the table) it still flickers ~5x in T2AV and ~4x in TI2AV
(most clips ~1e-5, under a grey level of shimmer).

Variants: ``tiny`` (tests: 2 layers, 48-wide, 17 frames, few steps); ``wan4`` (above; combines
with the others); ``plain`` (none of the six: the model ``demo_stream`` and ``demo_distill`` build on);
``plain,ref`` / ``plain,jointcfg`` / ``plain,residual`` / ``plain,x0`` / ``plain,tdiff`` / ``plain,interval`` (one of
them; combine with commas);
``nojoint`` (the ablation: ``model.joint_layers=()``, no cross-stream attention at all, so no joint guidance
either; ``bench/demo_quality.py`` trains it); ``keyframe`` (``model.streams.video.key_frame_embedding``: a learned
vector added to the first frame's video tokens, the residual codec's key frame, which relative RoPE alone does not
single out). It was meant to stop the rare glitched frame (a later frame coded like a key frame) and does not:
``python3 bench/glitch_rate.py --workdir <default> --workdir <keyframe> --seeds 10`` (T2AV, 160 clips per run,
``bench/results/glitch_rate_keyframe.json``) counts glitched clips 10 -> 2 at training seed 0 but 15 -> 20 at
seed 1; sync moves up a little in both (frac@0 0.88 -> 0.93, 0.91 -> 0.94; fracΔ 0.79 -> 0.86, 0.83 -> 0.86),
within the run-to-run spread, so it stays opt-in.
"""

from mmdit import config_lib


def get_config(arg=None):
    v = config_lib.parse_arg(
        arg,
        tiny=False,
        wan4=False,
        plain=False,
        ref=False,
        jointcfg=False,
        residual=False,
        x0=False,
        nojoint=False,
        keyframe=False,
        tdiff=False,
        interval=False,
    )
    c = config_lib.sibling(__file__, "base")

    size, fps = 32, 25
    frames = 49  # 1 + 4k frames at 25 fps
    dim, ffn, layers, heads = 128, 512, 4, 4
    text_dim, text_len = 64, 48
    if v.tiny:
        frames = 17
        dim, ffn, layers, heads = 48, 96, 2, 2
        text_dim, text_len = 32, 24
    seconds = frames / fps
    latent_hw = size // 8

    c.world = dict(video_size=size, fps=fps, sample_rate=16000, min_seconds=seconds, max_seconds=seconds, num_identities=16)
    c.codecs = dict(
        video=dict(kind="pixels", spatial=8, temporal=1, fps=25.0, luma_coeffs=6, chroma_coeffs=1),
        audio=dict(kind="mel", sample_rate=16000, hop_length=320, n_mels=64, stack=2),
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
        cross=("text",),
    )
    c.model.streams.audio = dict(
        kind="sequence", channels=128, shape=(frames,), patch=(1,), rate=25.0, dim=dim, ffn=ffn, cross=("text",)
    )
    c.model.conditions.text = dict(dim=text_dim, length=text_len)
    c.model.text_encoder = dict(kind="byte", layers=2, heads=2)
    c.model.num_layers = layers
    c.model.heads = heads
    c.model.mask = "local(1) & no_peek"

    c.tasks = dict(t2av=0.55, ti2av=0.15, tv2a=0.15, a2v=0.15)
    c.flow.condition_dropout = dict(text=0.1)
    c.flow.shift = 3.0  # train mostly at high noise, where the speech rhythm (and so the sync) is laid out
    c.flow.independent_streams = 0.5  # half the samples noise audio and video independently

    c.sample.steps = 25
    c.sample.shift = 3.0
    c.sample.guidance = dict(text=dict(video=2.0, audio=2.0))
    c.sample.tasks = ("t2av", "ti2av", "tv2a", "a2v")
    c.sample.num_per_task = 8

    c.data.num_train = 512
    c.data.num_eval = 16
    c.data.examples_per_shard = 128
    c.train.steps = 2400
    c.train.global_batch_size = 8
    c.train.lr = 1e-3
    c.train.log_every = 25
    c.train.checkpoint_every = 400
    c.train.sample_every = 800

    if v.tiny:
        c.sample.steps = 4
        c.sample.num_per_task = 1
        c.data.num_train, c.data.num_eval = 16, 4
        c.train.steps = 6
        c.train.global_batch_size = 2
        c.train.warmup_steps = 2
        c.train.ema_decay = 0.5
        c.train.log_every = 1
        c.train.checkpoint_every = 3
        c.train.sample_every = 6
    if v.wan4:
        use_wan_groups(c, frames, latent_hw, temporal=4)
    if v.ref or not v.plain:
        use_reference_frame(c)
    if v.residual or not v.plain:
        use_residual_frames(c, gain=RESIDUAL_GAIN)
    if v.keyframe:  # a learned vector on the residual codec's key frame (model.streams.*.key_frame_embedding)
        c.model.streams.video.key_frame_embedding = True
    if v.x0 or not v.plain:
        c.model.prediction = "x0"  # JiT's x-prediction (configs/base.py): the heads give clean tokens
    if v.tdiff or not v.plain:  # the error of frame-to-frame changes in the loss (flow.temporal_difference_loss)
        c.flow.temporal_difference_weight = TEMPORAL_DIFFERENCE_WEIGHT
    if v.nojoint:  # the ablation: no cross-stream attention, so nothing for joint guidance to drop
        c.model.joint_layers = ()
    elif v.jointcfg or not v.plain:
        config_lib.use_joint_guidance(c, scale=3.0)
    if v.interval or not v.plain:  # CFG only while sigma > 0.5 (sample.guidance_interval; module docstring)
        c.sample.guidance_interval = GUIDANCE_INTERVAL
    return c


def use_reference_frame(c) -> None:
    """The ``ref`` variant: the video's first latent frame, tiled over every latent frame, joined to each
    video token as extra input channels (condition ``first_frame``, ``derived="first_frame"``:
    :mod:`mmdit.model.derived_conditions`). It is computed from the video tokens, never read from records,
    and present only in TI2AV, where that frame is given clean; every other task (and a dropped sample)
    sees zeros there. Each video token then reads the reference identity directly instead of only through
    attention to the first token. ``dim``/``length`` are left unset: the model takes the video token width
    (``channels x prod(patch)``, 128 here) and token count, so ``--set`` on the video's shape or patch stays
    consistent."""
    c.model.conditions.first_frame = dict(derived="first_frame")
    c.model.streams.video.concat = ("first_frame",)


RESIDUAL_GAIN = 2.0
GUIDANCE_INTERVAL = (0.5, 1.0)  # 0.3 and 0.7 measured alike (module docstring)
TEMPORAL_DIFFERENCE_WEIGHT = 1.0  # 4 measured no cleaner and a worse T2AV Fréchet distance (module docstring)


def use_residual_frames(c, gain: float, first_frame_weight: float = 16.0) -> None:
    """The ``residual`` variant: the pixels codec codes every frame after the first as ``gain`` times its
    difference from frame 0 (``codecs.video.residual_gain``, :mod:`mmdit.codecs.pixels`), so a static background
    is exact zeros after the first latent frame and the mouth's motion is the whole signal there; frame 0's
    tokens, the key frame every later frame is decoded against, weigh ``first_frame_weight`` in the video loss
    (``flow.first_frame_weight``; at 1 the T2AV key frame came out grey and blurred, and sync with it)."""
    c.codecs.video.residual_gain = gain
    c.flow.first_frame_weight = first_frame_weight


def use_wan_groups(c, frames: int, latent_hw: int, temporal: int) -> None:
    """The ``wan4`` variant: Wan's ``1 + 4k`` latent layout on *both* streams (module docstring).

    Video: ``pixels`` with ``temporal`` frames stacked per latent frame (49 frames -> 13 latent
    frames of 4 x 8 channels), patch ``1 x 2 x 2`` (4 tokens per latent frame); audio: ``mel``
    grouped the same way (13 latents), so token ``i`` of each stream covers the same frames and sits
    at the same RoPE time. Both token widths (``32 x 2 x 2`` and ``4 x 32`` mels) equal the model dim
    128: a token wider than the model cannot carry its own noise through, and the loss stalls."""
    latent_frames = 1 + (frames - 1) // temporal
    rate = 25.0 / temporal
    c.codecs.video.temporal = temporal
    # 32 mels once per 40 ms (25 Hz, no stacking) instead of 64 twice: 4 x 32 = 128 channels per group
    c.codecs.audio.update(n_mels=32, stack=1, hop_length=640, temporal=temporal)
    video, audio = c.model.streams.video, c.model.streams.audio
    video.channels, video.shape, video.rate = video.channels * temporal, (latent_frames, latent_hw, latent_hw), rate
    video.patch = (1, 2, 2)
    audio.channels, audio.shape, audio.rate = 32 * temporal, (latent_frames,), rate
