"""The distillation loop, launched like training: config -> teacher check -> models -> sharded setup
-> data -> state (restored or fresh from the teacher) -> iterations (log, checkpoint) -> student export.

Workdir layout (as training's): ``config.json`` (the resolved distill config), ``teacher.json`` (the
teacher workdir and the checkpoint step used: a resumed run reloads that same step),
``checkpoints/<step>/`` (the whole :class:`mmdit.distill.state.DistillState` + data iterator,
orbax + sha256), ``metrics.jsonl`` and ``tensorboard/`` (``gen/loss``, ``gen/dmd_loss``,
``gen/regression_loss``, ``gen/grad_norm``, ``critic/loss``, ``critic/grad_norm``, ``dmd/*``, lr,
steps/sec; every ``train.sample_every`` iterations ``samples/<task>`` clips of the EMA student,
:mod:`mmdit.eval.train_samples`), and ``student/``: a normal training workdir of the student (its ``config.json`` with
``sample.steps`` = the step list's length and no CFG, ``checkpoints/<step>`` holding the student's
:class:`mmdit.train.state.TrainState`), written when the run reaches ``train.steps``, which
``mmdit export`` / ``mmdit sample`` / ``mmdit eval`` take as ``--workdir``.

Iteration ``n`` updates the student when ``n % distill.critic_steps == 0``, then always the critic
(:mod:`mmdit.distill.step`); with ``distill.dmd_weight=0`` (the regression-only ODE warm-up) every
iteration updates the student and none the critic. Critic metrics are logged every
``train.log_every`` iterations; generator metrics only at iterations that ran the generator: the
last such iteration of each logging window (every one with ``log_every=1``).

The student starts as the teacher, or from ``distill.student_init`` (a warm-up run,
:mod:`mmdit.distill.student_init`); the fake score always starts as the teacher.

Resuming is automatic (rerun the same command): the latest good checkpoint restores the state, the
iteration count, the RNG and the data position, so the logged metrics match an uninterrupted run
exactly (on CPU) whatever ``train.checkpoint_every`` is.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mmdit import config_lib, config_spec, parallel
from mmdit.data import codec_stamp, records
from mmdit.data.sharded_iterator import data_iterator
from mmdit.distill import ode_pairs
from mmdit.distill import state as state_lib
from mmdit.distill import student_init as student_init_lib
from mmdit.distill import teacher as teacher_lib
from mmdit.distill.step import make_step
from mmdit.model.diffusion import DiffusionModel
from mmdit.parallel import distributed
from mmdit.train import checkpoint, sharding
from mmdit.train.loop import default_data_dir
from mmdit.train.console import print_on_process_0, progress_bar, warn_on_process_0
from mmdit.train.metrics import MetricWriter
from mmdit.train.resume import restore_latest
from mmdit.train.state import learning_rate_schedule
from mmdit.util.files import write_json_atomic
from mmdit.util.lock import DirLock

TEACHER_RECORD = student_init_lib.DISTILL_RECORD  # teacher.json
STUDENT_DIR = "student"


def distill(
    cfg,
    workdir: str,
    *,
    data_dir: str | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    verify_checkpoint: bool = True,
    lock: bool = True,
    log=None,
    iteration_hook=None,
    compiler_options: dict | None = None,
    samples: bool = True,
) -> dict:
    """Distils ``cfg.distill.teacher`` into ``cfg``'s student in ``workdir``; returns the last logged
    value of each metric. ``stop_after``: end after that many new iterations (tests).
    ``iteration_hook(done, state)`` runs after each iteration (tests: kill the process mid-run).
    ``compiler_options``: XLA options for the step functions (tests:
    ``{"xla_backend_optimization_level": 0}``). ``samples``: log TensorBoard samples every
    ``train.sample_every`` iterations (:func:`sample_hook`).

    Every config section, the teacher's compatibility and ``distill.student_init``'s param tree are
    checked before the workdir is touched (a refused run leaves it exactly as it was)."""
    config_spec.build_run_spec(cfg)
    dspec, teacher_cfg = teacher_lib.check_teacher(cfg)
    init_source = _check_student_init(cfg, dspec)
    _check_record_fields(cfg, dspec, data_dir or default_data_dir(cfg, os.path.abspath(workdir)))
    distributed.maybe_initialize(cfg)
    workdir = os.path.abspath(workdir)
    log = log or print_on_process_0
    with contextlib.ExitStack() as stack:
        if lock and jax.process_index() == 0:
            stack.enter_context(DirLock(workdir, command=f"mmdit distill --workdir {workdir}"))
        return _distill_locked(
            cfg,
            dspec,
            teacher_cfg,
            workdir,
            data_dir,
            stop_after,
            progress,
            verify_checkpoint,
            log,
            iteration_hook,
            compiler_options,
            init_source,
            samples,
        )


def batch_fields(model, dspec, model_cfg=None) -> list[str]:
    """The record fields one distillation batch holds: the student's inputs, plus the ODE pairs
    ``mmdit distill prepare`` writes, for every task the step draws, when the regression reads them from records."""
    keys = sharding.input_keys(model)
    if dspec.regression_pairs == "records" and dspec.regression_weight > 0:
        keys += ode_pairs.pair_fields(model.spec, dspec.drawn_tasks, dspec.num_steps, model_cfg)
    return keys


def missing_field_error(missing, have, data_dir: str) -> ValueError:
    """The error for record fields a batch needs and ``data_dir`` lacks, with the fix (``prepare`` for ``ode_*``)."""
    hint = "re-create the data"
    if any(k.startswith("ode_") for k in missing):
        hint = (
            f"run `mmdit distill prepare --config ... --teacher T --data {data_dir} --out PAIRS` with this config's "
            "distill.tasks (it writes pairs for each) and pass --data PAIRS (or set distill.regression_pairs=on_the_fly)"
        )
    return ValueError(f"{data_dir} lacks record field(s) {list(missing)} the distillation needs (have {sorted(have)}); {hint}")


def _check_record_fields(cfg, dspec, data_dir: str) -> None:
    """``data_dir``'s manifest lists every field of :func:`batch_fields` (reads the manifest only)."""
    have = set(records.read_manifest(data_dir).get("schema", {}))
    missing = [k for k in batch_fields(DiffusionModel.from_config(cfg), dspec, cfg.model) if k not in have]
    if missing:
        raise missing_field_error(missing, have, data_dir)


