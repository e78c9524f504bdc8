"""Few-step distillation of the demo teacher (``configs/demo.py``, bidirectional, 25 Euler steps)
into a 2-step chunk-causal student (``mmdit distill``).

The student is the demo world with ``model.chunk_frames`` set and ``chunk_causal`` added to the
demo's mask (a query in chunk c sees chunks 0, c-1 and c; mask rules have no params, so teacher,
fake score and student share one param tree). ``distill.teacher`` is the teacher's training
workdir: ``--set distill.teacher=T`` (or ``mmdit distill --teacher T``). Only the fields that
differ from ``configs/base.py``'s ``distill`` defaults are set here.

The recipe (CausVid: an ODE-regression warm-up, then DMD from it), with the teacher's ODE pairs
computed once::

    mmdit distill prepare --config configs/demo_distill.py:warmup --teacher T --data T/data/train --out P
    mmdit distill --config configs/demo_distill.py:warmup --teacher T --workdir W_warmup --data P
    mmdit distill --config configs/demo_distill.py --teacher T --workdir W --data T/data/train \\
        --set distill.student_init=W_warmup/student

``prepare`` integrates the teacher's guided ODE once per training clip and task of ``distill.tasks`` (512 T2AV and
512 A2V pairs, 4.8 min on 2 cores for the default teacher); the warm-up (``dmd_weight=0``,
``regression_weight=1``, ``regression_pairs="records"``, 400 iterations, 3.0-3.5 min) then trains only the
student on them, each sample on the pair of the task it drew -- 2.7 iterations/s instead of 0.3 with the ODE
integrated inside every step, so it sees 4x the iterations in half the time. The DMD run's student starts from the
warm-up's EMA params (its fake score from the teacher). One run without ``student_init`` (DMD + regression from
the teacher) also works.

The student samples with ``sample.solver="renoise"``: at every step it predicts the clean chunk and
re-noises it with fresh noise, the very rule its rollouts are trained with (Self-Forcing), instead of
an Euler step that keeps the starting noise correlated with the output. Measured on the demo's c7s2
student (bench/distill_table.py, 16 clips), against Euler sampling: lag-0 sync frac T2AV 0.77 -> 0.81,
A2V 0.83 -> 0.90, background flicker 7.6e-3 -> 5.5e-3.

Variants: ``tiny`` (tests: the tiny demo world, a few iterations), ``steps4`` (a 4-step student),
``warmup`` (the regression-only warm-up above) and ``full`` (the student of the demo's default teacher, with its
additions -- reference channels, joint guidance, the residual codec, x-prediction, the temporal-difference loss --
instead of ``plain``;
the teacher's text-then-joint CFG is what DMD distils); combine with commas (``tiny,warmup``).
Measured (``full``, 16 clips, ``bench/results/distill_table_full.json``; its teacher trained before the temporal-difference
loss joined the default): the x-predicting default teacher keeps
its sync at 2 Euler steps (T2AV lag-0 r 0.78 vs 0.79 at 25), and the 2-step student reaches 0.72 in T2AV, 0.81 in
A2V (teacher 0.79; 0.69 / 0.82 before the distill losses weighed the key frame like training's
``flow.first_frame_weight``), 7.7x faster than the 25-step teacher at batch 1, 15x at batch 16. From the current
default teacher (temporal-difference loss, sampled with its guidance interval; the real score and the ODE pairs
gated by the same interval, ``distill.guidance_interval``), T2AV lag-0 r on 16 clips (chance 0.03, ground truth
0.89): teacher 0.86 at 25 steps, 0.88 at 4, 0.78 at 2 Euler steps. The prepared-pairs warm-up (400 iterations,
``bench/results/distill_table_full_both_pairs.json``) alone brings the 2-step student to 0.82 in T2AV and 0.89 in A2V
(teacher 0.87), Fréchet distance 1.74 / 2.06 (teacher at 2 steps 3.89 / 2.58, floor 1.86), flicker 3.7e-5 (5.8e-5).
With T2AV pairs only (what ``prepare`` wrote before it paired every task; ``distill_table_full_records.json``, same
run in ``..._both_pairs.json``) A2V was 0.87, FD 2.36 / 2.23; 1,000 iterations of that changed nothing measurable.
Before it, a 100-iteration warm-up with the ODE inside every step (5.7 min) reached only 0.78, the teacher's own
2-step figure. DMD from the 400-iteration warm-up (``regression_weight=1.0`` on the pairs, 600 iterations, 6.7 min)
moves T2AV sync to 0.84 but costs frame quality (FD 2.27, A2V FD 3.29; from the T2AV-pairs warm-up 0.82, FD 2.57 /
3.74): on this world the warm-up is the student, and DMD has not yet earned its place (from the older 100-iteration
warm-up it traded sync for FD, ``distill_table_full_interval*.json``). Other
chunk sizes: ``--set model.chunk_frames=N``; the small-chunk cells of Table 1 (``model.chunk_frames=1.0``: 40 ms
chunks, 49 per clip; ``bench/results/distill_table.json``) reach T2AV lag-0 r 0.68 (2 steps) / 0.75 (4 steps)
against the plain teacher's 0.51 at 25 steps (A2V 0.76 / 0.80 vs 0.39), but at batch 1 on a CPU a chunk this
small is all per-call overhead: 2.6x (2 steps) and 1.1-1.4x (4 steps) the teacher's speed per generated second
(one retimed run; the 7-frame 2-step student 5.6x, 10x at batch 16).
"""

