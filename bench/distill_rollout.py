"""Seconds per distillation iteration: the student's rollouts on the streaming KV cache vs full-sequence
passes (issue 13, :mod:`mmdit.distill.cached_rollout` vs :mod:`mmdit.distill.rollout`).

    python3 bench/distill_rollout.py [--config configs/demo_distill.py] [--repeats 3] [--out bench/results/distill_rollout.json]

Both implementations' generator step (rollout with gradient, teacher + critic at the re-noised
sample, regression on the teacher's ODE pair, AdamW) and critic step (a rollout without gradient,
the critic's flow-matching update) are compiled in this process (compile time reported apart), then
timed alternately (cache, full, cache, full, ...) on the same batch so load drift on shared cores
hits both alike; the median of ``--repeats`` runs each. An iteration is one critic step plus a
generator step every ``distill.critic_steps`` iterations:
``iteration = critic + generator / critic_steps``.

Teacher, critic and student start from one random init (speed does not depend on the weights); the
teacher is ``configs/demo.py`` (the demo distill config's teacher world, bidirectional).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mmdit import config_lib, config_spec  # noqa: E402
from mmdit.distill import state as state_lib  # noqa: E402
from mmdit.distill.spec import distill_spec  # noqa: E402
from mmdit.distill.step import make_step  # noqa: E402
from mmdit.model.chunks import num_chunks  # noqa: E402
from mmdit.model.diffusion import DiffusionModel  # noqa: E402
from mmdit.sample.streaming import stream_geometry  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo_distill.py", help="the distill config (its student)")
    p.add_argument("--teacher-config", default="configs/demo.py", help="the teacher's config")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per step kind and implementation")
    p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    p.add_argument("--out", default=None, help="write the JSON here")
    a = p.parse_args(argv)

    cfg = config_lib.override(config_lib.load(a.config), ["distill.teacher=in-memory"] + a.set)
    teacher_cfg = config_lib.load(a.teacher_config)
    dspec = distill_spec(cfg)
    student, teacher = DiffusionModel.from_config(cfg), DiffusionModel.from_config(teacher_cfg)
    s_tx, c_tx = state_lib.make_optimizers(config_spec.train_spec(cfg), dspec.critic_lr)
    teacher_params = nn.unbox(teacher.init(jax.random.key(0)))
    state = state_lib.assemble(teacher_params, s_tx, c_tx, jax.random.key(1))
    B = config_spec.train_spec(cfg).global_batch_size
    batch = {
        k: jax.random.normal(jax.random.key(2), s.shape) if s.dtype == np.float32 else jnp.zeros(s.shape, s.dtype)
        for k, s in student.input_spec().batch_shapes(B).items()
    }
    impls = ("cache", "full")
    fns, compile_s = {}, {}
    for impl in impls:
        for gen in (True, False):
            t0 = time.perf_counter()
            step = make_step(student, teacher, cfg, teacher_cfg, dspec, s_tx, c_tx, generator=gen, rollout_impl=impl)
            fns[impl, gen] = jax.jit(step).lower(state, teacher_params, batch).compile()
            name = f"{impl}/{'generator' if gen else 'critic'}"
            compile_s[name] = round(time.perf_counter() - t0, 1)
            print(f"compiled {name}: {compile_s[name]} s", flush=True)

    times = {(impl, gen): [] for impl in impls for gen in (True, False)}
    for impl in impls:  # warm-up run (first-call allocations)
        for gen in (True, False):
            jax.block_until_ready(fns[impl, gen](state, teacher_params, batch))
    for r in range(a.repeats):
        for gen in (True, False):
            for impl in impls:
                t0 = time.perf_counter()
                jax.block_until_ready(fns[impl, gen](state, teacher_params, batch))
                times[impl, gen].append(time.perf_counter() - t0)
        print(f"repeat {r + 1}/{a.repeats} done", flush=True)

    cache_mode, positions = stream_geometry(cfg)
    result = {
        "config": a.config,
        "overrides": a.set,
        "batch": B,
        "chunks": num_chunks(student.spec),
        "denoising_steps": dspec.num_steps,
        "critic_steps": dspec.critic_steps,
        "rollout": dspec.rollout,
        "regression_weight": dspec.regression_weight,
        "stream_cache": cache_mode,
        "stream_positions": positions,
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
        "compile_s": compile_s,
    }
    for impl in impls:
        g, c = statistics.median(times[impl, True]), statistics.median(times[impl, False])
        result[impl] = {
            "generator_s": round(g, 3),
            "critic_s": round(c, 3),
            "iteration_s": round(c + g / dspec.critic_steps, 3),
            "generator_runs_s": [round(t, 3) for t in times[impl, True]],
            "critic_runs_s": [round(t, 3) for t in times[impl, False]],
        }
    result["speedup_iteration"] = round(result["full"]["iteration_s"] / result["cache"]["iteration_s"], 2)
    print(json.dumps(result, indent=1))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