def _check_student_init(cfg, dspec):
    """The :class:`mmdit.train.init_from.Source` of ``distill.student_init`` once it is known to hold
    the student's params (None when unset); reads metadata only."""
    if dspec.student_init is None:
        return None
    source = student_init_lib.open_source(dspec.student_init)
    model = DiffusionModel.from_config(cfg)
    student_init_lib.check(source, nn.unbox(jax.eval_shape(model.init, jax.random.key(0))))
    return source


def eval_dir_for(workdir: str, data_dir: str) -> str | None:
    """Eval records to condition TensorBoard samples on: ``WORKDIR/data/eval``, else the ``eval``
    records beside the training ones (``DATA/../eval``: a teacher workdir's ``data/``), else, for pairs
    written by ``mmdit distill prepare``, beside the records they were prepared from (the manifest's
    ``distill_pairs.source``); None if none of them exists."""
    candidates = [os.path.join(workdir, "data", "eval"), os.path.join(os.path.dirname(os.path.abspath(data_dir)), "eval")]
    try:
        source = records.read_manifest(data_dir).get("metadata", {}).get("distill_pairs", {}).get("source")
    except ValueError:  # not a records directory: the checks of the data say so elsewhere
        source = None
    if source:
        candidates.append(os.path.join(os.path.dirname(source), "eval"))
    for d in candidates:
        if os.path.isfile(os.path.join(d, "manifest.json")):
            return d
    return None