from mmdit import config_lib


def get_config(arg=None):
    v = config_lib.parse_arg(arg, tiny=False, steps4=False, warmup=False, full=False)
    base = ("tiny," if v.tiny else "") + ("" if v.full else "plain")
    c = config_lib.sibling(__file__, "demo", base.strip(",") or None)

    # latent frames (= video frames here) per causal chunk, a divisor of the clip's frames (49 = 7 x 7; the
    # tiny world's 17 is prime): 280 ms at 25 fps
    c.model.chunk_frames = 1.0 if v.tiny else 7.0
    c.model.mask = "chunk_causal & local(1) & no_peek"
    c.tasks = dict(t2av=0.5, a2v=0.5)  # validated like training's; the rollouts use distill.tasks

    c.distill.teacher = ""  # a distillation config (mmdit-plan counts three param sets); --teacher gives it
    # = the Euler schedule of sample.steps at sample.shift=3 without its final 0 (ode.sampling_sigmas), so the
    # exported student samples / streams on the very σ's it was distilled on
    c.distill.denoising_step_list = (1.0, 0.9, 0.75, 0.5) if v.steps4 else (1.0, 0.75)
    # DMD alone loses the full teacher's T2AV sync (0.78 after the warm-up -> 0.65 at 0.25); the ODE map holds it (docstring)
    c.distill.regression_weight = 1.0 if v.full else 0.25
    c.distill.tasks = dict(t2av=0.5, a2v=0.5)
    # The distilled student samples without CFG (the teacher's guidance is distilled into it).
    c.sample.steps = 4 if v.steps4 else 2
    c.sample.guidance = {}
    c.sample.guidance_order = ()
    c.sample.solver = "renoise"  # the distill rollouts' x0-and-fresh-noise rule (docstring)
    c.sample.tasks = ("t2av", "a2v")  # what the TensorBoard samples (train.sample_every) show

    c.train.steps = 600
    c.train.lr = 2e-4
    c.train.warmup_steps = 20
    c.train.schedule = "constant"
    c.train.ema_decay = 0.99
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.sample_every = 300
    if v.warmup:  # regression only, on the pairs `mmdit distill prepare` wrote (--data P; docstring)
        c.distill.dmd_weight = 0.0
        c.distill.regression_weight = 1.0
        c.distill.regression_pairs = "records"
        c.train.steps = 400
        c.train.checkpoint_every = 100
        c.train.sample_every = 200
    if v.tiny:
        c.train.steps = 6
        c.train.warmup_steps = 1
        c.train.log_every = 1
        c.train.checkpoint_every = 3
        c.train.sample_every = 0
        c.distill.critic_steps = 2
        c.distill.ode_steps = 4
    return c
