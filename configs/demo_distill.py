"""Few-step distillation of the demo teacher (``configs/demo.py``, bidirectional, 25 Euler steps)
into a 2-step chunk-causal student (``mmdit distill``).

The student is the demo world with ``model.chunk_frames`` set and ``chunk_causal`` added to the
demo's mask (a query in chunk c sees chunks 0, c-1 and c; mask rules have no params, so teacher,
fake score and student share one param tree). ``distill.teacher`` is the teacher's training
workdir: ``--set distill.teacher=W`` (or ``mmdit distill --teacher W``).

Variants: ``tiny`` (tests: the tiny demo world, a few iterations) and ``steps4`` (a 4-step
student); other chunk sizes: ``--set model.chunk_frames=N``.
"""

from mmdit import config_lib


def get_config(arg=None):
    v = config_lib.parse_arg(arg, tiny=False, steps4=False)
    c = config_lib.sibling(__file__, "demo", "tiny" if v.tiny else None)

    # latent frames (= video frames here) per causal chunk, a divisor of the clip's frames (49 = 7 x 7; the
    # tiny world's 17 is prime): 280 ms at 25 fps
    c.model.chunk_frames = 1.0 if v.tiny else 7.0
    c.model.mask = "chunk_causal & local(1) & no_peek"
    c.tasks = dict(t2av=0.5, a2v=0.5)  # validated like training's; the rollouts use distill.tasks

    c.distill = dict(
        teacher="",
        teacher_step=None,
        teacher_params="ema",
        guidance=None,  # the teacher config's sample.guidance
        # = the Euler schedule of sample.steps at sample.shift=3 without its final 0 (ode.sampling_sigmas), so the
        # exported student samples / streams on the very σ's it was distilled on
        denoising_step_list=(1.0, 0.9, 0.75, 0.5) if v.steps4 else (1.0, 0.75),
        rollout="self",
        critic_steps=5,
        critic_lr=None,
        dmd_weight=1.0,
        regression_weight=0.25,
        regression_pairs="on_the_fly",
        ode_steps=None,
        ode_shift=None,
        dmd_sigma_min=0.02,
        dmd_sigma_max=0.98,
        tasks=dict(t2av=0.5, a2v=0.5),
    )
    # The distilled student samples without CFG (the teacher's guidance is distilled into it).
    c.sample.steps = 4 if v.steps4 else 2
    c.sample.guidance = {}

    c.train.steps = 600
    c.train.lr = 2e-4
    c.train.warmup_steps = 20
    c.train.schedule = "constant"
    c.train.ema_decay = 0.99
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.sample_every = 0
    if v.tiny:
        c.train.steps = 6
        c.train.warmup_steps = 1
        c.train.log_every = 1
        c.train.checkpoint_every = 3
        c.distill.critic_steps = 2
        c.distill.ode_steps = 4
    return c