def sample_hook(cfg, dspec, student_model, workdir: str, data_dir: str, log):
    """``hook(done, student TrainState, writer)``: training's sample hook
    (:func:`mmdit.eval.train_samples.make_sample_hook`: the first two of ``sample.tasks`` from the EMA
    student, its Euler sampler at ``sample.steps`` = the step list's length, on the first eval
    record) or None (``train.sample_every`` 0, no codecs, or no eval records: said through ``log``)."""
    if not config_spec.train_spec(cfg).sample_every or not config_spec.has_codecs(cfg):
        return None
    eval_dir = eval_dir_for(workdir, data_dir)
    if eval_dir is None:
        log(
            f"note: no eval records in {workdir}/data/eval or beside {data_dir}: no TensorBoard samples "
            "(train.sample_every); make them with mmdit-data synth"
        )
        return None
    from mmdit.eval.train_samples import make_sample_hook

    return make_sample_hook(student_config(cfg, dspec), student_model, eval_dir)


def _teacher_step(workdir: str, requested: int | None) -> int | None:
    """The teacher step a resumed run used (``teacher.json``), else ``requested``."""
    path = os.path.join(workdir, TEACHER_RECORD)
    if requested is None and os.path.isfile(path):
        with open(path) as f:
            return int(json.load(f)["step"])
    return requested


def _global_batch(batch_shardings: dict, batch_size: int, local: dict, data_dir: str) -> dict:
    """Per-host numpy batch -> global sharded arrays (as :meth:`ShardedTrain.global_batch`)."""
    out = {}
    missing = [k for k in batch_shardings if k not in local]
    if missing:  # the manifest was checked up front; a record can still disagree with it
        raise missing_field_error(missing, local, data_dir)
    for k, sh in batch_shardings.items():
        x = np.asarray(local[k])
        out[k] = jax.make_array_from_process_local_data(sh, x, (x.shape[0] * jax.process_count(),) + x.shape[1:])
    return out


