"""Checkpoints: orbax CheckpointManager holding the train state and the grain iterator state.

Layout: ``WORKDIR/checkpoints/<step>/{state, data_iter}`` (orbax writes each step to a temporary
directory and renames it when complete, so a killed run never leaves a step that looks finished;
async saves overlap the next steps). ``WORKDIR/config.json`` is the resolved config of the run;
resuming with a config whose model differs is refused before anything is restored.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections as mlc
import orbax.checkpoint as ocp

from mmdit.data import pipeline

STATE_ITEM = "state"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, train=None, *, read_only: bool = False) -> ocp.CheckpointManager:
    """``train``: the validated ``config.train`` (:class:`mmdit.config_spec.TrainSpec`) when writing;
    None for a reader (keeps everything, synchronous)."""
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=train.keep_checkpoints if train is not None else None,
        enable_async_checkpointing=train.async_checkpoint if train is not None else False,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=opts)


def save(manager: ocp.CheckpointManager, step: int, state, data_iter=None) -> None:
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    if data_iter is not None:
        items[pipeline.DATA_ITER_ITEM] = pipeline.iterator_save_args(data_iter)
    manager.save(step, args=ocp.args.Composite(**items))


def restore(manager: ocp.CheckpointManager, abstract_state, data_iter=None, step: int | None = None):
    """Restores ``step`` (default: latest) into ``abstract_state``'s structure, shapes and shardings,
    and ``data_iter``'s position in place. Returns the state, or None when there is no checkpoint."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        items[pipeline.DATA_ITER_ITEM] = pipeline.iterator_restore_args(data_iter)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"checkpoint {manager.directory}/{step} does not match this model/config ({type(e).__name__}: "
            f"{str(e)[:300]}); train into a new --workdir or use the config the checkpoint was made with"
        ) from None
    return restored[STATE_ITEM]


def check_config_matches(workdir: str, cfg) -> None:
    """Refuses to resume a workdir whose saved model/task config differs from ``cfg``."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path) or not os.path.isdir(checkpoint_dir(workdir)):
        return
    with open(path) as f:
        saved = json.load(f)
    from mmdit.config_lib import to_json

    now = json.loads(to_json(cfg))
    diffs = _diff(saved.get("model", {}), now.get("model", {}), "model")
    if diffs:
        raise ValueError(
            f"{workdir} holds checkpoints of a different model: "
            + "; ".join(diffs[:5])
            + ". Use a new --workdir, or the config in "
            + path
        )


def _diff(a, b, prefix):
    out = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in ("attention", "remat", "scan", "sequence_parallel"):  # execution choices: free to change
                continue
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}")
        return out
    norm = lambda v: list(v) if isinstance(v, tuple) else v
    return [] if norm(a) == norm(b) else [f"{prefix} was {a!r}, now {b!r}"]


def load_config(workdir: str) -> mlc.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a training workdir (mmdit-train --workdir)?")
    with open(path) as f:
        return _to_config(json.load(f))


def _to_config(d):
    def fix(v):
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return tuple(fix(x) for x in v)
        return v

    return mlc.ConfigDict(fix(d))


def restore_inference_params(workdir: str, step: int | None = None, which: str = "ema"):
    """``(config, params)`` from a training workdir: the EMA (default) or raw params of ``step``."""
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.train.state import init_state, make_optimizer
    from mmdit import config_spec

    cfg = load_config(workdir)
    model = DiffusionModel.from_config(cfg)
    tx = make_optimizer(config_spec.train_spec(cfg))
    abstract = jax.eval_shape(lambda: init_state(model, tx, jax.random.key(0)))
    manager = make_manager(workdir, read_only=True)
    state = restore(manager, abstract, step=step)
    if state is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}; train first (mmdit-train --workdir {workdir})")
    return cfg, (state.ema if which == "ema" else state.params)
