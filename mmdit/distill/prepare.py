"""``mmdit distill prepare``: precomputes teacher ODE pairs into records (``distill.regression_pairs =
"records"``), so the distillation step does not integrate the teacher's ODE itself.

For every example of the input records (the student's training records) and every task of
``distill.tasks`` with a positive weight (``t2av``: both streams generated from the example's conditions;
``a2v``: the video generated to the example's audio), the teacher's guided Euler ODE (``distill.ode_steps``,
``distill.ode_shift``, the step list merged in: :mod:`mmdit.distill.ode_pairs`) runs from noise drawn from
``fold_in(fold_in(key(seed), index of the first example of its batch), task index)``. The output records are
the input examples plus, per task and stream the task generates (tokens ``float32 [S, C]``):
``ode_<task>_target_<s>`` (the endpoint) and ``ode_<task>_state<k>_<s>`` (the state at
``denoising_step_list[k]``; ``k = 0`` is the noise). The distillation step regresses each sample on the pair of
the task it drew, so every task it trains is anchored to the teacher. Train on them with ``--data OUT`` and
``distill.regression_pairs=records``.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from mmdit import tasks
from mmdit.data import records
from mmdit.distill import ode_pairs
from mmdit.distill import teacher as teacher_lib
from mmdit.distill.spec import PAIR_STATE, PAIR_TARGET
from mmdit.distill.step import guided_teacher
from mmdit.model.diffusion import DiffusionModel


def prepare_pairs(cfg, data_dir: str, out_dir: str, *, batch: int = 4, overwrite: bool = False, progress: bool = True) -> dict:
    """Writes ``out_dir`` (module docstring) from the records in ``data_dir``; returns its manifest.
    The teacher is checked against the student first (nothing is written when it does not match)."""
    dspec, teacher_cfg = teacher_lib.check_teacher(cfg)
    student = DiffusionModel.from_config(cfg)
    teacher_model = DiffusionModel.from_config(teacher_cfg)
    _, params, _ = teacher_lib.load_teacher(dspec.teacher, dspec.teacher_step, dspec.teacher_params)
    source = records.open_dataset(data_dir)
    sigmas, positions = ode_pairs.merged_schedule(
        dspec.ode_steps or int(teacher_cfg.sample.steps),
        dspec.ode_shift if dspec.ode_shift is not None else float(teacher_cfg.sample.shift),
        dspec.denoising_step_list,
    )
    velocity_of = guided_teacher(teacher_model, teacher_cfg, dspec.guidance, dspec.guidance_interval)
    schema = student.input_spec()
    gen = sorted(student.spec.generated)
    task_names = list(dspec.drawn_tasks)
    paired = {t: ode_pairs.paired_streams(student.spec, t, cfg.model) for t in task_names}

    @functools.partial(jax.jit, static_argnums=3)
    def pairs(params, fields, key, task):
        latents = schema.latents_of(fields)
        clean = student.tokens({k: v.astype(jnp.float32) for k, v in latents.items()})
        raw = schema.canonical_conditions(schema.conditions_of(fields), batch)
        tm = tasks.task_masks(task, key, student.spec, batch, cfg.model)
        noise = {n: jax.random.normal(jax.random.fold_in(key, i), clean[n].shape) for i, n in enumerate(gen)}
        known = {n: tm.known[n] for n in gen}

        def velocity(x, sigma):
            return velocity_of(params, {**clean, **x}, sigma, raw, tm)

        return ode_pairs.ode_pair(velocity, noise, clean, known, sigmas, positions)

    keys = schema.record_keys()
    total = len(source)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"teacher ODE pairs ({', '.join(task_names)})", unit="example")
    metadata = dict(
        source.manifest.get("metadata", {}),
        distill_pairs={
            "teacher": dspec.teacher,
            "steps": list(dspec.denoising_step_list),
            "tasks": task_names,
            "source": os.path.abspath(data_dir),  # the distill loop finds the eval records beside it
        },
    )
    with records.ShardWriter(
        out_dir,
        examples_per_shard=int(cfg.data.examples_per_shard),
        overwrite=overwrite,
        producer="mmdit distill prepare",
        metadata=metadata,
    ) as writer:
        for start in range(0, total, batch):
            idx = list(range(start, min(start + batch, total)))
            examples = [source[i] for i in idx]
            padded = examples + [examples[-1]] * (batch - len(examples))  # one compiled batch size
            fields = {k: np.stack([np.asarray(e[k]) for e in padded]) for k in keys}
            key = jax.random.fold_in(jax.random.key(int(cfg.seed)), start)
            outs = [dict(example) for example in examples]
            for t, task in enumerate(task_names):
                states, endpoint = jax.device_get(pairs(params, fields, jax.random.fold_in(key, t), task))
                for j, out in enumerate(outs):
                    for n in paired[task]:
                        out[PAIR_TARGET.format(task=task, stream=n)] = np.asarray(endpoint[n][j], np.float32)
                        for k, state in enumerate(states):
                            out[PAIR_STATE.format(task=task, k=k, stream=n)] = np.asarray(state[n][j], np.float32)
            for out in outs:
                writer.write(out)
            if bar is not None:
                bar.update(len(examples))
    if bar is not None:
        bar.close()
    return records.read_manifest(out_dir)