def _distill_locked(
    cfg,
    dspec,
    teacher_cfg,
    workdir,
    data_dir,
    stop_after,
    progress,
    verify_checkpoint,
    log,
    hook,
    compiler_options,
    init_source,
    samples,
):
    spec = config_spec.build_run_spec(cfg)
    checkpoint.check_config_matches(workdir, cfg)
    student_model = DiffusionModel.from_config(cfg)
    teacher_model = DiffusionModel.from_config(teacher_cfg)
    student_tx, critic_tx = state_lib.make_optimizers(spec.train, dspec.critic_lr)
    mesh = parallel.make_mesh(sharding.mesh_config(cfg))
    rules = sharding.rules_of(cfg)
    boxed = state_lib.abstract_state(student_model, student_tx, critic_tx)
    sharding.validate(cfg, student_model, mesh, rules, boxed.student.params)
    state_sh = state_lib.state_shardings(boxed, mesh, rules)
    teacher_sh = state_sh.student.params  # the teacher is sharded exactly like the student
    axes = sharding.batch_axes(rules)
    keys = batch_fields(student_model, dspec, cfg.model)
    batch_sh = {k: NamedSharding(mesh, PartitionSpec(axes or None)) for k in keys}
    batch_size = spec.train.global_batch_size
    data_dir = data_dir or default_data_dir(cfg, workdir)
    records.open_dataset(data_dir)  # manifest and shards readable (a clear error before compiling)
    note = codec_stamp.check_codecs(
        cfg, data_dir, require_stamp=False, fix="distil on the records of the teacher's codecs (--data TEACHER/data/train)"
    )
    if note:
        log(note)
    block = sharding.process_batch_block(next(iter(batch_sh.values())), batch_size)
    data_iter = data_iterator(cfg, data_dir, block)

    note = sampling_mismatch(cfg, dspec)
    if note:
        log(note)
    teacher_step = _teacher_step(workdir, dspec.teacher_step)
    _, teacher_params, teacher_step = teacher_lib.load_teacher(dspec.teacher, teacher_step, dspec.teacher_params)
    teacher_params = jax.device_put(teacher_params, teacher_sh)
    if jax.process_index() == 0:
        config_lib.write_resolved(cfg, workdir)
        write_json_atomic(
            os.path.join(workdir, TEACHER_RECORD),
            {"teacher": os.path.abspath(dspec.teacher), "step": int(teacher_step), "params": dspec.teacher_params},
        )
    manager = checkpoint.make_manager(workdir, spec.train)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), sharding.strip_boxes(boxed), state_sh
    )
    total = spec.train.steps
    restored = restore_latest(
        manager, abstract, data_iter, workdir, total, verify=verify_checkpoint, log=log, warn=warn_on_process_0, verb="distil"
    )
    if restored.finished:
        return {}
    state = restored.state
    if state is None:
        init = jax.jit(lambda p, r: state_lib.assemble(p, student_tx, critic_tx, r), out_shardings=state_sh)
        with sharding.activate(mesh, rules):
            state = init(teacher_params, jax.random.key(int(cfg.seed)))
        if init_source is not None:  # only a fresh run: a resumed one keeps its checkpoint's student
            params = student_init_lib.load(init_source, state.student.params, state_sh.student.params)
            ema = jax.tree.map(jnp.copy, params)  # a distinct buffer (the state is donated)
            state = state.replace(student=state.student.replace(params=params, ema=ema))
            log(f"student initialised from {init_source.path} ({init_source.kind}, {init_source.note})")

    replicated = NamedSharding(mesh, PartitionSpec())
    steps = {}
    for kind in ("generator", "critic") if dspec.trains_critic else ("warmup",):
        fn = _iteration_fn(
            kind,
            make_step(student_model, teacher_model, cfg, teacher_cfg, dspec, student_tx, critic_tx, generator=kind != "critic"),
        )
        steps[kind] = jax.jit(
            fn, in_shardings=(state_sh, teacher_sh, batch_sh), out_shardings=(state_sh, replicated), donate_argnums=(0,)
        )
    compiled = {}

    def run(kind, state, batch):
        if not compiled:  # every kind, in one order, from the abstract state: a resumed run (whose first
            # iteration may be critic-only) runs the very executables an uninterrupted one does
            with sharding.activate(mesh, rules):
                for k, fn in steps.items():
                    compiled[k] = fn.lower(abstract, teacher_params, batch).compile(compiler_options=compiler_options)
        with sharding.activate(mesh, rules):
            return compiled[kind](state, teacher_params, batch)

    start = int(state.step)
    writer = MetricWriter(workdir)
    samples_hook = sample_hook(cfg, dspec, student_model, workdir, data_dir, log) if samples else None
    schedule = learning_rate_schedule(spec.train)
    log_every, sample_every = spec.train.log_every, spec.train.sample_every
    bar = progress_bar(progress, start, total, "distill")
    last = {}
    t_last, n_last = time.perf_counter(), start
    end = total if stop_after is None else min(total, start + stop_after)
    for it in range(start, end):
        batch = _global_batch(batch_sh, batch_size, next(data_iter), data_dir)
        done, logged = it + 1, {}
        if dspec.runs_generator(it):
            state, gen_metrics = run("generator" if dspec.trains_critic else "warmup", state, batch)
            if logs_generator(done, log_every, dspec, end):
                logged.update(jax.device_get(gen_metrics))
        if dspec.trains_critic:
            state, critic_metrics = run("critic", state, batch)
        if done % log_every == 0 or done == end:
            if dspec.trains_critic:
                logged.update(jax.device_get(critic_metrics))
            now = time.perf_counter()
            rate = (done - n_last) / max(now - t_last, 1e-9)
            t_last, n_last = now, done
            logged.update({"lr": schedule(int(state.student.step)), "steps_per_sec": rate})
        if logged:
            logged = {k: float(v) for k, v in logged.items()}
            writer.scalars(done, logged)
            last.update(logged)
            if bar is not None:
                bar.set_postfix({k: f"{last[k]:.4f}" for k in ("gen/loss", "critic/loss") if k in last})
        if done % spec.train.checkpoint_every == 0 or done == total:
            checkpoint.save(manager, done, state, data_iter)
        if done == total:
            export_student(cfg, dspec, workdir, state.student, done)
        if samples_hook is not None and sample_every and done % sample_every == 0:
            samples_hook(done, state.student, writer)
        if hook is not None:
            hook(done, state)
        if bar is not None:
            bar.update(1)
    checkpoint.finish(manager)
    writer.close()
    if bar is not None:
        bar.close()
    return last


