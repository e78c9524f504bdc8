"""Defaults every experiment config starts from (``config_lib.sibling(__file__, "base")``).

Every field any code reads is declared here, once, with its default; ``mmdit.config_spec`` validates
each section into a frozen spec (errors name the field and the fix) and the code reads values only
from those specs. ``--set a.b=v`` on a field not declared here is an error naming the nearest one,
except inside the open mappings (``tasks``, ``flow.stream_weights``, ``flow.condition_dropout``,
``sample.guidance``, ``sample.stream_shift``, ``model.streams``, ``model.conditions``, ``codecs``,
``world``), whose keys are names.

Sections: ``model`` (architecture; see mmdit/model/spec.py), ``flow`` (noise and loss), ``tasks``
(multitask weights), ``sample`` (sampler and guidance), ``codecs`` / ``world`` (data making),
``train``, ``data``, ``mesh`` (parallelism), ``distributed`` (multi-host), ``profile``, ``distill``
(``mmdit distill`` only; validated by mmdit/distill/spec.py).
"""

import ml_collections as mlc


def get_config(arg=None):
    c = mlc.ConfigDict()
    c.seed = 0

    c.model = mlc.ConfigDict()
    # name -> stream (config_lib.video_stream / sequence_stream); optional `concat`: per-token conditions joined to
    # the stream's tokens before the patch embedding (Wan I2V's mask + image latents; mmdit/convert/wan_dit.py)
    c.model.streams = mlc.ConfigDict()
    # name -> dict(dim, length[, rate, window, embedding, added_to]); embedding "mlp" (Wan's text embedder, default)
    # or "norm_mlp" (Wan's image embedder); added_to: attended inside that condition's cross-attention (Wan I2V CLIP)
    c.model.conditions = mlc.ConfigDict()
    c.model.text_encoder = None  # None: text features precomputed; dict(kind="byte", layers, heads): trained with the DiT
    c.model.roles = mlc.ConfigDict(dict(visual=None, audio=None))  # task roles; None: first grid stream / "audio"
    c.model.num_layers = 2
    c.model.heads = 2
    c.model.head_dim = mlc.FieldReference(None, field_type=int)
    c.model.joint_layers = None  # None: every layer; or a tuple of layer indices (JAM-Flow's selective joint layers)
    # True: cond_keep["joint"] (a keep-name, no params) switches a sample's cross-stream attention off in every layer,
    # so flow.condition_dropout.joint trains the streams apart and sample.guidance.joint guides by the partner stream
    c.model.joint_guidance = False
    # velocity | x0: what the output heads predict. x0 (JiT's x-prediction, "Back to Basics", 2025): the heads give the
    # clean tokens and the model returns v = (x_sigma - x0) / max(sigma, 0.05), so losses and samplers are unchanged;
    # a head then never has to carry its input's noise through (a token wider than the model dim cannot), and a
    # target that is 0 (a static background in a residual codec) asks for a 0 output, not a copy of the noise
    c.model.prediction = "velocity"
    c.model.mask = "full"  # mask rule expression, see mmdit/attention/masks.py
    c.model.chunk_frames = mlc.FieldReference(None, field_type=float)  # causal chunk length (ref. latent frames)
    c.model.time_reference = mlc.FieldReference(None, field_type=str)  # default: first grid stream
    c.model.rope_theta = 10000.0
    c.model.freq_dim = 256
    c.model.eps = 1e-6
    c.model.dtype = "float32"  # compute dtype ("bfloat16" on accelerators)
    c.model.param_dtype = "float32"
    c.model.remat = "none"  # none | full | dots | dots_no_batch | offload
    c.model.scan = True
    c.model.sequence_parallel = "none"  # none | ulysses | ring
    c.model.attention = mlc.ConfigDict(
        # impl / cross_impl: xla | cudnn | pallas | splash | auto (per backend and mask, resolved and logged
        # when the model is built: GPU cudnn for `full` in bf16 else pallas, TPU pallas, CPU xla)
        dict(impl="auto", fallback=None, cross_impl="auto", block_q=128, block_k=128, interpret=False)
    )

    c.flow = mlc.ConfigDict()
    c.flow.sigma_dist = "logit_normal"  # logit_normal | uniform
    c.flow.sigma_mean = 0.0
    c.flow.sigma_std = 1.0
    c.flow.shift = 1.0  # training-time schedule shift
    c.flow.independent_streams = 0.0  # fraction of samples whose streams draw independent sigmas (0: shared)
    c.flow.chunk_noise = "shared"  # shared | independent | clean_context: sigma per causal chunk (mmdit/flow.py)
    c.flow.stream_weights = mlc.ConfigDict()  # stream -> loss weight (default 1)
    c.flow.condition_dropout = mlc.ConfigDict()  # condition -> drop probability (for CFG)
    # loss weight of each generated grid stream's first temporal token position against 1 for the others: the key
    # frame a residual codec (codecs.video.residual_gain) codes every later frame against
    c.flow.first_frame_weight = 1.0
    # weight of the error of frame-to-frame changes on grid streams (flow.temporal_difference_loss; 0: off)
    c.flow.temporal_difference_weight = 0.0
    c.flow.silence_dropout = 0.0  # fraction of clips trained in silence mode (model.conditions.<c>.silence_embedding)

    c.tasks = mlc.ConfigDict(dict(t2av=1.0))  # task -> sampling weight (see mmdit/tasks.py)

    c.sample = mlc.ConfigDict()
    c.sample.steps = 30
    c.sample.shift = 3.0
    c.sample.stream_shift = mlc.ConfigDict()  # stream -> shift overriding sample.shift (smaller: denoised ahead)
    c.sample.guidance_mode = "nested"  # nested | independent
    c.sample.guidance = mlc.ConfigDict()  # condition -> scale, or condition -> {stream: scale}
    # nested-CFG order of sample.guidance's conditions (a ConfigDict sorts its keys); (): that sorted order
    c.sample.guidance_order = ()
    c.sample.guidance_schedule = "constant"  # constant | cosine
    # CFG only at the steps whose sigma is in (lo, hi] (Kynkaenniemi et al. 2024), unguided elsewhere; (0, 1): every step
    c.sample.guidance_interval = (0.0, 1.0)
    c.sample.tasks = ("t2av",)  # what mmdit-eval / mmdit-sample / the training sample hook sample
    c.sample.num_per_task = 4  # clips per task for mmdit-eval and mmdit-sample
    c.sample.solver = "euler"  # euler (the ODE) | renoise (x0, then fresh noise: how a distilled student is trained)
    c.sample.stream_cache = "per_step"  # streaming KV cache: per_step (TalkingMachines) | clean (Self-Forcing)
    c.sample.stream_positions = "bounded"  # streaming RoPE positions: bounded (sink-relative window) | absolute
    # stream(): steps of consecutive chunks as row groups of one forward (StreamDiffusion's Stream Batch; per_step +
    # bounded only): up to steps x the throughput, steps - 1 chunk calls more latency (mmdit/sample/stream_batch.py)
    c.sample.stream_batch = False

    c.clip = mlc.ConfigDict(dict(seconds=2.0))
    c.codecs = mlc.ConfigDict()  # video / audio codec settings (mmdit/codecs/registry.py); needed to make data
    c.world = mlc.ConfigDict()  # synthetic talking world (mmdit/data/synthetic.py WorldConfig fields)
    # Frozen pretrained condition encoders (mmdit/encoders/registry.py), each None or a dict with `kind` and
    # `checkpoint` (a folder `mmdit convert` wrote); validated by config_spec.encoders_spec:
    #   text = dict(kind="umt5", checkpoint, tokenizer=None, max_length=None)  -> model.conditions.text, at
    #     ingest and at sample time (a --text prompt is encoded; needs model.text_encoder=None);
    #   audio_features = dict(kind="wav2vec2", checkpoint, layer=None, condition="audio_features") and
    #   image = dict(kind="clip_vision", checkpoint, layer=-2, condition="image") -> precomputed at ingest.
    c.encoders = mlc.ConfigDict(dict(text=None, audio_features=None, image=None))

    c.train = mlc.ConfigDict(
        dict(
            steps=1000,
            global_batch_size=8,
            lr=1e-4,
            warmup_steps=100,
            schedule="cosine",
            weight_decay=0.01,
            grad_clip=1.0,
            b1=0.9,
            b2=0.999,
            ema_decay=0.999,
            grad_accum=1,
            log_every=50,
            checkpoint_every=500,
            keep_checkpoints=2,
            sample_every=0,
            async_checkpoint=True,
            # pretrained start (mmdit/train/init_from.py): a converted checkpoint / workdir / bundle, and
            # fnmatch patterns of source params allowed to stay unused (unmatched or of another shape)
            init_from=mlc.FieldReference(None, field_type=str),
            init_from_ignore=(),
            # training groups (mmdit/util/param_groups.py), fnmatch patterns over '/'-joined param paths
            # (mmdit.config_spec.param_paths): a param trains iff it matches `trainable` and no `freeze`
            # pattern (freeze wins); frozen params get no optimizer state. lr_groups: pattern -> lr multiplier,
            # the last matching pattern wins, e.g. {"*": 0.1, "dit/params/blocks/audio/*": 1.0}
            trainable=("*",),
            freeze=(),
            lr_groups=mlc.ConfigDict(),
            # training stages run in sequence from one launch (mmdit/train/stages.py): a tuple of dicts, each a
            # `name` plus overrides of this run (steps, tasks, trainable, freeze, lr, lr_groups, warmup_steps,
            # init_from_ignore, data); stage k+1 starts from stage k's params; () = one plain run
            stages=(),
        )
    )
    c.data = mlc.ConfigDict(dict(dir=None, num_workers=0, num_shards=None, num_train=512, num_eval=16, examples_per_shard=128))
    c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, sequence=1, tensor=1, dcn=None, rules=None))  # -1 fills the devices
    c.distributed = mlc.ConfigDict(dict(coordinator=None, num_processes=None, process_id=None))
    c.profile = mlc.ConfigDict(dict(start_step=-1, num_steps=0))

    # Few-step distillation (mmdit distill; every field's meaning: mmdit/distill/spec.py). A config is a distillation
    # config once `teacher` is not None ("" until --teacher gives the workdir): mmdit-plan then counts three param sets.
    c.distill = mlc.ConfigDict(
        dict(
            teacher=None,  # the teacher's training workdir
            teacher_step=None,  # None: its latest good checkpoint
            teacher_params="ema",  # ema | params
            student_init=None,  # None: the student starts as the teacher; or a warm-up run's workdir (W/student, W)
            guidance=None,  # the teacher's CFG scales (sample.guidance's form); None: the teacher config's
            guidance_interval=None,  # (lo, hi): the teacher guides where sigma is in (lo, hi]; None: its sample.guidance_interval
            denoising_step_list=(1.0, 0.75),  # the student's sigmas, descending from 1.0
            rollout="self",  # self (Self-Forcing) | teacher_forced (CausVid)
            critic_steps=5,  # critic updates per generator update
            critic_lr=None,  # None: train.lr
            dmd_weight=1.0,  # 0: regression only (the ODE warm-up; no critic updates)
            regression_weight=0.0,
            regression_pairs="on_the_fly",  # on_the_fly | records (mmdit distill prepare)
            ode_steps=None,  # None: the teacher config's sample.steps
            ode_shift=None,  # None: the teacher config's sample.shift
            dmd_sigma_min=0.02,
            dmd_sigma_max=0.98,
            tasks=mlc.ConfigDict(dict(t2av=1.0)),  # task -> weight of the student's rollouts (t2av, a2v)
        )
    )
    return c