def _iteration_fn(kind: str, step):
    """``step`` (:func:`mmdit.distill.step.make_step`) for one kind of iteration: ``generator`` and
    ``critic`` as they are; ``warmup`` (``dmd_weight=0``) the generator update that also ends the
    iteration (``state.step + 1``), as no critic update follows it."""
    if kind != "warmup":
        return step

    def warmup(state, teacher_params, batch):
        state, metrics = step(state, teacher_params, batch)
        return state.replace(step=state.step + 1), metrics

    return warmup


def logs_generator(done: int, log_every: int, dspec, end: int) -> bool:
    """Whether the generator update of the iteration ending at ``done`` is logged (at ``done``): it
    is the last generator update before the next log point (a multiple of ``log_every``, or ``end``).
    A function of the iteration alone, so a resumed run logs exactly what an uninterrupted one does."""
    next_log = min(-(-done // log_every) * log_every, end)
    period = dspec.critic_steps if dspec.trains_critic else 1
    return next_log < done + period


def sampling_mismatch(cfg, dspec) -> str | None:
    """A note when the exported student's samplers (Euler over ``sample.steps`` = the step list's
    length at ``sample.shift``: ``mmdit sample`` / ``mmdit stream``) would not visit exactly the σ's
    of ``distill.denoising_step_list``; None when they do."""
    from mmdit.sample.ode import sampling_sigmas

    euler = np.asarray(sampling_sigmas(dspec.num_steps, float(cfg.sample.shift)))[:-1]
    if np.allclose(euler, dspec.denoising_step_list, atol=1e-5):
        return None
    return (
        f"note: distill.denoising_step_list={dspec.denoising_step_list} differs from the exported student's Euler "
        f"schedule {tuple(round(float(s), 4) for s in euler)} (sample.steps={dspec.num_steps}, "
        f"sample.shift={float(cfg.sample.shift):g}); set the step list to that schedule so sampling matches training"
    )


def student_config(cfg, dspec) -> mlc.ConfigDict:
    """The exported student's config: ``cfg`` sampling with the step list's length, no CFG (the
    teacher's guidance is distilled into the student) and the ``renoise`` solver (the update rule its
    rollouts were trained with, :func:`mmdit.sample.ode.solver_update`)."""
    out = mlc.ConfigDict(cfg.to_dict())
    out.sample.steps = dspec.num_steps
    out.sample.guidance = {}
    out.sample.guidance_order = ()
    out.sample.solver = "renoise"
    return out


def export_student(cfg, dspec, workdir: str, student, step: int) -> str:
    """Writes ``WORKDIR/student`` (module docstring) with the student's state at ``step``; returns it."""
    out = os.path.join(workdir, STUDENT_DIR)
    spec = config_spec.train_spec(cfg)
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        config_lib.write_resolved(student_config(cfg, dspec), out)
    manager = checkpoint.make_manager(out, spec)
    if step in manager.all_steps():
        manager.close()
        return out
    checkpoint.save(manager, step, student)
    checkpoint.finish(manager)
    return out
